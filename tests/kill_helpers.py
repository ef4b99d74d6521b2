"""Killing a real extraction mid-run, for the resume tests (a store must come out as if nothing happened)."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path


def kill_after_first_shard(argv: list[str], out: Path, env: dict | None = None, timeout: float = 120) -> None:
    """Start `argv` (an extraction writing the store `out`), SIGKILL it once manifest.json lists a shard, and
    check that it left an unfinished store."""
    proc = subprocess.Popen(argv, env=env)
    manifest_path = Path(out) / "manifest.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if manifest_path.exists() and len(json.loads(manifest_path.read_text())["shards"]) >= 1:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not json.loads(manifest_path.read_text())["complete"]
