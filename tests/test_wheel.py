"""What PyPI would get: `python -m build` makes a wheel and an sdist that `twine check` accepts, the sdist holds what
a rebuild needs, and the wheel, installed alone into a new venv (no source tree on the path), runs `cytosae demo`
to the end: the explorer's static files are in it, and the demo writes its sample and study file from the package."""
from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from test_install import _sh, _user_libraries

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: setuptools comes from the locked venv, so the build is offline and reproducible
    _sh([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)])
    wheel, = out.glob("cytosae-*.whl")
    sdist, = out.glob("cytosae-*.tar.gz")
    return wheel, sdist


def test_twine_accepts_the_wheel_and_sdist(dists):
    r = _sh([sys.executable, "-m", "twine", "check", "--strict", *map(str, dists)])
    assert r.stdout.count("PASSED") == 2, r.stdout


def test_the_distributions_hold_the_package_data(dists):
    wheel, sdist = dists
    names = zipfile.ZipFile(wheel).namelist()
    assert {"cytosae/explorer/static/app.js", "cytosae/explorer/static/index.html", "cytosae/demo.py",
            "cytosae/data/synthetic.py"} <= set(names)
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "cytosae = cytosae.cli:app" in zipfile.ZipFile(wheel).read(entry).decode()
    members = {m.split("/", 1)[1] for m in tarfile.open(sdist).getnames() if "/" in m}
    assert {"pyproject.toml", "README.md", "src/cytosae/explorer/static/app.js"} <= members


def test_the_wheel_alone_runs_the_demo(dists, tmp_path):
    wheel, _ = dists
    venv = tmp_path / "venv"
    _sh([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = str(venv / "bin" / "python")
    site = Path(_sh([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    here = Path(_sh([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # the locked dependencies (GBs of CUDA libraries) linked rather than unpacked again; cytosae only from the wheel
    _user_libraries(here, tmp_path / "libs", leave_out=("cytosae", "__editable__", "_cytosae"))
    (site / "zz_libraries.pth").write_text(str(tmp_path / "libs") + "\n")
    # --target, not --prefix: pip would first uninstall the project venv's own (editable) cytosae
    _sh([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--target", str(site),
         str(wheel)])
    where = _sh([py, "-c", "import cytosae; print(cytosae.__file__)"], cwd=tmp_path).stdout.strip()
    assert where.startswith(str(venv)), where  # the wheel's copy, not the source tree
    out = tmp_path / "demo"
    # python -m: the console script pip wrote carries the installing interpreter's shebang (the project venv's)
    # a small demo (32 cells): what is checked is that the wheel alone has everything every step needs
    r = subprocess.run([py, "-m", "cytosae", "demo", "--out", str(out), "--patients", "4", "--cells", "8"],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"run written to {out}" in r.stdout
    from cytosae.run import Run  # the run the wheel wrote reads back with the source tree's reader
    finished = Run.open(out).steps
    from cytosae.study import load_study, plan

    assert set(finished) == {s.name for s in plan(load_study(out / "study.toml"))}, finished  # every step, classify too
    assert {"extract", "train", "stats", "classify"} <= {name.split(":")[0] for name in finished}, finished
    assert (out / "study.toml").is_file() and any((out / "data" / "sample").rglob("*.png"))
