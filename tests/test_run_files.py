"""Issue #17: every result file a later step, the explorer or a notebook reads is named once by its writer and read
through a schema beside it; a file edited to what no writer writes is refused in one line naming file and field."""
import json

import pytest
from fastapi.testclient import TestClient

from cytosae.analysis import patients, stats
from cytosae.analysis.classify_results import RESULTS, read_classify_results
from cytosae.explorer import create_app
from cytosae.notebook import DamagedData, open_run
from cytosae.store.format import InvalidFile
from cytosae.analysis.encoded import EncodedStore
from explorer_fixtures import LOCAL, copy_of, session_run


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return copy_of(session_run(tmp_path_factory), tmp_path_factory.mktemp("run-files"))


def _edit(run, rel, change):
    path = run / rel
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))


def test_the_writers_files_pass_their_readers_unchanged(fx):
    run = fx.path
    for folder, read in ((run / "stats", stats.read_stats_summary), (run / "patients", patients.read_patients_summary),
                         (run / "classify", read_classify_results)):
        file = folder / {"stats": stats.SUMMARY, "patients": patients.SUMMARY, "classify": RESULTS}[folder.name]
        assert read(folder) == json.loads(file.read_text())
    assert [d["dataset"] for d in stats.read_stats_summary(run / "stats")["datasets"]] == ["acevedo", "mll"]
    for file, columns in stats.COLUMNS.items():
        assert set(columns) <= set(stats.read_stats_table(run / "stats", file).columns)
    for file in (patients.BARCODES, patients.DISEASE_BARCODES, patients.COMPARE):
        assert len(patients.read_patients_table(run / "patients", file))
    barcodes = patients.read_barcodes(run / "patients")
    assert len(barcodes) == barcodes.patient_id.nunique() * fx.n_latents


def test_eval_and_alignment_as_written_pass_their_readers(fx, tmp_path):
    from cytosae.analysis.alignment import SUMMARY, compute_alignment, read_alignment, write_alignment
    from cytosae.sae import SAE
    from cytosae.steps import EvaluateSettings, run_evaluate
    from cytosae.steps.evaluate import EVAL, read_eval
    from cytosae.store import ActivationStore

    run = copy_of(fx, tmp_path).path
    res = run_evaluate(EvaluateSettings(dataset="acevedo"), run=run)
    assert res.out == run / "sae" / EVAL and read_eval(run / "sae") == json.loads(res.out.read_text())
    _edit(run, f"sae/{EVAL}", lambda c: c["all"].update(tokens="216"))
    with pytest.raises(InvalidFile, match=r"sae/eval.json: all.tokens: must be an integer, got '216'; rebuild it "
                                          r"with `cytosae evaluate`"):
        read_eval(run / "sae" / EVAL)
    write_alignment(compute_alignment(EncodedStore(ActivationStore(run / "stores" / "acevedo"), SAE.load(run / "sae"),
                                                   "cpu"),
                                      max_clusters=4, max_fit_tokens=200), run / "quality")
    assert read_alignment(run / "quality")["dataset"] == "acevedo"
    _edit(run, f"quality/{SUMMARY}", lambda c: c["per_class"][0].pop("method"))
    with pytest.raises(InvalidFile, match=r"quality/alignment.json: per_class.0.method: is missing"):
        read_alignment(run / "quality")


# (file, edit, what the one-line error says after the file's name)
EDITS = [
    ("stats/summary.json", lambda c: c["datasets"][0].update(n_images="12"),
     "datasets.0.n_images: must be an integer, got '12'"),
    ("stats/summary.json", lambda c: c["datasets"][1].pop("dataset"), "datasets.1.dataset: is missing"),
    ("stats/summary.json", lambda c: c.update(datasets={"acevedo": {}}), "datasets: must be a list, got {'acevedo'"),
    ("patients/summary.json", lambda c: c.update(groups=["AML", "APL"]), "groups: must be an object, got ['AML'"),
    ("patients/summary.json", lambda c: c.update(token_policy="all"), "token_policy: must be 'cls', 'any_patch' or "
                                                                      "'mean', got 'all'"),
    ("patients/summary.json", lambda c: c.pop("comparisons"), "comparisons: is missing"),
    ("classify/results.json", lambda c: c["models"]["concepts_logreg_l2"].update(auroc="0.9"),
     "models.concepts_logreg_l2.auroc: must be a number, got '0.9'"),
    ("classify/results.json", lambda c: c["models"]["concepts_logreg_l2"].pop("macro_f1"),
     "models.concepts_logreg_l2.macro_f1: is missing"),
    ("classify/results.json", lambda c: c.pop("n_patients"), "n_patients: is missing"),
]
READERS = {"stats": stats.read_stats_summary, "patients": patients.read_patients_summary,
           "classify": read_classify_results}


@pytest.mark.parametrize("rel, edit, message", EDITS)
def test_an_edited_result_file_is_one_line_naming_file_and_field(fx, tmp_path, rel, edit, message):
    run = copy_of(fx, tmp_path).path
    _edit(run, rel, edit)
    part = rel.split("/")[0]
    with pytest.raises(InvalidFile) as err:
        READERS[part](run / part)
    assert f"{rel}: {message}" in str(err.value) and "\n" not in str(err.value)
    assert f"rebuild it with `cytosae {part}" in str(err.value)
    # the explorer: 503 naming the file relative to the run and the field, never a server path
    url = {"stats": "/api/run", "patients": "/api/run", "classify": "/api/classify"}[part]
    with TestClient(create_app(run), base_url=LOCAL) as c:
        r = c.get(url)
    detail = r.json()["detail"]
    assert r.status_code == 503 and detail.startswith(f"{rel}: {message}") and f"cytosae {part} --run RUN" in detail
    assert str(tmp_path) not in r.text
    # a notebook: the same one line, as DamagedData
    view = open_run(run)
    with pytest.raises(DamagedData) as err:
        view.classify_results if part == "classify" else view.summary(part)
    assert str(err.value) == detail


@pytest.mark.parametrize("rel, url, params, column", [
    ("stats/latents.parquet", "/api/latents", {"dataset": "acevedo"}, "top_label"),
    ("stats/top_images.parquet", "/api/latents/0/heatmaps", {"dataset": "acevedo"}, "image_id"),
    ("patients/barcodes.parquet", "/api/patients/barcodes", {}, "frac"),
])
def test_a_table_without_a_column_its_readers_use_is_named(fx, tmp_path, rel, url, params, column):
    import pandas as pd

    run = copy_of(fx, tmp_path).path
    pd.read_parquet(run / rel).drop(columns=[column]).to_parquet(run / rel, index=False)
    with TestClient(create_app(run), base_url=LOCAL) as c:
        r = c.get(url, params=params)
    detail = r.json()["detail"]
    assert r.status_code == 503 and detail.startswith(f"{rel}: columns: lacks ['{column}']"), detail
    assert str(tmp_path) not in r.text


def test_barcodes_for_classify_are_read_by_their_writers_reader(fx, tmp_path):
    import pandas as pd

    from cytosae.steps import StepError
    from cytosae.steps.classify import read_barcodes

    run = copy_of(fx, tmp_path).path
    assert len(read_barcodes(run / "patients")) == len(pd.read_parquet(run / "patients" / patients.BARCODES))
    pd.read_parquet(run / "patients" / patients.BARCODES).drop(columns=["latent"]).to_parquet(
        run / "patients" / "other.parquet", index=False)
    with pytest.raises(StepError, match=r"other.parquet: columns: lacks \['latent'\]"):
        read_barcodes(run / "patients" / "other.parquet")


def test_an_edited_sae_config_is_refused_by_the_explorers_decoder_reader(fx, tmp_path):
    from cytosae.explorer.sae_adapter import read_decoder

    run = copy_of(fx, tmp_path).path
    assert read_decoder(run / "sae").shape == (fx.n_latents, fx.d)
    _edit(run, "sae/config.json", lambda c: c.update(normalize_inputs="no"))
    with pytest.raises(ValueError, match="config.json: field 'normalize_inputs' must be a valid boolean, got 'no'"):
        read_decoder(run / "sae")
    _edit(run, "sae/config.json", lambda c: c.update(normalize_inputs=True, lr=0.5))  # valid, but not what was sealed
    with pytest.raises(ValueError, match="differs from the config_sha256"):
        read_decoder(run / "sae")
    with TestClient(create_app(run), base_url=LOCAL) as c:
        r = c.get("/api/latents/0")
    # the latent page still shows (its neighbours are optional) and says why it has none
    error = r.json()["neighbours_error"]
    assert r.status_code == 200 and r.json()["neighbours"] == []
    assert error.startswith("sae/config.json: its content differs from the config_sha256")
    assert "cytosae train --run RUN" in error and str(tmp_path) not in r.text


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(n_latents=4096), "sae/config.json: its content differs from the config_sha256"),
    (lambda c: c.update(k="16"), "sae/config.json: field 'k' "),
    (lambda c: c.pop("checksums"), "sae/config.json: field 'checksums' is missing"),
])
def test_the_explorers_sae_config_is_read_through_the_saes_checked_reader(fx, tmp_path, edit, message):
    """/api/run and a notebook's sae_config read config.json as SAE.load does: an edited one is refused in one line
    naming the file (relative to the run) and the field, never shown as the run's SAE."""
    from cytosae.sae.model import read_config

    run = copy_of(fx, tmp_path).path
    with TestClient(create_app(run), base_url=LOCAL) as c:
        assert c.get("/api/run").json()["sae"] == read_config(run / "sae")
    _edit(run, "sae/config.json", edit)
    with TestClient(create_app(run), base_url=LOCAL) as c:
        r = c.get("/api/run")
    detail = r.json()["detail"]
    assert r.status_code == 503 and detail.startswith(message) and "\n" not in detail, detail
    assert "cytosae train --run RUN" in detail and str(tmp_path) not in r.text
    with pytest.raises(DamagedData) as err:
        open_run(run).sae_config
    assert str(err.value) == detail


@pytest.mark.parametrize("file, change, message", [
    ("predictions.parquet", lambda df: df.drop(columns=["model"]), "columns: lacks ['model']"),
    ("predictions.parquet", lambda df: df.drop(columns=["decided"]), "columns: lacks ['decided']"),
    ("predictions.parquet", lambda df: df.assign(p_AML=df.p_AML.round(3).astype(str)),
     "p_AML: must hold numbers, it holds str values ("),
    ("explanations.parquet", lambda df: df.assign(rank=df["rank"] + 0.5), "rank: must hold integers, it holds float64"),
])
def test_an_edited_classify_table_is_one_line_naming_file_and_column(fx, tmp_path, file, change, message):
    """classify/'s tables are read through read_classify_table (columns and their kinds), by notebooks and the
    explorer alike: a parquet lacking a column or holding text for numbers is named with the column."""
    import pandas as pd

    from cytosae.analysis.classify_results import read_classify_table

    run = copy_of(fx, tmp_path).path
    path = run / "classify" / file
    assert read_classify_table(run / "classify", file).equals(pd.read_parquet(path))
    change(pd.read_parquet(path)).to_parquet(path, index=False)
    with pytest.raises(InvalidFile) as err:
        read_classify_table(run / "classify", file)
    assert str(err.value).startswith(f"{path}: {message}") and "\n" not in str(err.value)
    assert str(err.value).endswith("rebuild it with `cytosae classify` (--run RUN: the same command)")
    with pytest.raises(DamagedData) as err:
        open_run(run).table(f"classify/{file.removesuffix('.parquet')}")
    assert str(err.value).startswith(f"classify/{file}: {message}") and "cytosae classify --run RUN" in str(err.value)
    assert str(tmp_path) not in str(err.value)
