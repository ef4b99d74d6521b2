"""Sweeps (issue #18 item 4): [sae] lists train one SAE per combination, each evaluated and aligned, compared in
RUN/quality/sweep.*; the primary SAE stays at RUN/sae, the study's steps stay resumable."""
import json
import shutil

import pandas as pd
import pytest
from typer.testing import CliRunner

from cytosae.cli import app
from cytosae.run import Run
from cytosae.study import StudyError, load_study, plan, run_study


def _study(tmp_path, sae: str = "k = [4, 2]", expansion: str = "2", **over) -> str:
    sections = {"run": 'dir = "run"', "backbone": 'name = "dinobloom-s"\nbatch_size = 8\nseed = 0',
                "datasets.sample": 'data = "data/manifest.csv"',
                "sae": f'arch = "topk"\nexpansion = {expansion}\nbatch_size = 512\n{sae}',
                "align": "fit_tokens = 500\nmax_clusters = 8", "stats": "enabled = false"}
    sections.update(over)
    text = "\n\n".join(f"[{k}]\n{v}" for k, v in sections.items() if v is not None)
    (tmp_path / "study.toml").write_text(text)
    return str(tmp_path / "study.toml")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from cytosae.data.synthetic import make_sample

    root = tmp_path_factory.mktemp("sweep")
    make_sample(root / "data", seed=0, n_patients=4, cells_per_patient=3)
    return root


SAE_STEPS = ["train", "evaluate", "align"]


def _steps(*names: str) -> list[str]:
    """The study's steps for a sweep whose primary SAE is names[0]."""
    return (["extract:sample", *SAE_STEPS] + [f"{s}:{n}" for n in names[1:] for s in SAE_STEPS] + ["sweep"])


def _check_table(run_dir, names: list[str]) -> pd.DataFrame:
    """sweep.parquet and sweep.json say, row by row, what each SAE's own evaluate and align wrote."""
    table = pd.read_parquet(run_dir / "quality" / "sweep.parquet")
    doc = json.loads((run_dir / "quality" / "sweep.json").read_text())
    assert list(table.name) == names and [r["name"] for r in doc["saes"]] == names
    assert doc["primary"] == names[0] and list(table.primary) == [True] + [False] * (len(names) - 1)
    for row, rec in zip(table.itertuples(), doc["saes"]):
        folder = run_dir / ("sae" if row.primary else f"saes/{row.name}")
        quality = run_dir / ("quality" if row.primary else f"saes/{row.name}/quality")
        ev = json.loads((folder / "eval.json").read_text())
        config = json.loads((folder / "config.json").read_text())
        align = pd.read_parquet(quality / "alignment.parquet").set_index("method").loc["sae"]
        assert row.name == f"k{config['k']}-x2" and row.k == config["k"] and row.expansion == 2
        assert row.n_latents == config["n_latents"] == 2 * config["d_in"]
        assert (row.l0, row.fvu_patch, row.fvu_cls, row.dead_fraction) == pytest.approx(
            (ev["all"]["l0"], ev["patch"]["fvu"], ev["cls"]["fvu"], ev["all"]["dead_fraction"]))
        assert row.mean_best_ap == pytest.approx(align.mean_best_ap) and rec["mean_best_ap"] == pytest.approx(
            align.mean_best_ap)
        spliced = json.loads((folder / "eval.spliced.json").read_text())["downstream"]["label"]["probe"]
        assert row.spliced_recovered == pytest.approx(spliced["recovered"]) and rec["l1_coeff"] is None  # topk: no l1
        assert row.l0 == pytest.approx(config["k"])  # TopK fires exactly k latents per token
    assert doc["pareto"]["fvu_vs_l0"] == [n for n, p in zip(table.name, table.pareto_fvu) if p]
    png = run_dir / "quality" / "figures" / "sweep_pareto.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and doc["figure"] == "quality/figures/sweep_pareto.png"
    return table


def test_a_sweep_trains_evaluates_and_compares_each_combination_and_resumes(sample, tmp_path):
    shutil.copytree(sample / "data", tmp_path / "data")
    study, lines = _study(tmp_path, evaluate="spliced = true"), []

    status = run_study(study, say=lines.append, dry_run=True)
    assert list(status) == _steps("k4-x2", "k2-x2") and set(status.values()) == {"planned"}
    assert any(line.startswith("sweep of 2 SAEs: k4-x2 (primary, at sae/") for line in lines)
    assert any("train:k2-x2: would run cytosae train" in line and "--k 2" in line
               and line.endswith(str(tmp_path / "run" / "saes" / "k2-x2")) for line in lines)

    status = run_study(study, say=lines.append)
    assert status == dict.fromkeys(_steps("k4-x2", "k2-x2"), "done")
    run_dir = tmp_path / "run"
    table = _check_table(run_dir, ["k4-x2", "k2-x2"])
    assert bool(table.pareto_fvu.all())  # fewer latents per token, more unexplained variance: both on the front
    run = Run.open(run_dir)
    assert run.sweep == {"primary": "k4-x2", "saes": {
        "k4-x2": {"dir": "sae", "store": "stores/sample", "settings": {"k": 4, "expansion": 2, "layer": -2}},
        "k2-x2": {"dir": "saes/k2-x2", "store": "stores/sample", "settings": {"k": 2, "expansion": 2, "layer": -2}}}}
    assert run.named_sae_dir("k2-x2") == run_dir / "saes" / "k2-x2" and run.named_sae_dir("k4-x2") == run.sae_dir
    with pytest.raises(ValueError, match=r"no SAE named 'k9-x2' in this run \(its sweep has \['k2-x2', 'k4-x2'\]\)"):
        run.named_sae_dir("k9-x2")
    assert run.steps["train:k2-x2"]["settings"]["out"] == str(run_dir / "saes" / "k2-x2")
    # the run as one sweep SAE sees it: its own folders (where the explorer reads it), the primary's = the run's
    member = run.for_sae("k2-x2")
    assert (member.sae_dir, member.stats_dir, member.quality_dir, member.annotations) == (
        run_dir / "saes" / "k2-x2", run_dir / "saes" / "k2-x2" / "stats", run.sae_quality_dir("k2-x2"),
        run_dir / "saes" / "k2-x2" / "annotations.sqlite")
    assert member.store_dir("sample") == run.store_dir("sample") and member.sae_layer is None
    assert run.for_sae("k4-x2") is run and run.for_sae(None) is run and run.stats_dir == run_dir / "stats"

    assert set(run_study(study, say=lines.append).values()) == {"skipped"}

    # one value changed: only the new combination (and the table) runs; the primary SAE is untouched
    primary = (run_dir / "sae" / "sae.safetensors").stat().st_mtime_ns
    status = run_study(_study(tmp_path, sae="k = [4, 3]", evaluate="spliced = true"), say=lines.append)
    assert [s for s, v in status.items() if v == "done"] == ["train:k3-x2", "evaluate:k3-x2", "align:k3-x2", "sweep"]
    assert list(status) == _steps("k4-x2", "k3-x2")
    assert (run_dir / "sae" / "sae.safetensors").stat().st_mtime_ns == primary
    _check_table(run_dir, ["k4-x2", "k3-x2"])
    assert (run_dir / "saes" / "k2-x2" / "eval.json").is_file()  # out of the study, kept: a trained SAE is work


def test_a_layer_sweep_extracts_the_other_layer_outside_the_runs_datasets(sample, tmp_path):
    shutil.copytree(sample / "data", tmp_path / "data")
    study = _study(tmp_path, sae="k = 4", align=None, backbone='name = "dinobloom-s"\nbatch_size = 8\nlayer = [-2, -4]',
                   stats="galleries = 0\ndevice = \"cpu\"")
    status = run_study(study, say=lambda s: None)
    assert status == dict.fromkeys(["extract:sample", "train", "evaluate", "extract-layer:sample:-4",
                                    "train:L-4-k4-x2", "evaluate:L-4-k4-x2", "sweep", "stats", "stats:L-4-k4-x2"],
                                   "done")
    run_dir, run = tmp_path / "run", Run.open(tmp_path / "run")
    layer_store = run_dir / "layers" / "L-4" / "sample"
    assert json.loads((layer_store / "manifest.json").read_text())["settings"]["layer"] == -4
    assert json.loads((run_dir / "stores" / "sample" / "manifest.json").read_text())["settings"]["layer"] == -2
    # the run's datasets and backbone are the primary SAE's layer: stats, patients and the explorer are unchanged
    assert list(run.datasets) == ["sample"] and run.meta["backbone"]["layer"] == -2
    ev = json.loads((run_dir / "saes" / "L-4-k4-x2" / "eval.json").read_text())
    assert ev["store"] == "layers/L-4/sample"
    table = pd.read_parquet(run_dir / "quality" / "sweep.parquet")
    assert list(table.name) == ["L-2-k4-x2", "L-4-k4-x2"] and list(table.layer) == [-2, -4]
    assert list(table.store) == ["stores/sample", "layers/L-4/sample"]
    assert table.mean_best_ap.isna().all() and not table.pareto_ap.any()  # no [align]: nothing to rank by
    assert table.fvu_patch.iloc[1] == pytest.approx(ev["patch"]["fvu"])
    assert run.sweep["saes"]["L-4-k4-x2"]["settings"]["layer"] == -4
    # the explorer of the layer -4 SAE reads the store of its own block (its tokens) and encodes uploads there
    from cytosae.explorer.rundir import RunDir

    shown = RunDir(run_dir, sae="L-4-k4-x2")
    assert shown.store_dir("sample") == layer_store.resolve() and shown.backbone_spec()["layer"] == -4
    assert shown.shown_sae()["layer"] == -4 and shown.sae_dir == run_dir / "saes" / "L-4-k4-x2"
    assert shown.store("sample").meta["settings"]["layer"] == -4
    # every SAE of the sweep gets its own stats (every_sae, the default), on the tokens of its own block
    from cytosae.analysis.stats import LATENTS, read_stats_table
    from cytosae.steps import StatsSettings, run_stats

    own = read_stats_table(run_dir / "saes" / "L-4-k4-x2" / "stats", LATENTS)
    run_stats(StatsSettings(sae_dir=run_dir / "saes" / "L-4-k4-x2", stores=[layer_store], out=tmp_path / "direct",
                            galleries=0, device="cpu"))
    assert own.equals(read_stats_table(tmp_path / "direct", LATENTS))
    assert not own.equals(read_stats_table(run_dir / "stats", LATENTS))
    primary = RunDir(run_dir)
    assert primary.store_dir("sample") == (run_dir / "stores" / "sample").resolve()
    assert primary.backbone_spec()["layer"] == -2 and primary.shown_sae()["name"] == "L-2-k4-x2"
    assert set(run_study(study, say=lambda s: None).values()) == {"skipped"}


def test_the_primary_sae_keeps_its_key_and_can_be_chosen(tmp_path):
    """A study that turns k = 4 into k = [4, 2] keeps its trained SAE: the primary's steps digest what they did."""
    (tmp_path / "data").mkdir()
    before = {s.name: s.key for s in plan(load_study(_study(tmp_path, sae="k = 4", align=None)))}
    after = {s.name: s.key for s in plan(load_study(_study(tmp_path, sae="k = [4, 2]", align=None)))}
    assert list(before) == ["extract:sample", "train", "evaluate"]
    assert {s: after[s] for s in before} == before and list(after)[3:] == ["train:k2-x2", "evaluate:k2-x2", "sweep"]

    steps = {s.name: s for s in plan(load_study(_study(tmp_path, sae='k = [4, 2]\nprimary = "k2-x2"')))}
    assert "train:k4-x2" in steps and "train:k2-x2" not in steps
    assert steps["train"].settings.k == 2 and steps["train:k4-x2"].settings.k == 4
    assert steps["sweep"].settings.primary == "k2-x2" and steps["sweep"].settings.saes == ["k4-x2"]

    grid = plan(load_study(_study(tmp_path, expansion="[2, 3]", align=None)))
    # combinations in the file's order of the lists: expansion, then k
    assert [s.name for s in grid if s.kind == "train"] == ["train", "train:k2-x2", "train:k4-x3", "train:k2-x3"]
    assert grid[1].settings.k == 4 and grid[1].settings.expansion == 2


@pytest.mark.parametrize("sae, message", [
    ("k = 4\nshuffle = [256, 512]", "study.toml [sae]: shuffle is a list, but only k, expansion, l1_coeff (and "
                                    "[backbone] layer) can sweep (one SAE per combination); give shuffle one value"),
    ("k = []", "study.toml [sae]: k = []: a sweep list needs at least one value, each once"),
    ("k = [4, 4]", "study.toml [sae]: k = [4, 4]: a sweep list needs at least one value, each once"),
    ("k = [4, -1]", "study.toml [sae]: k should be greater than or equal to 1, got -1"),
    ('k = [4, 2]\nprimary = "k8-x2"', "study.toml [sae]: primary = 'k8-x2' is not one of the sweep's SAEs"),
    ('k = 4\nprimary = "k4-x2"', "study.toml [sae]: primary names one SAE of a sweep, but no key is a list"),
    ("k = 4\nl1_coeff = [0.1, 0.1000001]", "study.toml [sae]: two combinations are both named 'k4-x2-l1-0.1'"),
])
def test_bad_sweeps_are_refused_in_one_line_naming_section_and_key(tmp_path, sae, message):
    study = _study(tmp_path, sae=sae)
    with pytest.raises(StudyError) as err:
        plan(load_study(study))
    assert message in str(err.value) and "\n" not in str(err.value)
    r = CliRunner().invoke(app, ["run", study, "--dry-run"])
    assert r.exit_code == 2 and message in " ".join(r.output.split()) and "Traceback" not in r.output


@pytest.mark.parametrize("backbone, message", [
    ('batch_size = [8, 16]', r"study.toml \[backbone\]: batch_size is a list, but only layer \(and \[sae\] k, "
                             r"expansion, l1_coeff\) can sweep; give batch_size one value$"),
    ('layer = [-2, -2]', r"study.toml \[backbone\]: layer = \[-2, -2\]: a sweep list needs at least one value"),
    ('layer = [-2, "x"]', r"study.toml \[backbone\]: layer should be a valid integer, got 'x'$"),
])
def test_bad_backbone_lists_are_refused_in_one_line(tmp_path, backbone, message):
    study = _study(tmp_path, backbone=f'name = "dinobloom-s"\n{backbone}')
    with pytest.raises(StudyError, match=message):
        plan(load_study(study))


def test_a_sweep_needs_evaluate(tmp_path):
    study = _study(tmp_path, evaluate="enabled = false")
    with pytest.raises(StudyError, match=r"\[evaluate\]: enabled = false, but a sweep \(\[sae\] lists\) compares"):
        plan(load_study(study))


def test_pareto_front_keeps_the_undominated_and_skips_missing_values():
    from cytosae.steps.sweep import pareto_front

    l0 = [2.0, 4.0, 8.0, 4.0, 3.0]
    fvu = [0.9, 0.5, 0.4, 0.6, float("nan")]  # (4, 0.6) is beaten by (4, 0.5); the NaN row is never on it
    assert pareto_front(l0, fvu) == [True, True, True, False, False]
    ap = [0.5, 0.7, 0.6, 0.7, None]  # higher is better: (8, 0.6) is beaten by (4, 0.7); equal points both stay
    assert pareto_front(l0, ap, maximize_y=True) == [True, True, False, True, False]


def test_stats_run_for_every_sweep_sae_unless_every_sae_is_false(tmp_path):
    steps = {s.name: s for s in plan(load_study(_study(tmp_path, stats="galleries = 0")))}
    assert [n for n in steps if n.startswith("stats")] == ["stats", "stats:k2-x2"]
    member = steps["stats:k2-x2"]
    assert member.settings.sae_name == "k2-x2" and member.argv[:4] == ["stats", "--run", str(tmp_path / "run"), "--sae"]
    assert "sweep" in member.needs and "train:k2-x2" in member.needs
    assert steps["stats"].settings.sae_name is None
    only = plan(load_study(_study(tmp_path, stats="every_sae = false")))
    assert [s.name for s in only if s.name.startswith("stats")] == ["stats"]
    with pytest.raises(StudyError, match=r"\[stats\]: sae_name cannot be set in a study"):
        plan(load_study(_study(tmp_path, stats='sae_name = "k2-x2"')))
    with pytest.raises(StudyError, match=r"\[stats\]: every_sae should be true or false, got 'no'"):
        plan(load_study(_study(tmp_path, stats='every_sae = "no"')))


def test_sae_name_needs_a_run_and_a_name_of_its_sweep(tmp_path):
    r = CliRunner().invoke(app, ["stats", "sae", "store", "--out", str(tmp_path), "--sae", "k2-x2"])
    assert r.exit_code == 2 and "--sae k2-x2 names an SAE of a run's sweep: give --run RUN too" in r.output
    run_dir = tmp_path / "run"
    Run.open(run_dir, create=True).set_sweep("k4-x2", {"k4-x2": {"dir": "sae", "store": "stores/sample",
                                                                 "settings": {"k": 4}}})
    for command in ("stats", "patients", "align", "describe", "evaluate"):
        r = CliRunner().invoke(app, [command, "--run", str(run_dir), "--sae", "k9-x2"])
        assert r.exit_code == 2 and "no SAE named 'k9-x2' in this run (its sweep has ['k4-x2'])" in r.output, command
        assert "Traceback" not in r.output
