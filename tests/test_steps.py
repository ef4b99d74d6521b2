"""The step layer (cytosae.steps): one typed settings class per step, shared by the CLI, study files and Python; the
same bad value is refused the same way from each, in one line naming the flag or key."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cytosae.cli import app
from cytosae.steps import (ExtractSettings, StepError, TrainSettings, build, run_extract, run_train)

TINY = ["--backbone", "dinobloom-s", "--device", "cpu", "--batch-size", "8", "--workers", "0"]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from cytosae.data.synthetic import make_sample
    root = tmp_path_factory.mktemp("steps")
    return make_sample(root / "data", seed=0, n_patients=2, cells_per_patient=3, size=32)


def test_a_csv_in_the_current_folder_names_the_dataset_after_itself(sample, tmp_path, monkeypatch):
    """`cytosae extract cells.csv --run run` from the CSV's folder: the name is the CSV's ('' was refused)."""
    cells = sample.parent / "cells.csv"
    cells.write_text(sample.read_text())
    monkeypatch.chdir(sample.parent)
    res = CliRunner().invoke(app, ["extract", "cells.csv", "--run", str(tmp_path / "run"), *TINY])
    assert res.exit_code == 0, res.output
    assert "cells" in json.loads((tmp_path / "run" / "run.json").read_text())["datasets"]


@pytest.mark.parametrize("values, flag, key", [
    ({"expansion": 0}, "--expansion", "expansion"),
    ({"arch": "relu"}, "--arch", "arch"),
    ({"k": "16"}, "--k", "k"),
    ({"epochs": True}, "--epochs", "epochs"),
])
def test_one_bad_value_is_one_line_naming_the_flag_or_the_key(values, flag, key):
    with pytest.raises(StepError) as cli:
        build(TrainSettings, values)
    with pytest.raises(StepError) as study:
        build(TrainSettings, values, where="study.toml [sae]")
    assert str(cli.value).startswith(flag + " ") and "\n" not in str(cli.value)
    assert str(study.value).startswith(f"study.toml [sae]: {key} ") and "\n" not in str(study.value)


def test_unknown_keys_are_refused_and_settings_are_frozen():
    with pytest.raises(StepError, match=r"unknown key 'expanson'; known: .*expansion"):
        build(TrainSettings, {"expanson": 8}, where="study.toml [sae]")
    s = TrainSettings(arch="relu-l1")
    with pytest.raises(Exception):
        s.arch = "topk"  # type: ignore[misc]


def test_python_api_runs_the_steps_the_cli_runs(sample, tmp_path):
    """run_extract + run_train from Python make the run `cytosae extract` + `cytosae train` make: same records."""
    run = tmp_path / "run"
    ex = run_extract(ExtractSettings(data=sample, backbone="dinobloom-s", device="cpu", batch_size=8, workers=0,
                                     layer=-1), run=run)
    assert ex.complete and ex.n_images == 6 and ex.lines()[0].startswith("store ")
    tr = run_train(TrainSettings(arch="topk", expansion=2, k=4, batch_size=256, shuffle=1024, device="cpu",
                                 log="none"), run=run)
    assert tr.lines() and all(isinstance(line, str) for line in tr.lines())
    steps = json.loads((run / "run.json").read_text())["steps"]
    assert {"extract:data", "train"} <= set(steps)
    assert steps["train"]["settings"]["arch"] == "topk" and steps["train"]["settings"]["expansion"] == 2
