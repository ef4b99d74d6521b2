"""What every benchmark records beside its figures: the machine, and the JSON file."""
import json
import os
import platform
import resource
import sys
from pathlib import Path

import torch


def write_result(path: Path, result: dict) -> None:
    """Add the machine's state at measuring time (load matters on a shared 2-core box), write and print."""
    result["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                         "loadavg_1m": os.getloadavg()[0], "python": platform.python_version(),
                         "torch": torch.__version__}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


def _proc_status_gib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return None


def peak_rss_gib() -> float:
    """This process's own peak resident memory (VmHWM; ru_maxrss where /proc is missing). ru_maxrss alone is no use
    in a child: Linux carries the parent's high-water mark across fork + exec."""
    peak = _proc_status_gib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak_rss() -> float | None:
    """Set this process's VmHWM to its current RSS (Linux >= 4.0, /proc/self/clear_refs "5") so that a later
    peak_rss_gib() is the peak of what ran since; returns that RSS, or None where the reset is not available."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _proc_status_gib("VmRSS")


# CYTOSAE_SHARED_DATA: the folder holding acevedo/ and deepapl/ when it is not ../shared/data (a GPU machine)
SHARED_DATA = Path(os.environ.get("CYTOSAE_SHARED_DATA")
                   or Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
ACEVEDO = SHARED_DATA / "acevedo"


def acevedo_sample(n: int):
    """`n` real Acevedo cells (seed 0) as a data manifest; exits saying where the images are expected when absent."""
    from cytosae.data import load_manifest

    if not (ACEVEDO / "manifest.csv").is_file():
        sys.exit(f"real images not found at {ACEVEDO}; this benchmark needs ../shared/data/acevedo (or CYTOSAE_SHARED_DATA)")
    return load_manifest(ACEVEDO / "manifest.csv").sample(n=n, random_state=0)
