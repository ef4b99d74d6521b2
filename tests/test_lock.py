"""requirements-lock.txt is the whole venv: every package `make` installs, transitive ones included, pinned exactly
with hashes; pyproject.toml's ranges admit every locked version. A venv that drifts from the lock fails here."""
from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements-lock.txt"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")


def locked() -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes), from the lock's requirement lines and their continuation lines."""
    pins: dict[str, tuple[str, int]] = {}
    name = None
    for line in LOCK.read_text().splitlines():
        if m := PIN.match(line):
            name = canonicalize_name(m[1])
            assert name not in pins, f"{name} is pinned twice in {LOCK.name}"
            pins[name] = (m[2], 0)
        elif line.strip().startswith("--hash=sha256:") and name is not None:
            version, n = pins[name]
            pins[name] = (version, n + 1)
        elif line and not line.startswith((" ", "#")):
            pytest.fail(f"{LOCK.name}: unexpected line {line!r}")
    return pins


def test_every_pin_is_exact_and_hashed():
    pins = locked()
    assert len(pins) > 100  # the transitive closure, not only the ~25 direct dependencies
    assert {"torch", "pydantic", "pydantic-core", "starlette", "anyio", "jinja2", "setuptools", "pip"} <= set(pins)
    unhashed = sorted(n for n, (_, hashes) in pins.items() if hashes == 0)
    assert not unhashed, f"{LOCK.name}: no --hash for {unhashed}; run `make lock`"


def test_pyproject_ranges_admit_the_locked_versions():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = locked()
    for spec in project["dependencies"] + project["optional-dependencies"]["dev"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"pyproject.toml requires {spec!r} but {LOCK.name} does not pin it; run `make lock`"
        assert req.specifier.contains(pins[name][0], prereleases=True), \
            f"{LOCK.name} pins {name}=={pins[name][0]}, outside pyproject.toml's {spec!r}; run `make lock`"


def _project_venv() -> bool:
    return Path(sys.prefix).resolve() == (ROOT / ".venv").resolve()


@pytest.mark.skipif(not _project_venv(), reason="checks the project's own .venv (made by `make`); "
                    "this interpreter's environment is the user's own")
def test_the_venv_holds_exactly_the_lock():
    pins = locked()
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    installed.pop("cytosae")
    unpinned = sorted(set(installed) - set(pins))
    assert not unpinned, f".venv holds {unpinned}, which {LOCK.name} does not pin: add them to pyproject.toml or " \
                         "scripts/lock.in and run `make lock`"
    drift = {n: (v, pins[n][0]) for n, v in installed.items() if v != pins[n][0]}
    assert not drift, f".venv versions differ from {LOCK.name} (installed, locked): {drift}; rebuild with `make clean`"
    missing = sorted(set(pins) - set(installed))
    assert not missing, f"{LOCK.name} pins {missing}, which .venv lacks; rebuild with `make clean`"
