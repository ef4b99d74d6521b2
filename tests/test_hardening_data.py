"""Hardening of data in (issue #12): odd files reach skipped.csv under their image id, pixel budget, bad manifests."""
import os
import re
import zlib
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cytosae.data import ImageDecodeError, load_manifest, open_rgb
from cytosae.data.manifest import ManifestError


def _png(path: Path, size=(30, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def huge_png(path: Path, side: int = 13000) -> Path:
    """A valid, all-black grayscale PNG of side x side pixels written row by row: ~169 MP in ~164 KB."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + one byte per pixel
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def odd_tree(root: Path) -> Path:
    """A class tree holding one good image and every kind of entry that is not a readable regular image."""
    _png(root / "blast" / "good.png")
    cls = root / "blast"
    os.symlink("self.jpg", cls / "self.jpg")                  # a link to itself
    os.symlink("b.jpg", cls / "a.jpg")                        # a two-link cycle
    os.symlink("a.jpg", cls / "b.jpg")
    os.symlink("gone.png", cls / "dangling.png")              # target missing
    os.mkfifo(cls / "pipe.jpg")                               # opening it would block forever
    os.symlink("/etc/passwd", cls / "passwd.png")             # a readable file that is no image
    return root


def test_unreadable_entries_are_listed_under_their_own_names(tmp_path):
    m = load_manifest(odd_tree(tmp_path / "data"))
    ids = m.image_id.tolist()
    assert ids == ["blast/a.jpg", "blast/b.jpg", "blast/dangling.png", "blast/good.png", "blast/passwd.png",
                   "blast/pipe.jpg", "blast/self.jpg"]
    assert all(p.startswith(str((tmp_path / "data").resolve())) for p in m.path)  # links are not resolved


@pytest.mark.parametrize("name, reason", [
    ("self.jpg", "symlink loop"), ("a.jpg", "symlink loop"), ("dangling.png", "dangling symlink"),
    ("pipe.jpg", r"not a regular file \(a FIFO"), ("passwd.png", "not an image"),
])
def test_each_unreadable_entry_raises_a_reason_without_blocking(tmp_path, name, reason):
    root = odd_tree(tmp_path / "data")
    with pytest.raises(ImageDecodeError, match=reason) as e:
        open_rgb(root / "blast" / name)
    assert e.value.path.endswith(name)


def test_pixel_budget_is_applied_before_decoding(tmp_path):
    path = huge_png(tmp_path / "huge.png")
    assert path.stat().st_size < 300_000
    with pytest.raises(ImageDecodeError, match=r"13000 x 13000 = 169.0 megapixels, above the pixel budget of 50 MP"):
        open_rgb(path)
    small = _png(tmp_path / "small.png", size=(40, 30))
    assert open_rgb(small, max_pixels=1200).size == (40, 30)
    with pytest.raises(ImageDecodeError, match="above the pixel budget of 0.001199 MP"):
        open_rgb(small, max_pixels=1199)


def test_extract_reports_every_odd_entry_in_skipped_csv(tmp_path):
    from cytosae import load_backbone
    from cytosae.store import ActivationStore, ExtractConfig, extract

    root = odd_tree(tmp_path / "data")
    huge_png(root / "blast" / "huge.png")
    m = load_manifest(root)
    bb = load_backbone("dinobloom-s", depth=1)
    extract(m, bb, tmp_path / "s", ExtractConfig(layer=-1, batch_size=4, shard_size=4, progress=False, num_workers=0))
    skipped = pd.read_csv(tmp_path / "s" / "skipped.csv").set_index("image_id")
    assert sorted(skipped.index) == ["blast/a.jpg", "blast/b.jpg", "blast/dangling.png", "blast/huge.png",
                                     "blast/passwd.png", "blast/pipe.jpg", "blast/self.jpg"]
    assert "/etc/passwd" not in skipped.path.tolist() and skipped.path["blast/passwd.png"].endswith("passwd.png")
    assert "megapixels" in skipped.reason["blast/huge.png"] and "FIFO" in skipped.reason["blast/pipe.jpg"]
    assert ActivationStore(tmp_path / "s").image_ids == ["blast/good.png"]


BAD_MANIFESTS = {
    "empty": (b"", r"empty.csv is empty"),
    "unterminated_quote": (b'path,label\nimgs/a.png,"blast\nimgs/b.png,x\n', r"unterminated_quote.csv: line 2: malformed CSV"),
    "latin1": ("path,label\nimgs/a.png,myélocyte\n".encode("latin-1"), r"latin1.csv: line 2 is not UTF-8"),
    "header_only": (b"path,label\n", r"header_only.csv has a header but no rows"),
    "no_path": (b"file,label\na.png,x\n", r"no_path.csv has no 'path' column \(it has \['file', 'label'\]\)"),
    "empty_path": (b"path,label\nimgs/a.png,x\n,y\n", r"empty_path.csv: line 3, column 'path' is empty"),
    "too_wide": (b"path,label\nimgs/a.png,x,extra\n", r"too_wide.csv: line 2 has 3 values but the header has 2"),
    "dotdot": (b"path\nimgs/a.png\nimgs/../imgs/a.png\n",
               r"dotdot.csv: duplicate image ids .*: lines 2 and 3 both name 'imgs/a.png'"),
}


@pytest.mark.parametrize("name", sorted(BAD_MANIFESTS))
def test_bad_manifests_are_one_line_errors_naming_file_and_line(tmp_path, name):
    _png(tmp_path / "imgs" / "a.png")
    content, message = BAD_MANIFESTS[name]
    (tmp_path / f"{name}.csv").write_bytes(content)
    with pytest.raises(ManifestError, match=message) as e:
        load_manifest(tmp_path / f"{name}.csv")
    assert "\n" not in str(e.value)


def test_paths_are_normalised_and_patients_checked(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    (tmp_path / "m.csv").write_text("path\nimgs/./sub/../a.png\n")
    m = load_manifest(tmp_path / "m.csv")
    assert m.image_id.tolist() == ["imgs/a.png"] and m.path[0] == str(tmp_path.resolve() / "imgs" / "a.png")
    _png(tmp_path / "cells" / "P1" / "a.png")
    (tmp_path / "p.csv").write_text("patient_id,diagnosis\nP1,APL\nP1,AML\n")
    with pytest.raises(ManifestError, match=r"p.csv: duplicate patient ids: lines 2 and 3 both name 'P1'"):
        load_manifest(tmp_path / "cells", patients=tmp_path / "p.csv")


# Tensor digests of Preprocess output computed with the code before the bounded resize existed (issue #20):
# ordinary images must keep their bytes, or a resumed crop-mode store would mix two preprocessings.
_BEFORE = {((40, 50), "squash"): "cedd506718aae916", ((40, 50), "pad"): "db1fafa15255c83c",
           ((40, 50), "crop"): "9250ad6ff9c24f99", ((363, 517), "squash"): "cf047a57d7645f27",
           ((363, 517), "pad"): "40d4bc5384293654", ((363, 517), "crop"): "36bba7a6543dbbf3",
           ((600, 90), "squash"): "5ff85fc5e85e06f3", ((600, 90), "pad"): "275c802ed12523eb",
           ((600, 90), "crop"): "7b5c200c93e50826", ((7, 300), "squash"): "fe68461cb952dadb",
           ((7, 300), "pad"): "8565c728e720cba3", ((7, 300), "crop"): "4c24e6d297ccffff"}


def test_preprocessing_of_ordinary_images_is_unchanged():
    import hashlib

    from cytosae.data import Preprocess

    rng = np.random.default_rng(7)
    for size in [(40, 50), (363, 517), (600, 90), (7, 300)]:
        img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
        for mode in ["squash", "pad", "crop"]:
            x = Preprocess(resize=mode)(img)
            assert hashlib.sha256(x.numpy().tobytes()).hexdigest()[:16] == _BEFORE[size, mode], (size, mode)


THIN_SCRIPT = """
import resource, sys
import numpy as np
from PIL import Image
from cytosae.data import Preprocess
img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (400_000, 8, 3), dtype=np.uint8))  # 3.2 MP
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
shapes = [tuple(Preprocess(resize=m)(img).shape) for m in ("crop", "pad", "squash")]
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(shapes, f"{grown:.0f}")
"""


def test_a_thin_image_is_preprocessed_in_bounded_memory(tmp_path):
    """8 x 400,000 px with crop used to be resized whole to 224 x 11.2 M px (10 GB, MemoryError)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", THIN_SCRIPT], capture_output=True, text=True, check=True).stdout.split()
    assert out[:-1] == ["[(3,", "224,", "224),", "(3,", "224,", "224),", "(3,", "224,", "224)]"]
    assert float(out[-1]) < 200, f"peak memory grew by {out[-1]} MB while preprocessing a 3.2 MP image"


def test_extreme_crop_takes_the_centre_of_the_source():
    """The bounded crop samples the same place as a whole resize would: a thin image whose centre is red."""
    from cytosae.data import Preprocess

    a = np.full((40_000, 8, 3), 255, np.uint8)
    a[19_996:20_004] = (200, 0, 0)  # the centre 8 x 8 px, all the crop keeps of an 8-px-wide image
    out = np.asarray(Preprocess(resize="crop").resize_image(Image.fromarray(a))).astype(int)
    assert np.abs(out[16:208, 16:208] - [200, 0, 0]).max() <= 6  # bicubic ringing near the white edge


def _thin_png(path: Path, size=(8, 400_000)) -> Path:
    """A one-colour strip (3.2 MP, under the pixel budget; a few KB as PNG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 100, 150)).save(path)
    return path


THIN = (r"8 x 400000 px has an aspect ratio of 50,000:1, above the limit of 20:1 \(a cell image is about square; .*\); "
        r"raise the limit with --max-aspect \(0 = no limit\) to include it")


def test_the_aspect_ratio_is_checked_before_decoding_or_resizing(tmp_path, monkeypatch):
    """Issue #20, item 7: an 8 x 400,000 px image is refused from its header, before decoding and before any resize
    (crop would have resized it to 224 x 11.2 M px); the message names the file, its size, the limit and the fix."""
    from cytosae.data import ImageDataset, Preprocess

    thin = _thin_png(tmp_path / "thin.png")
    with pytest.raises(ImageDecodeError, match=THIN) as e:
        open_rgb(thin)
    assert e.value.path.endswith("thin.png") and str(e.value).startswith(str(thin))
    # the limit is what refuses it: lifted, the same file decodes
    assert open_rgb(thin, max_aspect=None).size == (8, 400_000)
    assert open_rgb(_thin_png(tmp_path / "edge.png", (8, 160))).size == (8, 160)  # 20:1 is within the limit
    with pytest.raises(ImageDecodeError, match="aspect ratio of 20:1, above the limit of 19.5:1"):
        open_rgb(tmp_path / "edge.png", max_aspect=19.5)
    resized = []
    monkeypatch.setattr(Preprocess, "resize_image", lambda self, img, source=None: resized.append(img.size))
    i, x, reason = ImageDataset(pd.DataFrame({"path": [str(thin)]}), Preprocess(resize="crop"))[0]
    assert (i, x) == (0, None) and resized == [] and "aspect ratio of 50,000:1" in reason


def test_extract_skips_a_thin_image_and_lists_it_in_skipped_csv(tmp_path):
    from cytosae.steps import ExtractSettings, run_extract
    from cytosae.store import ActivationStore

    root = tmp_path / "data"
    _png(root / "blast" / "good.png")
    _thin_png(root / "blast" / "strip.png")
    res = run_extract(ExtractSettings(data=root, out=tmp_path / "s", backbone="dinobloom-s", resize="crop",
                                      layer=-1, batch_size=4, shard_size=4, workers=0, device="cpu"))
    skipped = pd.read_csv(tmp_path / "s" / "skipped.csv").set_index("image_id")
    assert skipped.index.tolist() == ["blast/strip.png"] and res.n_skipped == 1
    assert re.search(THIN, skipped.reason["blast/strip.png"]), skipped.reason["blast/strip.png"]
    assert ActivationStore(tmp_path / "s").image_ids == ["blast/good.png"]
    assert ActivationStore(tmp_path / "s").meta["settings"]["max_aspect"] == 20.0
    with pytest.raises(ValueError, match="max_aspect"):
        ExtractSettings(data=root, out=tmp_path / "t", max_aspect=-1)


def test_a_store_written_before_the_aspect_limit_resumes_under_it(tmp_path):
    """Stores extracted before `max_aspect` existed (settings without it) resume with every shard reused; a store
    that records a limit refuses a resume under another."""
    from cytosae import load_backbone
    from cytosae.store import ExtractConfig, extract
    from cytosae.store.format import read_manifest, write_manifest

    root = tmp_path / "data"
    for i in range(3):
        _png(root / "blast" / f"c{i}.png")
    m, bb, out = load_manifest(root), load_backbone("dinobloom-s", depth=1), tmp_path / "s"
    cfg = ExtractConfig(layer=-1, batch_size=2, shard_size=2, progress=False, num_workers=0)
    extract(m, bb, out, cfg)
    meta = read_manifest(out)
    del meta["settings"]["max_aspect"]  # as written before the limit existed (the manifest sealed again, as then)
    write_manifest(out, {k: v for k, v in meta.items() if k != "manifest_sha256"})
    assert extract(m, bb, out, cfg).shards_reused == 2
    assert "max_aspect" not in read_manifest(out)["settings"]  # nothing recomputed: the manifest is left as it was
    extract(m, bb, tmp_path / "new", cfg)
    assert read_manifest(tmp_path / "new")["settings"]["max_aspect"] == 20.0
    with pytest.raises(ValueError, match=r"different settings \(max_aspect\)"):
        extract(m, bb, tmp_path / "new", ExtractConfig(layer=-1, batch_size=2, shard_size=2, progress=False,
                                                       num_workers=0, max_aspect=30.0))
