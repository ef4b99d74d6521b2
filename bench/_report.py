"""What every benchmark records beside its figures: the machine, and the JSON file."""
import json
import os
import platform
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
