"""Odd inputs to extraction (issue #20): a file name that is not UTF-8, a listing in which no image decodes."""
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from cytosae.cli import app
from cytosae.data import load_manifest
from cytosae.data.decode import printable_name
from cytosae.store import ActivationStore

ARGS = ["--backbone", "dinobloom-s", "--device", "cpu", "--batch-size", "2", "--shard-size", "4", "--workers", "0"]


def _cells(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    (root / "neutrophil").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(root / "neutrophil" / f"c{i}.png")
    return root


@pytest.mark.skipif(os.name != "posix", reason="POSIX file names are bytes")
def test_a_non_utf8_file_name_is_skipped_and_listed_and_the_rest_extracted(tmp_path):
    data = _cells(tmp_path / "data", 3)
    odd = os.path.join(os.fsencode(data / "neutrophil"), b"caf\xe9.png")  # Latin-1 e-acute: not UTF-8
    with open(odd, "wb") as f:
        f.write((data / "neutrophil" / "c0.png").read_bytes())
    manifest = load_manifest(data)
    assert "neutrophil/caf\\xe9.png" in set(manifest.image_id)  # a printable id
    res = CliRunner().invoke(app, ["extract", str(data), "--out", str(tmp_path / "s"), *ARGS])
    assert res.exit_code == 0, res.output
    store = ActivationStore(tmp_path / "s")
    assert store.n_images == 3
    skipped = pd.read_csv(tmp_path / "s" / "skipped.csv")
    assert list(skipped.image_id) == ["neutrophil/caf\\xe9.png"]
    assert skipped.path[0].endswith("caf\\xe9.png") and "not UTF-8" in skipped.reason[0]
    assert printable_name(os.fsdecode(odd)) == skipped.path[0]


def test_a_listing_where_no_image_decodes_is_an_error_not_an_empty_store(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"broken{i}.png").write_bytes(b"not a png at all")
    pd.DataFrame({"path": [f"broken{i}.png" for i in range(3)], "label": "x"}).to_csv(data / "cells.csv", index=False)
    res = CliRunner().invoke(app, ["extract", str(data / "cells.csv"), "--out", str(tmp_path / "s"), *ARGS])
    assert res.exit_code == 2, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error: none of the 3 images listed could be decoded") and "skipped.csv" in last
    assert "Traceback" not in res.output
    assert len(pd.read_csv(tmp_path / "s" / "skipped.csv")) == 3  # the reasons are kept
    with pytest.raises(Exception):
        ActivationStore(tmp_path / "s")  # no store to train on


def test_a_nul_byte_in_a_csv_value_is_refused_naming_line_and_column(tmp_path):
    from cytosae.data.manifest import ManifestError
    (tmp_path / "cells.csv").write_text("path,label\na.png,neutro\x00phil\n")
    with pytest.raises(ManifestError, match=r"cells.csv: line 2, column 'label' holds a NUL byte"):
        load_manifest(tmp_path / "cells.csv")


def test_an_image_above_pils_limit_is_refused_with_our_pixel_budget(tmp_path):
    """PIL refuses > 2x its limit (179 MP) while reading the header; the message is the --max-pixels one."""
    from cytosae.data.decode import ImageDecodeError, open_rgb
    big = tmp_path / "big.png"
    Image.new("1", (20_000, 20_000)).save(big)  # 400 MP, a few kB as a 1-bit PNG
    with pytest.raises(ImageDecodeError, match=r"400.0 megapixels, above the pixel budget of 50 MP \(raise it with --max-pixels"):
        open_rgb(big)
