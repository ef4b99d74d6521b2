"""Cost of the integrity checks: sha256 of a shard / SAE file when written (in memory) and when opened (from disk).

    python bench/checksum.py [--mb 100]

Writes bench/results/checksum.json. The file is hashed twice from disk: the first read may come
from the page cache (just written), as it does when a store is opened right after extraction.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from _report import write_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from cytosae.store.format import CHECKSUM_ALGORITHM, bytes_checksum, verify_file  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=100)
    args = ap.parse_args()
    data = os.urandom(args.mb * 2**20)
    t0 = time.perf_counter()
    expected = bytes_checksum(data)
    write_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "file.bin"
        path.write_bytes(data)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            verify_file(path, expected, "")
            times.append(time.perf_counter() - t0)
    verify_s = min(times)
    write_result(Path(__file__).parent / "results" / "checksum.json", {
        "what": f"{CHECKSUM_ALGORITHM} of a {args.mb} MB file: when written (bytes in memory) and when verified on "
                "open (size + hash read from disk, page cache warm, best of 3)",
        "mb": args.mb, "algorithm": CHECKSUM_ALGORITHM,
        "hash_in_memory_s": round(write_s, 4), "verify_from_disk_s": round(verify_s, 4),
        "verify_mb_per_s": round(args.mb / verify_s, 1),
    })


if __name__ == "__main__":
    main()
