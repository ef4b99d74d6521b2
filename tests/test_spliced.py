"""`cytosae evaluate --spliced`: the SAE spliced into the backbone after the store's block (analysis/spliced.py).

The store is written by the real `extract` from synthetic cells with a 2-block random-weight dinobloom-s, tokens
after block 0 in float32, so one block and the final norm remain to be run.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cytosae.analysis.spliced import backbone_for_store, check_backbone, group_means, spliced_faithfulness
from cytosae.backbones import load_backbone
from cytosae.data import load_manifest
from cytosae.data.decode import open_rgb
from cytosae.data.synthetic import make_sample
from cytosae.store import ActivationStore, ExtractConfig, extract

DEPTH, SEED = 2, 0
pytestmark = pytest.mark.filterwarnings("ignore:dinobloom-s. no weights given")


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("dinobloom-s", depth=DEPTH, seed=SEED)


@pytest.fixture(scope="module")
def store(tmp_path_factory, backbone):
    root = tmp_path_factory.mktemp("spliced")
    csv = make_sample(root / "data", seed=0, n_patients=4, cells_per_patient=4, size=64)
    extract(load_manifest(csv), backbone, root / "store",
            ExtractConfig(layer=0, dtype="float32", batch_size=8, shard_size=8, progress=False))
    return ActivationStore(root / "store")


def test_clean_tokens_through_the_remaining_blocks_are_the_backbones_own_output(backbone, store):
    """timm's own full forward (forward_features: all blocks + final norm) on the images, against the stored
    block-0 tokens pushed through block 1 and the norm. Float32 store, same ops on CPU: atol 1e-5."""
    ids = store.image_ids[:6]
    x = torch.stack([backbone.preprocess(open_rgb(store.image_file(i))) for i in ids])
    with torch.inference_mode():
        own = backbone.model.forward_features(x)
    stored = torch.stack([store.get_image(i) for i in ids])
    assert check_backbone(backbone, store) == 0
    spliced = backbone.finish(stored, 0)
    assert spliced.shape == own.shape == (6, 257, 384)
    torch.testing.assert_close(spliced, own, atol=1e-5, rtol=0)
    # and the stored tokens are not already the final output: the remaining block does change them
    assert (own - stored).abs().max() > 1e-2


def test_identity_reconstruction_recovers_one_and_the_control_zero(backbone, store):
    identity = spliced_faithfulness(backbone, store, reconstruct=lambda t: t.clone())
    assert identity["n_images"] == store.n_images == 16
    assert identity["backbone"]["remaining_blocks"] == [1] and identity["backbone"]["layer_index"] == 0
    for g in ("cls", "patch"):
        assert identity["output"]["spliced"][g]["relative_l2"] == 0.0
        assert identity["output"]["spliced"][g]["cosine"] == pytest.approx(1.0, abs=1e-12)
        assert identity["fvu"][g] == 0.0
        assert identity["output"]["control"][g]["relative_l2"] > 0.05  # the control does lose the image
    assert set(identity["downstream"]) == {"label", "diagnosis"}
    label = identity["downstream"]["label"]
    assert label["folds"] == "4-fold grouped by patient_id" and label["n_images"] == 16
    for model in ("knn", "probe"):
        acc = label[model]
        assert acc["clean"] == acc["spliced"]
        if acc["clean"] != acc["control"]:
            assert acc["recovered"] == 1.0
        else:
            assert acc["recovered"] is None

    means = group_means(store)
    tokens = np.stack([store.get_image(i).numpy() for i in store.image_ids]).astype(np.float64)
    np.testing.assert_allclose(means["cls"].numpy(), tokens[:, 0].mean(0), atol=1e-5)
    np.testing.assert_allclose(means["patch"].numpy(), tokens[:, 1:].reshape(-1, 384).mean(0), atol=1e-5)

    def to_means(t):
        return torch.cat([means["cls"].expand(t.shape[0], 1, -1), means["patch"].expand(t.shape[0], 256, -1)], 1)

    warned = []
    control = spliced_faithfulness(backbone, store, reconstruct=to_means, warn=warned.append)
    for g in ("cls", "patch"):
        assert control["output"]["spliced"][g] == control["output"]["control"][g]
        assert control["fvu"][g] == pytest.approx(1.0, abs=1e-6)  # the mean explains nothing, by definition
    for col in ("label", "diagnosis"):
        for model in ("knn", "probe"):
            acc = control["downstream"][col][model]
            assert acc["spliced"] == acc["control"]
            assert acc["recovered"] in (0.0, None)
            assert acc["clean"] == identity["downstream"][col][model]["clean"]
    assert control["downstream"]["label"]["probe"]["recovered"] == 0.0  # clean beats the control here
    assert not warned or all("does not represent" in w for w in warned)

    def worse(t):
        return to_means(t) * 3.0  # farther from every token than the mean: FVU > 1

    warned = []
    spliced_faithfulness(backbone, store, reconstruct=worse, max_images=8, warn=warned.append)
    assert len(warned) == 2 and "the SAE does not represent the CLS token" in warned[0] and "8 images" in warned[0]


def test_another_backbone_is_refused_in_one_line(store):
    for other, says in ((load_backbone("dinobloom-s", depth=DEPTH, seed=1), "seed 0, this backbone's were drawn with seed 1"),
                        (load_backbone("dinobloom-s", depth=3, seed=SEED), "2-block backbone")):
        with pytest.raises(ValueError, match=says) as err:
            spliced_faithfulness(other, store, reconstruct=lambda t: t)
        assert "\n" not in str(err.value) and str(store.path) in str(err.value)
    # the store's own record rebuilds the right one: same seed, options from the run's spec
    assert backbone_for_store(store, {"options": {"depth": DEPTH}}).seed == SEED
    with pytest.raises(ValueError, match="2-block"):
        backbone_for_store(store, {"options": {"depth": 1}})


def test_cli_evaluate_spliced_writes_the_json_and_prints_the_lines(tmp_path):
    from typer.testing import CliRunner

    from cytosae.cli import app
    from explorer_fixtures import make_pipeline_run

    run = make_pipeline_run(tmp_path)
    res = CliRunner().invoke(app, ["evaluate", "--run", str(run), "--spliced", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    out = run / "sae" / "eval.spliced.json"
    figures = json.loads(out.read_text())
    assert figures["n_images"] == 16 and figures["dataset"] == "sample" and figures["store"] == "stores/sample"
    assert figures["backbone"]["layer_index"] == 0 and figures["backbone"]["remaining_blocks"] == []
    assert 0 < figures["output"]["spliced"]["cls"]["cosine"] <= 1 + 1e-9
    assert set(figures["downstream"]) >= {"label"}
    text = res.output
    assert "spliced: SAE reconstruction of block 0 tokens through no block + final norm of dinobloom-s (1-block, RANDOM weights, seed 0)" in text
    assert "on sample, 16 images" in text and "final CLS" in text and "recovered" in text
    assert f"JSON -> {out}" in text
    assert json.loads((run / "run.json").read_text())["steps"]["evaluate"]["settings"]["spliced"] is True

    bad = CliRunner().invoke(app, ["evaluate", "--run", str(run), "--weights", str(out)])
    assert bad.exit_code != 0 and "--weights is the backbone's, for --spliced only" in bad.output
    plain = CliRunner().invoke(app, ["evaluate", "--run", str(run), "--device", "cpu"])
    assert plain.exit_code == 0 and "spliced:" not in plain.output and "eval.spliced.json" not in plain.output
    assert (run / "sae" / "eval.json").is_file() and not out.exists()  # no stale figures beside the new eval.json


def test_a_store_of_trained_weights_needs_the_same_weights_file(tmp_path, backbone):
    from safetensors.torch import save_file

    files = []
    for seed in (0, 1):  # two different "trained" weight files
        bb = load_backbone("dinobloom-s", depth=DEPTH, seed=seed)
        files.append(tmp_path / f"w{seed}.safetensors")
        save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, files[-1])
    csv = make_sample(tmp_path / "data", seed=0, n_patients=2, cells_per_patient=2, size=64)
    trained = load_backbone("dinobloom-s", weights=files[0], depth=DEPTH)
    extract(load_manifest(csv), trained, tmp_path / "store", ExtractConfig(layer=0, dtype="float32", progress=False))
    st = ActivationStore(tmp_path / "store")
    options = {"options": {"depth": DEPTH}}
    assert backbone_for_store(st, options, weights=files[0]).weights_sha256 == trained.weights_sha256
    for spec, weights, says in ((options, None, "pass --weights the file"),
                                (options, files[1], f"sha256 {trained.weights_sha256[:12]}, this backbone has sha256")):
        with pytest.raises(ValueError, match=says) as err:
            backbone_for_store(st, spec, weights=weights)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="this backbone has RANDOM weights"):
        check_backbone(backbone, st)


def test_an_imported_store_has_no_backbone_to_splice_into(tmp_path, backbone):
    import pandas as pd

    from cytosae.store import import_embeddings

    np.save(tmp_path / "e.npy", np.random.default_rng(0).normal(size=(3, 257, 384)).astype(np.float32))
    import_embeddings(tmp_path / "e.npy", pd.DataFrame({"image_id": ["a", "b", "c"]}), tmp_path / "store")
    st = ActivationStore(tmp_path / "store")
    for call in (lambda: backbone_for_store(st), lambda: check_backbone(backbone, st)):
        with pytest.raises(ValueError, match="was imported, not extracted by cytosae") as err:
            call()
        assert "\n" not in str(err.value)
