"""Expert validation (issue #19 item 4): kappa against hand-computed values, the blinded API (order per expert,
resume, no other expert's answers or names), the description switch, a damaged database, the agreement CLI and
the export of the answers."""
import csv
import hashlib
import json
import os
import shutil
import sqlite3

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cytosae.analysis.agreement import agreement, cohen_kappa, fleiss_kappa, modal_share
from cytosae.cli import app as cli
from cytosae.explorer import create_app
from cytosae.explorer.annotations import AnnotationStore
from cytosae.explorer.validation import DESCRIPTIONS, ValidationStore, sample_latents
from cytosae.store.format import atomic_write_parquet
from explorer_fixtures import LOCAL, copy_of, session_run, write_descriptions_for

C, N, U = "coherent", "not_coherent", "unsure"


# ------------------------------------------------------------------ kappa, by hand
def test_cohen_kappa_hand_computed():
    assert cohen_kappa([C, N, U, C], [C, N, U, C]) == pytest.approx(1.0)       # perfect
    assert cohen_kappa([C, C, N, N], [C, N, C, N]) == pytest.approx(0.0)       # p_o = .5 = p_e: chance
    # p_o = 3/4; p_e = .5 * .25 + .5 * .75 = .5; (0.75 - 0.5) / 0.5
    assert cohen_kappa([C, C, N, N], [C, N, N, N]) == pytest.approx(0.5)
    # p_o = 3/5; p_e = 3/5*2/5 + 1/5*3/5 + 1/5*0 = 9/25; (15/25 - 9/25) / (16/25)
    assert cohen_kappa([C, C, C, N, U], [C, C, N, N, N]) == pytest.approx(0.375)
    assert cohen_kappa([C, N], [N, C]) == pytest.approx(-1.0)                  # p_o = 0, p_e = .5
    assert cohen_kappa([C, C, C], [C, C, C]) is None                           # p_e = 1: undefined
    with pytest.raises(ValueError, match="pair up"):
        cohen_kappa([C], [C, N])


# Fleiss (1971) as worked on Wikipedia: 10 subjects, 14 raters, 5 categories; P = 0.378, P_e = 0.213, kappa = 0.210
WIKI = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]


def test_fleiss_kappa_hand_computed():
    assert fleiss_kappa(WIKI) == pytest.approx(0.2099, abs=5e-4)
    assert fleiss_kappa([[3, 0], [0, 3]]) == pytest.approx(1.0)                # perfect
    assert fleiss_kappa([[2, 0], [0, 2], [1, 1], [1, 1]]) == pytest.approx(0.0)  # P = .5 = P_e: chance
    # P_i = (4 + 1 - 3) / 6 = 1/3 each; P_e = .5; (1/3 - 1/2) / (1/2)
    assert fleiss_kappa([[2, 1], [1, 2]]) == pytest.approx(-1 / 3)
    # the 3-expert example below: P = 5/12, P_e = 7/18, kappa = (1/36) / (11/18) = 1/22
    assert fleiss_kappa([[3, 0, 0], [2, 1, 0], [0, 2, 1], [1, 1, 1]]) == pytest.approx(1 / 22)
    assert fleiss_kappa([[3, 0], [3, 0]]) is None
    with pytest.raises(ValueError, match="same number"):
        fleiss_kappa([[3, 0], [1, 1]])
    assert modal_share([C, C, N]) == pytest.approx(2 / 3) and modal_share([U]) == 1.0


def test_agreement_summary_values():
    rows = [{"expert": e, "latent": j, "answer": a, "name": nm} for e, j, a, nm in [
        ("ana", 0, C, "Neutrophil granules"), ("ana", 1, C, "monocyte"), ("ana", 2, N, ""), ("ana", 3, N, ""),
        ("bea", 0, C, "lymph"), ("bea", 1, N, ""), ("bea", 2, N, ""), ("bea", 3, N, ""), ("bea", 9, C, "blast")]]
    desc = pd.DataFrame({"latent": [0, 1, 9], "text": ["a", "b", "c"], "best_class": ["neutrophil", None, "lymphocyte"]})
    s = agreement(rows, desc.set_index("latent"))
    assert s["kappa"] == {"method": "cohen", "value": pytest.approx(0.5), "latents": 4, "note": None}
    assert s["mean_agreement"] == pytest.approx((1 + 0.5 + 1 + 1) / 4) and s["latents_with_2_or_more"] == 4
    assert (s["coherent_latents"], s["latents_judged"]) == (2, 5)  # latent 0 (2 of 2) and 9 (1 of 1); 1 is a tie
    assert s["coherent_share"] == pytest.approx(0.4)
    assert s["names_vs_best_class"] == {"compared": 3, "matching": 1, "share": pytest.approx(1 / 3), "note": None}
    assert s["per_latent"][0]["tied"] is False
    assert s["per_latent"][1] == {"latent": 1, "n": 2, "modal": C, "tied": True, "agreement": 0.5,
                                  "counts": {C: 1, N: 1, U: 0}}


# ------------------------------------------------------------------ the API
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return copy_of(session_run(tmp_path_factory), tmp_path_factory.mktemp("validation"))


@pytest.fixture
def run(base, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(base.path, dst)
    return dst


def _pool(run) -> list[int]:
    return sorted(int(j) for j in pd.read_parquet(run / "stats" / "top_images.parquet")["latent"].unique())


def _order(c, expert) -> list[int]:
    n = c.get("/api/validation/session", params={"expert": expert}).json()["n"]
    return [c.get("/api/validation/item", params={"expert": expert, "position": i}).json()["latent"] for i in range(n)]


def _seeded(expert, latents) -> list[int]:
    seed = int.from_bytes(hashlib.sha256(expert.encode()).digest()[:8], "big")
    return np.random.default_rng(seed).permutation(sorted(latents)).tolist()


def test_order_is_fixed_per_expert_and_the_sample_shared(run):
    pool = _pool(run)
    with TestClient(create_app(run), base_url=LOCAL) as c:
        r = c.post("/api/validation/session", json={"expert": "  Ana  "})
        assert r.status_code == 200, r.text
        assert r.json() | {"created": None} == {"expert": "Ana", "n": len(pool), "answered": 0, "next": 0,
                                               "created": None, "started": True}
        ana = _order(c, "Ana")
        assert sorted(ana) == pool and ana == _seeded("Ana", pool)
        assert c.post("/api/validation/session", json={"expert": "Ana", "n": 3}).json()["started"] is False
        assert _order(c, "Ana") == ana  # resumed: the n of a later call does not reshuffle or shrink it
        for expert in ("Bea", "Cy"):
            assert c.post("/api/validation/session", json={"expert": expert, "n": 5}).status_code == 200
        bea, cy = _order(c, "Bea"), _order(c, "Cy")
    assert len(bea) == 5 and set(bea) == set(cy) == set(sample_latents(pool, 5))  # one sample for all
    assert bea != cy and bea == _seeded("Bea", bea)
    with TestClient(create_app(run), base_url=LOCAL) as c:  # restarted explorer
        assert _order(c, "Bea") == bea


def test_answers_are_saved_as_given_and_the_session_resumes(run):
    with TestClient(create_app(run), base_url=LOCAL) as c:
        c.post("/api/validation/session", json={"expert": "Ana", "n": 4})
        order = _order(c, "Ana")
        r = c.put("/api/validation/answer", json={"expert": "Ana", "latent": order[0], "answer": C, "name": " granules "})
        assert r.status_code == 200, r.text
        assert r.json()["name"] == "granules" and r.json()["session"]["next"] == 1
        c.put("/api/validation/answer", json={"expert": "Ana", "latent": order[2], "answer": U})
        r = c.put("/api/validation/answer", json={"expert": "Ana", "latent": order[0], "answer": N,
                                                  "saw_description": True})
        assert r.json()["session"] | {"created": None} == {"expert": "Ana", "n": 4, "answered": 2, "next": 1,
                                                           "created": None}
    with TestClient(create_app(run), base_url=LOCAL) as c:
        s = c.get("/api/validation/session", params={"expert": "Ana"}).json()
        assert (s["answered"], s["next"]) == (2, 1)  # the first position still open
        item = c.get("/api/validation/item", params={"expert": "Ana", "position": 0}).json()
        assert (item["answer"]["answer"], item["answer"]["name"], item["answer"]["saw_description"]) == (N, "", True)
        assert c.get("/api/validation/item", params={"expert": "Ana", "position": 1}).json()["answer"] is None
    rows = sqlite3.connect(run / "annotations.sqlite").execute(
        "SELECT expert, latent, answer, name, saw_description FROM validation_answers ORDER BY latent").fetchall()
    assert sorted(rows) == sorted([("Ana", order[0], N, "", 1), ("Ana", order[2], U, "", 0)])


def _texts(obj) -> str:
    return json.dumps(obj)


def test_validation_endpoints_never_show_other_experts_or_annotations(run):
    write_descriptions_for(run, _pool(run), "fires on granules", "neutrophil")
    with TestClient(create_app(run), base_url=LOCAL) as c:
        for expert in ("Ana Secret", "Bea"):
            c.post("/api/validation/session", json={"expert": expert, "n": 4})
        for j in _order(c, "Ana Secret"):
            c.put("/api/validation/answer", json={"expert": "Ana Secret", "latent": j, "answer": C, "name": "ANA-NAME"})
            c.put(f"/api/annotations/{j}", json={"name": "ANNOT-NAME", "tags": ["ANNOT-TAG"], "author": "ANNOT-AUTHOR"})
        seen = [c.get("/api/validation/session", params={"expert": "Bea"}).json(),
                c.post("/api/validation/session", json={"expert": "Bea"}).json()]
        for i, j in enumerate(_order(c, "Bea")):
            item = c.get("/api/validation/item", params={"expert": "Bea", "position": i}).json()
            assert item["answer"] is None and item["top_images"]
            assert all("label" not in im for by in item["top_images"].values() for ims in by.values() for im in ims)
            seen += [item, c.put("/api/validation/answer", json={"expert": "Bea", "latent": j, "answer": U}).json(),
                     c.get(f"/api/validation/description/{j}").json()]
        text = _texts(seen)
        for secret in ("Ana", "ANA-NAME", "ANNOT-NAME", "ANNOT-TAG", "ANNOT-AUTHOR"):
            assert secret not in text, secret
        assert seen[-1]["text"] == "fires on granules" and seen[-1]["best_class"] == "neutrophil"
        # the validation API has no way to list experts or everyone's answers
        paths = [p for p in c.get("/openapi.json").json()["paths"] if p.startswith("/api/validation")]
        assert sorted(paths) == ["/api/validation/answer", "/api/validation/description/{latent}",
                                 "/api/validation/item", "/api/validation/session"]


def test_bad_requests_say_what_is_wrong(run):
    with TestClient(create_app(run), base_url=LOCAL) as c:
        c.post("/api/validation/session", json={"expert": "Ana", "n": 2})
        outside = next(j for j in _pool(run) if j not in _order(c, "Ana"))
        cases = [
            ("put", "/api/validation/answer", {"expert": "Ana", "latent": outside, "answer": C}, 404, "not among"),
            ("put", "/api/validation/answer", {"expert": "Zed", "latent": 0, "answer": C}, 404, "start one"),
            ("put", "/api/validation/answer", {"expert": "Ana", "latent": 0, "answer": "maybe"}, 422, None),
            ("put", "/api/validation/answer", {"expert": "Ana", "latent": 0, "answer": C, "name": "x" * 201}, 422, None),
            ("post", "/api/validation/session", {"expert": ""}, 422, None),
            ("post", "/api/validation/session", {"expert": "   "}, 422, None),
            ("post", "/api/validation/session", {"expert": "A\x00"}, 422, None),
            ("post", "/api/validation/session", {"expert": "Ana", "n": 0}, 422, None),
        ]
        for method, path, body, status, words in cases:
            r = getattr(c, method)(path, json=body)
            assert r.status_code == status, (body, r.text)
            assert words is None or words in r.json()["detail"], r.text
        r = c.get("/api/validation/item", params={"expert": "Ana", "position": 2})
        assert r.status_code == 404 and "0..1" in r.json()["detail"]
        assert c.get("/api/validation/session", params={"expert": " "}).status_code == 422
        r = c.get("/api/validation/session", params={"expert": "Nobody"})
        assert r.status_code == 404 and "no validation session" in r.json()["detail"]
        r = c.get("/api/validation/description/0")
        assert r.status_code == 404 and r.json()["detail"] == "no description: run cytosae describe"
        (run / "concepts").mkdir()
        (run / DESCRIPTIONS).write_bytes(b"not parquet")
        r = c.get("/api/validation/description/0")
        assert r.status_code == 503 and "concepts/descriptions.parquet" in r.json()["detail"]
        atomic_write_parquet(run / DESCRIPTIONS, pd.DataFrame({"latent": [1], "text": ["x"]}))
        r = c.get("/api/validation/description/1")
        assert r.status_code == 503 and "'best_class'" in r.json()["detail"]


def test_tables_are_added_beside_the_annotations_without_touching_them(run):
    db = run / "annotations.sqlite"
    AnnotationStore(db).put(5, name="blast", status="validated")
    before = sqlite3.connect(db).execute("SELECT * FROM annotations").fetchall()
    with TestClient(create_app(run), base_url=LOCAL) as c:
        c.post("/api/validation/session", json={"expert": "Ana"})
    con = sqlite3.connect(db)
    names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert names == {"annotations", "validation_sessions", "validation_answers"}
    assert con.execute("SELECT * FROM annotations").fetchall() == before


def test_a_damaged_database_stays_as_it_is(run):
    db = run / "annotations.sqlite"
    db.write_bytes(os.urandom(8192))
    before = db.read_bytes()
    with TestClient(create_app(run), base_url=LOCAL) as c:
        r = c.post("/api/validation/session", json={"expert": "Ana"})
        assert r.status_code == 503 and "annotations.sqlite" in r.json()["detail"], r.text
        r = c.put("/api/validation/answer", json={"expert": "Ana", "latent": 0, "answer": C})
        assert r.status_code == 503
        assert c.get("/api/validation/session", params={"expert": "Ana"}).status_code == 404
        assert c.get("/api/run").json()["annotations_error"]
    assert db.read_bytes() == before
    res = CliRunner().invoke(cli, ["annotations", "agreement", str(run)])
    assert res.exit_code == 2 and "annotations.sqlite" in res.output


# ------------------------------------------------------------------ the CLI
def _answer_all(run, plan: dict[str, list[str]], names: dict[str, list[str]] | None = None) -> list[int]:
    """Each expert answers the same 4 latents (sorted) with plan[expert]; through the store the API writes with."""
    vs = ValidationStore(run / "annotations.sqlite")
    latents = sorted(sample_latents(_pool(run), 4))
    for expert, answers in plan.items():
        vs.start(expert, latents)
        for k, (j, a) in enumerate(zip(latents, answers)):
            vs.answer(expert, j, a, (names or {}).get(expert, [""] * 4)[k])
    return latents


def test_agreement_cli_two_experts(run):
    latents = _answer_all(run, {"ana": [C, C, N, N], "bea": [C, N, N, N]},
                          {"ana": ["Neutrophil granules", "", "", ""], "bea": ["lymph", "", "", ""]})
    res = CliRunner().invoke(cli, ["annotations", "agreement", str(run)])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == [
        "2 experts, 8 answers, 4 latents judged",
        "Cohen's kappa 0.500 over 4 latents judged by every expert",
        "mean per-latent agreement (share giving the modal answer): 0.875 over 4 latents with 2 or more answers",
        "judged coherent (by more than half of their experts): 1 of 4 latents (0.250)",
        "names agreeing with the description's best class: 0 of 0 (–) (no description: run cytosae describe)"]
    write_descriptions_for(run, latents, "t", ["neutrophil", None, None, None])
    res = CliRunner().invoke(cli, ["annotations", "agreement", str(run), "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.output)
    assert s["experts"] == ["ana", "bea"] and s["kappa"]["value"] == pytest.approx(0.5)
    assert s["names_vs_best_class"] == {"compared": 2, "matching": 1, "share": 0.5, "note": None}
    assert [p["agreement"] for p in s["per_latent"]] == [1.0, 0.5, 1.0, 1.0]


def test_agreement_cli_three_experts_is_fleiss(run):
    _answer_all(run, {"a": [C, C, N, U], "b": [C, C, N, N], "c": [C, N, U, C]})  # counts of the 1/22 example
    res = CliRunner().invoke(cli, ["annotations", "agreement", str(run), "--json"])
    assert res.exit_code == 0, res.output
    k = json.loads(res.output)["kappa"]
    assert k["method"] == "fleiss" and k["value"] == pytest.approx(1 / 22) and k["latents"] == 4


def test_agreement_cli_without_answers(run):
    res = CliRunner().invoke(cli, ["annotations", "agreement", str(run)])
    assert res.exit_code == 2 and "no annotations" in res.output  # no annotations.sqlite at all
    AnnotationStore(run / "annotations.sqlite")
    res = CliRunner().invoke(cli, ["annotations", "agreement", str(run)])
    assert res.exit_code == 2 and "no validation answers" in res.output


def test_export_carries_the_answers(run, tmp_path):
    AnnotationStore(run / "annotations.sqlite").put(1, name="=cmd|calc")
    latents = _answer_all(run, {"ana": [C, N, U, C]}, {"ana": ["=HYPERLINK(1)", "+x", "plain", ""]})
    res = CliRunner().invoke(cli, ["annotations", "export", str(run), "--format", "csv", "--out", str(tmp_path / "a.csv")])
    assert res.exit_code == 0, res.output
    assert "4 validation answers" in res.output and "a.validation.csv" in res.output
    assert list(csv.DictReader((tmp_path / "a.csv").open()))[0]["name"] == "'=cmd|calc"
    rows = list(csv.DictReader((tmp_path / "a.validation.csv").open()))
    assert [(int(r["latent"]), r["answer"], r["name"]) for r in rows] == [
        (latents[0], C, "'=HYPERLINK(1)"), (latents[1], N, "'+x"), (latents[2], U, "plain"), (latents[3], C, "")]
    res = CliRunner().invoke(cli, ["annotations", "export", str(run), "--format", "json", "--out", str(tmp_path / "a.json")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["annotations"][0]["name"] == "=cmd|calc"
    assert [(v["expert"], v["answer"], v["name"]) for v in data["validation"]][:2] == [("ana", C, "=HYPERLINK(1)"),
                                                                                      ("ana", N, "+x")]
