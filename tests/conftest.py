import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# CYTOSAE_SHARED_DATA: the same folders elsewhere (a machine the checkout was copied to without ../shared)
SHARED_DATA = Path(os.environ.get("CYTOSAE_SHARED_DATA") or REPO / ".." / "shared" / "data").resolve()

# Two cores: one intra-op thread per test process keeps timings predictable when pytest runs beside other work.
torch.set_num_threads(int(os.environ.get("CYTOSAE_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real images beside the repo (../shared/data); tests using them skip when it is absent."""
    if not (SHARED_DATA / "acevedo" / "manifest.csv").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """The demo exactly as `make demo` runs it, made once per test session (a few minutes on 2 cores)."""
    from cytosae.demo import run_demo

    run = tmp_path_factory.mktemp("demo") / "run"
    lines: list[str] = []
    run_demo(run, say=lines.append)
    return run, lines


@pytest.fixture
def fake_cuda(monkeypatch):
    """One simulated CUDA GPU for the test (tests/fake_cuda.py): GPU code paths run on CPU and fail where a GPU
    would (mixed-device ops, .numpy() of a CUDA tensor, CPU generators on CUDA factories)."""
    from fake_cuda import simulated_cuda

    with simulated_cuda(monkeypatch):
        yield


def pytest_collection_modifyitems(config, items):
    """CYTOSAE_FAKE_CUDA=1: the tests marked gpu run on the simulated GPU (their "needs CUDA" skips dropped), a
    check of the GPU session's tests before device time is spent on them."""
    if os.environ.get("CYTOSAE_FAKE_CUDA") != "1":
        return
    for item in items:
        if item.get_closest_marker("gpu") is None:
            continue
        item.own_markers = [m for m in item.own_markers
                            if not (m.name == "skipif" and "CUDA" in str(m.kwargs.get("reason", "")))]
        if "fake_cuda" not in item.fixturenames:
            item.fixturenames.append("fake_cuda")
