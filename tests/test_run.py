"""The run directory (cytosae.run) and studies (cytosae run study.toml): records, skipping, reruns, bad files."""
import json
import threading

import pytest
from typer.testing import CliRunner

from cytosae.cli import app
from cytosae.run import InvalidRunJson, NotARun, Run, RunJson, check_name
from cytosae.study import StudyError, load_study, plan, run_study


def test_run_records_steps_atomically_and_relative_to_itself(tmp_path):
    run = Run.open(tmp_path / "run", create=True)
    weights = tmp_path / "run" / "w.bin"
    weights.write_bytes(b"abc")
    run.add_dataset("mll23", data=str(tmp_path / "data"))
    rec = run.record_step("extract:mll23", "cytosae extract", {"layer": -2, "out": tmp_path / "x"},
                          inputs={"weights": weights, "missing": tmp_path / "nope"}, seconds=1.23456)
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["format"] == "cytosae-run" and meta["datasets"]["mll23"] == {"store": "stores/mll23",
                                                                            "data": str(tmp_path / "data")}
    step = meta["steps"]["extract:mll23"]
    assert step == rec and step["seconds"] == 1.235 and step["settings"]["out"] == str(tmp_path / "x")
    assert step["inputs"] == {"weights": {"path": "w.bin", "size": 3, "sha256":
                                          "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}}
    assert {"cytosae", "torch", "python"} <= set(step["versions"])
    assert Run.open(tmp_path / "run").store_dir("mll23") == tmp_path / "run" / "stores" / "mll23"


def test_concurrent_commands_lose_no_step(tmp_path):
    """Two commands writing into one run at once (e.g. stats and patients) must both be recorded."""
    Run.open(tmp_path / "run", create=True).add_dataset("a")

    def record(i):
        Run.open(tmp_path / "run").record_step(f"s{i}", "cytosae x", {"i": i})

    threads = [threading.Thread(target=record, args=(i,)) for i in range(12)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert set(Run.open(tmp_path / "run").steps) == {f"s{i}" for i in range(12)}


def test_not_a_run_and_damaged_run_json_are_one_line_errors(tmp_path):
    with pytest.raises(NotARun, match="not a cytosae run"):
        Run.open(tmp_path)
    (tmp_path / "run.json").write_text("{oops")
    with pytest.raises(ValueError, match="run.json: is not valid JSON"):
        Run.open(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"datasets": {"a": {"store": "../../etc"}}}))
    with pytest.raises(ValueError, match="run.json: datasets.a.store: '../../etc' must be a path inside the run"):
        Run.open(tmp_path)
    for bad in ("", "../x", "a/b", ".hidden", "x" * 101):
        with pytest.raises(ValueError):
            check_name(bad)


def _written_run(path):
    """A run as today's writers leave it: every writer of cytosae.run called once (format_version 1)."""
    run = Run.open(path, create=True)
    (path / "w.bin").write_bytes(b"weights")
    run.add_dataset("cells", data="data/cells.csv", data_root=path / "data")
    run.set_backbone({"name": "dinobloom-s", "weights": "w.bin", "layer": -2, "seed": None, "options": {}})
    run.record_step("extract:cells", "cytosae extract", {"layer": -2}, inputs={"weights": path / "w.bin"},
                    seconds=2.5, key="abc")
    run.record_step("train", "cytosae train", {"k": 4})
    run.set_study_keys("study.toml", {"extract:cells": "abc"})
    return run


def test_run_json_written_today_opens_unchanged(tmp_path):
    run = _written_run(tmp_path / "run")
    written = json.loads((tmp_path / "run" / "run.json").read_text())
    again = Run.open(tmp_path / "run")
    assert again.meta == written and written["format_version"] == 1
    assert set(written) <= set(RunJson.model_fields) and again.steps["extract:cells"]["inputs"]["weights"]["size"] == 7
    # a folder opened by its layout (no run.json) keeps `inferred` when a command first records into it
    from cytosae.sae import SAE, SAEConfig
    from cytosae.store.format import write_manifest

    laid = tmp_path / "laid"
    SAE(SAEConfig(arch="topk", d_in=4, n_latents=8, k=2)).save(laid / "sae")
    (laid / "stores" / "a").mkdir(parents=True)
    write_manifest(laid / "stores" / "a", {"format": "cytosae-activation-store", "complete": False, "created": "x",
                                           "settings": {"backbone": "b"}, "n_tokens": 1, "d_model": 4, "shards": []})
    Run.open(laid).record_step("stats", "cytosae stats", {})
    assert json.loads((laid / "run.json").read_text())["inferred"] is True
    assert set(Run.open(laid).steps) == {"stats"}


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(steps=[m["steps"]["train"]]), "run.json: steps: must be an object, got [{"),
    (lambda m: m["datasets"]["cells"].pop("store") and None, "run.json: datasets.cells.store: is missing"),
    (lambda m: m["datasets"]["cells"].update(data=5), "run.json: datasets.cells.data: must be a string, got 5"),
    (lambda m: m["backbone"].update(weights=["w.bin"]), "run.json: backbone.weights: must be a string, got ['w.bin']"),
    (lambda m: m.update(format_version=99), "run.json: format_version: 99 is newer than this cytosae understands "
                                            "(1); upgrade cytosae"),
    (lambda m: m["steps"]["train"].update(finished=1700000000), "run.json: steps.train.finished: must be a string "
                                                                "timestamp (ISO 8601), got 1700000000"),
    (lambda m: m["steps"]["train"].update(seconds="2"), "run.json: steps.train.seconds: must be a number, got '2'"),
    (lambda m: m["backbone"].update(layer="-2"), "run.json: backbone.layer: must be an integer, got '-2'"),
    (lambda m: m.update(format="cytosae-activation-store"), "run.json: format: must be 'cytosae-run', got"),
    (lambda m: m.update(colour="red"), "run.json: colour: is not a field of this file"),
    (lambda m: m["study"]["keys"].update(train=3), "run.json: study.keys.train: must be a string, got 3"),
    (lambda m: "[1, 2]", "run.json: does not hold a JSON object (it holds a JSON list)"),
    (lambda m: '{"datasets": ', "run.json: is not valid JSON (Expecting value"),
])
def test_an_edited_run_json_is_refused_in_one_line_naming_the_field(tmp_path, edit, message):
    _written_run(tmp_path / "run")
    file = tmp_path / "run" / "run.json"
    meta = json.loads(file.read_text())
    text = edit(meta)
    file.write_text(text if isinstance(text, str) else json.dumps(meta))
    with pytest.raises(InvalidRunJson) as err:
        Run.open(tmp_path / "run")
    assert message in str(err.value) and "\n" not in str(err.value) and isinstance(err.value, ValueError)
    # every command prints it as its one-line error, before doing anything
    r = CliRunner().invoke(app, ["stats", "--run", str(tmp_path / "run")])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def _study(tmp_path, **over) -> str:
    sections = {"run": 'dir = "run"', "backbone": 'name = "dinobloom-s"\nlayer = -2\nbatch_size = 8\nseed = 0',
                "datasets.sample": 'data = "data/manifest.csv"',
                "sae": 'arch = "topk"\nexpansion = 2\nk = 4\nbatch_size = 512', "stats": "galleries = 0",
                "patients": 'token_policy = "any_patch"\nexamples = 0', "classify": "folds = 2\nrepeats = 2"}
    sections.update(over)
    text = "\n\n".join(f"[{k}]\n{v}" for k, v in sections.items() if v is not None)
    (tmp_path / "study.toml").write_text(text)
    return str(tmp_path / "study.toml")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from cytosae.data.synthetic import make_sample

    root = tmp_path_factory.mktemp("study")
    make_sample(root / "data", seed=0, n_patients=4, cells_per_patient=3)
    return root


def test_study_runs_once_skips_when_done_and_reruns_only_what_a_change_affects(sample, tmp_path):
    import shutil

    shutil.copytree(sample / "data", tmp_path / "data")
    study = _study(tmp_path)
    lines = []
    status = run_study(study, say=lines.append)
    assert status == dict.fromkeys(["extract:sample", "train", "evaluate", "stats", "patients", "classify"], "done")
    run = Run.open(tmp_path / "run")
    assert set(run.steps) == set(status) and run.steps["train"]["settings"]["k"] == 4
    assert run.summary()["classify"] and run.has_store("sample") and run.has_sae()
    shard = (tmp_path / "run" / "stores" / "sample" / "shard_00000.safetensors").stat().st_mtime_ns

    assert set(run_study(study, say=lines.append).values()) == {"skipped"}

    # a changed SAE setting reruns train and everything after it, never the extraction
    _study(tmp_path, sae='arch = "topk"\nexpansion = 2\nk = 3\nbatch_size = 512')
    status = run_study(study, say=lines.append)
    assert status["extract:sample"] == "skipped" and all(status[s] == "done" for s in status if s != "extract:sample")
    assert json.loads((tmp_path / "run" / "sae" / "config.json").read_text())["k"] == 3
    assert (tmp_path / "run" / "stores" / "sample" / "shard_00000.safetensors").stat().st_mtime_ns == shard
    assert any("settings changed" in line for line in lines)

    # a study moved with its data and run is still done: keys do not depend on where it lies
    shutil.move(tmp_path, tmp_path.parent / (tmp_path.name + "-moved"))
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    assert set(run_study(moved / "study.toml", say=lines.append).values()) == {"skipped"}


def test_a_step_whose_output_was_removed_runs_again(sample, tmp_path):
    import shutil

    shutil.copytree(sample / "data", tmp_path / "data")
    study = _study(tmp_path, patients=None, classify=None)
    run_study(study, say=lambda s: None)
    shutil.rmtree(tmp_path / "run" / "stats")
    status = run_study(study, say=lambda s: None)
    assert status == {"extract:sample": "skipped", "train": "skipped", "evaluate": "skipped", "stats": "done"}


@pytest.mark.parametrize("over, message", [
    ({"sae": 'arch = "topk"\nexpansoin = 2'}, "study.toml [sae]: unknown key 'expansoin'; known: dataset, arch, expansion"),
    ({"run": None}, "[run] dir"),
    ({"datasets.sample": 'data = 3'}, "[datasets.sample] needs data"),
    ({"datasets.sample": None}, "at least one [datasets.NAME]"),
    ({"sae": 'dataset = "other"'}, "[sae] dataset = 'other' is not one of the datasets"),
    ({"classify": 'external = "x"'}, "must also be listed in [patients] external"),
    ({"wrong": "a = 1"}, "unknown section(s) ['wrong']"),
    # issue #20 item 3: every value is checked against the step's settings before anything runs (dry-run too)
    ({"run": 'dir = "run"\ncolour = "red"'}, "study.toml [run]: unknown key 'colour'; known: dir"),
    ({"evaluate": 'enabled = "no"'}, "study.toml [evaluate]: enabled should be true or false, got 'no'"),
    ({"stats": 'out = "/elsewhere"'}, "study.toml [stats]: out cannot be set in a study"),
    ({"sae": 'arch = "topk"\nk = true'}, "study.toml [sae]: k should be a valid integer, got True"),
    # a list is a sweep (tests/test_sweeps.py), for the keys that can sweep only
    ({"sae": 'arch = "topk"\nbatch_size = [1, 2]'}, "study.toml [sae]: batch_size is a list, but only k, expansion"),
    ({"sae": 'arch = "topk"\nk = -3'}, "study.toml [sae]: k should be greater than or equal to 1, got -3"),
])
def test_bad_study_files_name_the_field(tmp_path, over, message):
    study = _study(tmp_path, **over)
    with pytest.raises(StudyError) as err:
        plan(load_study(study))
    assert message in str(err.value) and "\n" not in str(err.value)
    r = CliRunner().invoke(app, ["run", study])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def test_study_file_that_is_not_toml_is_one_line(tmp_path):
    (tmp_path / "s.toml").write_text("[run\ndir=")
    r = CliRunner().invoke(app, ["run", str(tmp_path / "s.toml")])
    assert r.exit_code == 2 and "is not valid TOML" in r.output


def test_external_cohort_steps(tmp_path):
    (tmp_path / "a").mkdir()
    study = _study(tmp_path, **{"datasets.other": 'data = "a"',
                                "patients": 'external = ["other"]', "classify": 'external = "other"'})
    steps = {s.name: s for s in plan(load_study(study))}
    assert steps["patients:other"].argv[-1] == "--external" and "patients:other" in steps["classify"].needs
    assert steps["classify"].argv[-2:] == ["--external", str(tmp_path / "run" / "external" / "other")]


def test_shipped_study_files_are_valid(tmp_path):
    """The README's quick-start study and CytoSAE's reproduction study name only options the commands have."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    steps = plan(load_study(repo / "studies" / "cytosae-reproduction.toml"))
    assert [s.name for s in steps] == ["extract:mll23", "extract:acevedo", "extract:matek19", "extract:bmc",
                                       "extract:aml_hehr", "train", "evaluate", "stats", "patients", "classify"]
    train = steps[5].argv
    assert train[train.index("--arch") + 1] == "relu-l1" and train[train.index("--l1-coeff") + 1] == "8e-05"
    readme = (repo / "README.md").read_text()
    (tmp_path / "study.toml").write_text(re.search(r"```toml\n(# study.toml.*?)```", readme, re.S).group(1))
    assert [s.name for s in plan(load_study(tmp_path / "study.toml"))][-1] == "classify"


def test_dry_run_refuses_a_run_dir_that_is_a_file(tmp_path):
    study = _study(tmp_path)
    (tmp_path / "run").write_text("not a folder")
    r = CliRunner().invoke(app, ["run", study, "--dry-run"])
    assert r.exit_code == 2 and "[run]: dir" in r.output and "is a file, not a folder" in r.output
    assert "Traceback" not in r.output


def test_a_second_cytosae_run_of_the_same_run_is_refused_naming_the_holder(tmp_path):
    """Issue #20 item 4: two `cytosae run` of one study at once both ran every step into the same run."""
    import os

    from cytosae.study import STUDY_LOCK, study_lock
    run_dir = tmp_path / "run"
    with study_lock(run_dir):
        assert (run_dir / STUDY_LOCK).read_text() == str(os.getpid())
        # flock locks belong to the open file description: a second open in this process conflicts like another
        # process's would
        with pytest.raises(StudyError, match=rf"run {run_dir} is being run by another `cytosae run` \(pid {os.getpid()}\)"):
            with study_lock(run_dir):
                pass
    with study_lock(run_dir):  # released at the end of the first
        pass
