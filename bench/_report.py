"""What every benchmark records beside its figures: the machine, and the JSON file."""
import json
import os
import platform
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
