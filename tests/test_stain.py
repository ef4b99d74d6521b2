"""Stain normalisation (torchstain Macenko / Reinhard) as part of the one Preprocess and of `cytosae extract`."""
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from torchstain.numpy.utils.rgb2lab import rgb2lab
from typer.testing import CliRunner

from cytosae.cli import app
from cytosae.data import Preprocess, open_rgb
from cytosae.data.stain import Stain, StainError, fit_stain
from cytosae.data.synthetic import make_sample

REPO = Path(__file__).resolve().parents[1]
ACEVEDO = (REPO / ".." / "shared" / "data" / "acevedo").resolve()


def _lab_means(img: Image.Image) -> np.ndarray:
    """Per-channel CIELAB means (L 0..100, a and b around 0), the scale torchstain's Reinhard matches in."""
    lab = rgb2lab(np.asarray(img, dtype=np.float32) / 255).reshape(-1, 3)  # OpenCV's 8-bit LAB scale
    return lab.mean(axis=0) / np.array([2.55, 1, 1]) - np.array([0, 128, 128])


@pytest.fixture(scope="module")
def two_images(tmp_path_factory) -> tuple[Path, Path]:
    """A reference and another cell image: real Acevedo cells when ../shared/data is there, else synthetic."""
    if (ACEVEDO / "manifest.csv").is_file():
        paths = pd.read_csv(ACEVEDO / "manifest.csv")["path"]
        return ACEVEDO / paths.iloc[0], ACEVEDO / paths.iloc[len(paths) // 2]
    manifest = make_sample(tmp_path_factory.mktemp("cells"), n_patients=2, cells_per_patient=1, size=96)
    paths = pd.read_csv(manifest)["path"]
    return manifest.parent / paths.iloc[0], manifest.parent / paths.iloc[1]


def _shifted(img: Image.Image) -> Image.Image:
    """A colour-cast copy, as another lab's stain or scanner would give: red up, blue down, darker."""
    a = np.asarray(img, dtype=np.float32) * np.array([1.0, 0.8, 0.6]) + np.array([25.0, 0.0, 0.0])
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")


def test_reinhard_moves_lab_means_to_the_reference_and_macenko_changes_the_image(two_images):
    ref_path, other_path = two_images
    ref, shifted = open_rgb(ref_path), _shifted(open_rgb(other_path))
    target = _lab_means(ref)
    reinhard = fit_stain("reinhard", ref_path)
    np.testing.assert_allclose(reinhard.params["target_means"], target, atol=0.05)
    before = np.abs(_lab_means(shifted) - target)
    after = np.abs(_lab_means(reinhard.apply(shifted)) - target)
    assert before.max() > 5  # the cast is large in LAB
    assert after.max() < 1.5, (before, after)  # uint8 rounding and clipping leave about a unit
    assert (after < before / 4).all()

    macenko = fit_stain("macenko", ref_path)
    assert np.asarray(macenko.params["stain_matrix"]).shape == (3, 2)
    assert np.asarray(macenko.params["max_concentrations"]).shape == (2,)
    out = macenko.apply(shifted)
    assert out.size == shifted.size and out.mode == "RGB"
    assert np.abs(np.asarray(out, float) - np.asarray(shifted, float)).mean() > 3


def test_preprocess_dict_round_trips_the_fitted_parameters(two_images, tmp_path):
    ref_path, other_path = two_images
    for method in ("reinhard", "macenko"):
        pre = Preprocess(stain=fit_stain(method, ref_path))
        d = json.loads(json.dumps(pre.to_dict()))  # as manifest.json stores it
        assert d["stain"]["method"] == method and len(d["stain"]["reference_sha256"]) == 64
        assert "path" not in json.dumps(d["stain"])  # numbers, not a reference path: a moved run reproduces it
        back = Preprocess.from_dict(d)
        assert back == pre and back.to_dict() == d
        img = open_rgb(other_path)
        assert np.array_equal(np.asarray(back.resize_image(img)), np.asarray(pre.resize_image(img)))
        other = Preprocess(stain=fit_stain(method, other_path)).to_dict()
        assert other != d and other["stain"]["params"] != d["stain"]["params"]
    # stores written before stains existed: no key, no stain; and no key written without one (they still resume)
    old = {"size": 224, "resize": "squash", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert Preprocess.from_dict(old).stain is None and Preprocess.from_dict(old).to_dict() == old
    with pytest.raises(ValueError, match="reinhard stain parameters"):
        Stain("reinhard", {"stain_matrix": [[1, 0], [0, 1], [0, 0]]}, "0" * 64)


def test_the_explorer_view_shows_the_normalised_colours(two_images):
    ref_path, other_path = two_images
    img = _shifted(open_rgb(other_path))
    pre = Preprocess(stain=fit_stain("reinhard", ref_path))
    view = pre.resize_image(img)
    assert view.size == (224, 224)
    assert np.abs(_lab_means(view) - _lab_means(open_rgb(ref_path))).max() < 2
    assert not np.array_equal(np.asarray(view), np.asarray(Preprocess().resize_image(img)))


def test_a_blank_image_keeps_its_colours_with_a_warning(two_images, caplog):
    blank = Image.new("RGB", (80, 80), (255, 255, 255))
    for method in ("reinhard", "macenko"):
        stain = fit_stain(method, two_images[0])
        with pytest.raises(StainError):
            stain.apply(blank)
        with caplog.at_level(logging.WARNING, logger="cytosae.data.images"):
            x = Preprocess(stain=stain)(blank, "blank.png")
        assert np.array_equal(x.numpy(), Preprocess()(blank).numpy())
        assert f"{method} stain normalisation failed on blank.png" in caplog.text
        caplog.clear()


def _extract(data: Path, out: Path, *extra) -> object:
    args = ["extract", str(data), "--out", str(out), "--backbone", "dinobloom-s", "--layer", "0",
            "--batch-size", "2", "--shard-size", "4", "--workers", "0", *map(str, extra)]
    return CliRunner().invoke(app, args)


def test_extract_records_the_stain_and_refuses_another_reference(tmp_path, caplog):
    manifest = make_sample(tmp_path / "cells", n_patients=2, cells_per_patient=2, size=64)
    rows = pd.read_csv(manifest)
    ref, other = manifest.parent / rows["path"][0], manifest.parent / rows["path"][3]
    blank = manifest.parent / "P001" / "blank.png"  # a white frame: nothing to normalise
    Image.new("RGB", (64, 64), (255, 255, 255)).save(blank)
    rows = pd.concat([rows, rows.iloc[[3]].assign(path="P001/blank.png")], ignore_index=True)
    rows.to_csv(manifest, index=False)

    with caplog.at_level(logging.WARNING, logger="cytosae.data.images"):
        res = _extract(manifest, tmp_path / "store", "--stain", "reinhard", "--stain-reference", ref)
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "store" / "manifest.json").read_text())
    recorded = meta["settings"]["preprocessing"]["stain"]
    assert recorded == fit_stain("reinhard", ref).to_dict()
    assert len(recorded["params"]["target_means"]) == 3 and len(recorded["params"]["target_stds"]) == 3
    assert meta["complete"] and meta["n_images"] == 5 and meta["n_skipped"] == 0  # the blank one is kept
    assert "reinhard stain normalisation failed on" in caplog.text and "blank.png" in caplog.text

    same = _extract(manifest, tmp_path / "store", "--stain", "reinhard", "--stain-reference", ref)
    assert same.exit_code == 0 and "0 unreadable images skipped" in same.output, same.output  # the same fit resumes

    again = _extract(manifest, tmp_path / "store", "--stain", "reinhard", "--stain-reference", other)
    assert again.exit_code == 2
    errors = [line for line in again.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "different settings (preprocessing)" in errors[0], again.output
    assert "Traceback" not in again.output

    missing = _extract(manifest, tmp_path / "other", "--stain", "macenko")
    assert missing.exit_code == 2 and missing.output.startswith("error: --stain macenko needs --stain-reference")
    assert len(missing.output.strip().splitlines()) == 1
    bad = _extract(manifest, tmp_path / "other", "--stain", "reinhard", "--stain-reference", tmp_path / "no.png")
    assert bad.exit_code == 2 and "stain reference" in bad.output and "file not found" in bad.output
    flat = _extract(manifest, tmp_path / "other", "--stain", "reinhard", "--stain-reference", blank)
    assert flat.exit_code == 2 and flat.output.startswith("error: stain reference") and "uniform colour" in flat.output
    flat = _extract(manifest, tmp_path / "other", "--stain", "macenko", "--stain-reference", blank)
    assert flat.exit_code == 2 and "no stained pixels" in flat.output, flat.output
    assert not (tmp_path / "other" / "manifest.json").exists()


def test_explorer_uploads_use_the_stores_stain(tmp_path):
    """An upload is encoded with the store's colour normalisation, as its cells were."""
    from safetensors.torch import save_file

    from cytosae.backbones import load_backbone
    from cytosae.explorer.activations import Encoder
    from cytosae.explorer.rundir import RunDir

    manifest = make_sample(tmp_path / "cells", n_patients=2, cells_per_patient=1, size=64)
    ref = manifest.parent / pd.read_csv(manifest)["path"][0]
    weights = tmp_path / "w.safetensors"  # uploads need a backbone with known weights
    save_file({k: v.contiguous() for k, v in load_backbone("dinobloom-s", seed=3).model.state_dict().items()}, weights)
    res = CliRunner().invoke(app, ["extract", str(manifest), "--run", str(tmp_path / "run"), "--name", "cells",
                                   "--backbone", "dinobloom-s", "--weights", str(weights), "--layer", "0",
                                   "--workers", "0", "--stain", "reinhard", "--stain-reference", str(ref)])
    assert res.exit_code == 0, res.output
    step = json.loads((tmp_path / "run" / "run.json").read_text())["steps"]["extract:cells"]
    assert step["settings"]["stain"] == "reinhard"
    assert step["inputs"]["stain_reference"]["sha256"] == fit_stain("reinhard", ref).reference_sha256
    bb, _ = Encoder(RunDir(tmp_path / "run")).backbone()
    assert bb.preprocess_config.stain == fit_stain("reinhard", ref)
    img = _shifted(open_rgb(manifest.parent / pd.read_csv(manifest)["path"][1]))
    assert np.array_equal(bb.preprocess(img).numpy(), Preprocess(stain=fit_stain("reinhard", ref))(img).numpy())
