"""A plain `pip install .` (no dev extra, no constraints) into a venv that already holds an older supported torch:
the user's torch is kept, `cytosae report` and `cytosae explore` work, and the tests pass with it.

The user's venv holds torch/torchvision 2.14.0 (older than the pinned 2.14.1; the 2.13 CPU wheel here has no
torchvision that loads, so timm cannot import with it) and, like a cluster's environment, the other libraries
already: they are linked from the project's venv, dev-only packages left out, rather than unpacked again (GBs of
CUDA libraries)."""
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OLD_TORCH, OLD_VISION = "2.14.0", "0.29.0"  # the oldest torch pyproject.toml admits (torch>=2.14)
DEV_ONLY = ("pytest", "_pytest", "py.py", "pluggy", "iniconfig", "playwright", "pyee", "greenlet", "tensorboard",
            "werkzeug", "grpc", "absl", "dinov2")
OURS = ("torch", "functorch", "torchgen", "torchvision", "cytosae", "__editable__", "_cytosae")
pytestmark = pytest.mark.slow


def _sh(argv, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=900, **kw)
    assert r.returncode == 0, (argv, r.stdout[-3000:], r.stderr[-3000:])
    return r


def _user_libraries(site: Path, into: Path, leave_out: tuple[str, ...] = DEV_ONLY + OURS) -> None:
    """The libraries a user's environment already has: links to the project venv's, without dev tools or torch."""
    into.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(leave_out) or name.endswith(".pth") or name == "__pycache__":
            continue
        (into / entry.name).symlink_to(entry)


@pytest.fixture(scope="module")
def user_venv(tmp_path_factory):
    root = tmp_path_factory.mktemp("install")
    venv = root / "venv"
    _sh([sys.executable, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    site = Path(_sh([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    here = Path(_sh([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    _user_libraries(here, root / "libs")
    (site / "zz_user_libraries.pth").write_text(str(root / "libs") + "\n")  # after the venv's own packages
    pip = [py, "-m", "pip", "install", "--quiet"]
    r = subprocess.run(pip + ["--no-deps", f"torch=={OLD_TORCH}", f"torchvision=={OLD_VISION}"], capture_output=True,
                       text=True, timeout=900)
    if r.returncode != 0:
        pytest.skip(f"torch {OLD_TORCH} is not installable here: {r.stderr.strip().splitlines()[-1:]}")
    _sh(pip + [str(REPO)])
    return venv


def test_plain_install_keeps_the_users_torch_and_has_no_dev_packages(user_venv):
    py = str(user_venv / "bin" / "python")
    out = _sh([py, "-c", "import torch, cytosae; print(torch.__version__); print(cytosae.__file__)"]).stdout.split()
    assert out[0].split("+")[0] == OLD_TORCH
    assert str(user_venv) in out[1]  # the installed package, not the source tree
    missing = _sh([py, "-c", "import importlib.util as u; print([m for m in ('pytest', 'playwright', 'tensorboard') "
                             "if u.find_spec(m)])"]).stdout.strip()
    assert missing == "[]"


def test_report_and_explore_work_from_a_plain_install(user_venv, demo_run, tmp_path):
    run, _ = demo_run
    cytosae = str(user_venv / "bin" / "cytosae")
    r = _sh([cytosae, "report", str(run), "--out", str(tmp_path / "site"), "--latents", "5", "--images", "2"])
    assert (tmp_path / "site" / "index.html").is_file(), r.stdout
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([cytosae, "explore", str(run), "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for _ in range(600):
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/run", timeout=1).read()
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.1)
        else:
            raise AssertionError("explore did not answer in 60 s")
        assert b"sample" in body
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=20)
    assert proc.returncode in (0, -signal.SIGINT, 130)


def test_the_tests_pass_with_the_older_torch(user_venv, tmp_path):
    py = str(user_venv / "bin" / "python")
    _sh([py, "-m", "pip", "install", "--quiet", "pytest==9.2.0"])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_sae_model.py", "tests/test_analysis_stats.py",
                        "tests/test_run.py", "-k", "not study"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-4000:]
    assert " passed" in r.stdout.splitlines()[-1] and "failed" not in r.stdout.splitlines()[-1]
