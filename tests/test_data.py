"""Data in: three manifest layouts, decoding of every image kind, failures reported, preprocessing, sample."""
import hashlib

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cytosae.data import (IMAGENET_MEAN, IMAGENET_STD, ImageDataset, ImageDecodeError, Preprocess, collate_skipping,
                          load_manifest, open_rgb)
from cytosae.data.synthetic import make_sample


def _png(path, colour=(200, 100, 50), size=(30, 20), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def test_class_tree_manifest_has_stable_ids_and_labels(tmp_path):
    _png(tmp_path / "b_cls" / "x.png")
    _png(tmp_path / "a_cls" / "y.JPG".lower())
    _png(tmp_path / "a_cls" / ".hidden.png")
    (tmp_path / "a_cls" / "notes.txt").write_text("no")
    m = load_manifest(tmp_path)
    assert m.image_id.tolist() == ["a_cls/y.jpg", "b_cls/x.png"] and m.label.tolist() == ["a_cls", "b_cls"]
    assert m.patient_id.tolist() == [None, None] and all(p.startswith("/") for p in m.path)


def test_patient_tree_merges_patients_table_and_names_missing(tmp_path):
    _png(tmp_path / "cells" / "P1" / "blast" / "a.png")
    _png(tmp_path / "cells" / "P2" / "b.png")
    pd.DataFrame({"patient_id": ["P1", "P2"], "diagnosis": ["APL", "AML"], "age": [30, 40]}).to_csv(tmp_path / "p.csv", index=False)
    m = load_manifest(tmp_path / "cells", patients=tmp_path / "p.csv")
    assert m.patient_id.tolist() == ["P1", "P2"] and m.diagnosis.tolist() == ["APL", "AML"]
    assert m.label.tolist() == ["blast", None] and m.age.tolist() == ["30", "40"]
    pd.DataFrame({"patient_id": ["P1"]}).to_csv(tmp_path / "p1.csv", index=False)
    with pytest.raises(ValueError, match=r"\['P2'\] have no row in .*p1.csv"):
        load_manifest(tmp_path / "cells", patients=tmp_path / "p1.csv")


def test_csv_manifest_keeps_extra_columns_and_explains_errors(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    pd.DataFrame({"path": ["imgs/a.png"], "label": ["lymphocyte"], "stain": ["MGG"]}).to_csv(tmp_path / "m.csv", index=False)
    m = load_manifest(tmp_path / "m.csv")
    assert m.image_id.tolist() == ["imgs/a.png"] and m.stain.tolist() == ["MGG"] and m.label.tolist() == ["lymphocyte"]
    pd.DataFrame({"file": ["a.png"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match=r"bad.csv has no 'path' column \(it has \['file'\]\)"):
        load_manifest(tmp_path / "bad.csv")
    pd.DataFrame({"path": ["imgs/a.png", "imgs/a.png"]}).to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(ValueError, match="duplicate image ids"):
        load_manifest(tmp_path / "dup.csv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        load_manifest(tmp_path / "empty")


def test_every_image_kind_becomes_rgb(tmp_path):
    _png(tmp_path / "l.png", 128, mode="L")
    Image.new("P", (10, 10), 3).save(tmp_path / "p.png")
    Image.new("RGBA", (10, 10), (255, 0, 0, 0)).save(tmp_path / "rgba.png")  # fully transparent -> white
    Image.fromarray(np.full((8, 8), 1000, np.uint16).reshape(8, 8) + np.arange(8, dtype=np.uint16)[None] * 100).save(tmp_path / "t16.tif")
    Image.new("CMYK", (10, 10), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    assert open_rgb(tmp_path / "l.png").getpixel((0, 0)) == (128, 128, 128)
    assert open_rgb(tmp_path / "p.png").mode == "RGB"
    assert open_rgb(tmp_path / "rgba.png").getpixel((0, 0)) == (255, 255, 255)
    t16 = np.asarray(open_rgb(tmp_path / "t16.tif"))
    assert t16.dtype == np.uint8 and t16[0, 0, 0] == 0 and t16[0, 7, 0] == 255  # stretched over its own range
    assert open_rgb(tmp_path / "cmyk.jpg").mode == "RGB"


def test_bad_files_raise_decode_errors_with_reasons(tmp_path):
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    good = _png(tmp_path / "good.png", size=(64, 64))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(tmp_path / "full.jpg")
    (tmp_path / "trunc.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:300])
    reasons = {}
    for name in ["zero.jpg", "text.jpg", "trunc.jpg", "missing.png"]:
        with pytest.raises(ImageDecodeError) as e:
            open_rgb(tmp_path / name)
        reasons[name] = e.value.reason
        assert e.value.path.endswith(name)
    assert reasons["zero.jpg"] == "zero-byte file" and "not an image" in reasons["text.jpg"]
    assert "truncated" in reasons["trunc.jpg"] and reasons["missing.png"] == "file not found"

    manifest = pd.DataFrame({"path": [str(good), str(tmp_path / "text.jpg"), str(good)]})
    items = [ImageDataset(manifest, Preprocess(size=28))[i] for i in range(3)]
    idx, x, skipped = collate_skipping(items)
    assert idx.tolist() == [0, 2] and x.shape == (2, 3, 28, 28) and skipped[0][0] == 1


@pytest.mark.parametrize("policy", ["squash", "pad", "crop"])
def test_preprocess_policies_shape_and_normalisation(policy):
    white = Image.new("RGB", (300, 100), (255, 255, 255))
    x = Preprocess(resize=policy)(white)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[:, 112, 112], expected)
    assert Preprocess.from_dict(Preprocess(resize=policy).to_dict()) == Preprocess(resize=policy)


def test_pad_letterboxes_and_crop_cuts():
    img = Image.new("RGB", (200, 100), (0, 0, 0))  # black, wide
    pad = Preprocess(size=20, resize="pad", mean=(0, 0, 0), std=(1, 1, 1))(img)
    assert pad[0, 0, 10] == 1.0 and pad[0, 10, 10] == 0.0  # white bars above, image in the middle
    crop = Preprocess(size=20, resize="crop", mean=(0, 0, 0), std=(1, 1, 1))(img)
    assert crop.max() == 0.0
    with pytest.raises(ValueError, match="resize must be one of"):
        Preprocess(resize="stretch")


def test_synthetic_sample_is_deterministic_and_records_factors(tmp_path):
    a = make_sample(tmp_path / "a", seed=3, n_patients=4, cells_per_patient=5)
    b = make_sample(tmp_path / "b", seed=3, n_patients=4, cells_per_patient=5)
    ma, mb = pd.read_csv(a), pd.read_csv(b)
    assert len(ma) == 20 and ma.equals(mb)
    digest = lambda root, m: [hashlib.sha256((root / p).read_bytes()).hexdigest() for p in m.path]
    assert digest(a.parent, ma) == digest(b.parent, mb)
    for col in ["label", "patient_id", "diagnosis", "nucleus_shape", "lobes", "granule_colour", "granule_density",
                "cytoplasm_colour", "background", "size_px"]:
        assert ma[col].notna().all(), col
    assert set(ma.diagnosis) == {"APL", "AML"} and ma.groupby("patient_id").diagnosis.nunique().max() == 1
    m = load_manifest(a)
    assert len(m) == 20 and m.image_id[0] == "P000/cell_000.png"
    c = make_sample(tmp_path / "c", seed=4, n_patients=4, cells_per_patient=5)
    assert digest(c.parent, pd.read_csv(c)) != digest(a.parent, ma)


def test_synthetic_independent_factors_are_not_the_class_in_disguise(tmp_path):
    m = pd.read_csv(make_sample(tmp_path / "s", seed=0, n_patients=6, cells_per_patient=20))
    for factor, values in (("cytoplasm_colour", {"pale", "blue", "grey"}), ("background", {"pink", "lilac", "white"})):
        assert set(m[factor]) == values
        per_class = m.groupby("label")[factor].nunique()
        assert (per_class[m.label.value_counts()[per_class.index] >= 10] == 3).all(), (factor, per_class)
    assert (m.groupby("label").nucleus_shape.nunique() == 1).all()  # class-bound factors stay bound
    img = np.asarray(Image.open(tmp_path / "s" / m.path[0]))
    from cytosae.data.synthetic import BACKGROUND_RGB
    assert np.abs(img[2, 2].astype(int) - BACKGROUND_RGB[m.background[0]]).max() <= 2  # the corner shows the background


def test_real_acevedo_manifest_decodes(shared_data):
    m = load_manifest(shared_data / "acevedo" / "manifest.csv")
    assert len(m) > 2000 and m.label.nunique() == 13 and "coarse_label" in m.columns
    for p in m.path[::700]:
        assert Preprocess()(open_rgb(p)).shape == (3, 224, 224)
