"""Issue #16: a manifest CSV naming its cells by absolute paths outside its own folder (cells picked from a larger
collection). The store records the folder common to the files as its data root, image ids stay relative to it,
and the explorer serves those images, and nothing outside the recorded roots."""
import csv
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from cytosae.data import load_manifest
from cytosae.data.manifest import ManifestError
from cytosae.data.synthetic import make_sample

LOCAL = "http://127.0.0.1:8000"


def write_pick(csv_path: Path, files: list[Path], labels: list[str]) -> Path:
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows([str(f), lab] for f, lab in zip(files, labels))
    return csv_path


def picked_run(root: Path) -> tuple[Path, Path, Path, list[str]]:
    """A collection of cells, a CSV elsewhere picking some of them by absolute path (plus a symlink in the
    collection leading out of it), and a run made from that CSV by the real extract step.
    Returns (run, collection, outside file, picked image ids)."""
    from cytosae.steps import run_extract
    from cytosae.steps.config import ExtractSettings

    collection = root / "collection"
    sample = pd.read_csv(make_sample(collection, n_patients=2, cells_per_patient=3, size=64))
    picked = [collection / p for p in sample["path"][[0, 2, 3, 5]]]
    outside = root / "elsewhere" / "secret.png"
    outside.parent.mkdir()
    shutil.copy(picked[0], outside)
    link = collection / "P001" / "link.png"
    os.symlink(outside, link)  # inside the collection by name, outside by content
    pick = write_pick(root / "picks" / "pick.csv", picked + [link], ["a", "b", "c", "d", "e"])
    run = root / "run"
    run_extract(ExtractSettings(data=pick, name="pick", backbone="dinobloom-s", layer=0, workers=0, device="cpu",
                                batch_size=8), run=run, warn=lambda _: None)
    return run, collection, outside, [f.relative_to(collection).as_posix() for f in picked]


@pytest.fixture(scope="module")
def picked(tmp_path_factory):
    return picked_run(tmp_path_factory.mktemp("roots"))


def test_store_records_the_common_folder_and_relative_ids(picked):
    from cytosae.store import ActivationStore

    run, collection, _, ids = picked
    store = ActivationStore(run / "stores" / "pick")
    assert store.data_root == str(collection.resolve())
    assert sorted(store.images["image_id"]) == sorted(ids + ["P001/link.png"])
    assert not any(i.startswith("/") or "\\" in i for i in store.images["image_id"])
    # paths are stored relative to the root (the data can move with its store)
    assert set(store.images["path"]) == set(store.images["image_id"])
    assert store.image_file(ids[0]) == collection.resolve() / ids[0]


def test_explorer_serves_the_picked_cells_and_nothing_outside(picked):
    from cytosae.explorer import create_app

    run, _, _, ids = picked
    with TestClient(create_app(run), base_url=LOCAL) as c:
        listed = c.get("/api/images", params={"dataset": "pick"}).json()["images"]
        assert sorted(im["image_id"] for im in listed) == sorted(ids + ["P001/link.png"])
        for image_id in ids:
            r = c.get("/api/image/file", params={"dataset": "pick", "image_id": image_id})
            assert r.status_code == 200, (image_id, r.text)
            assert r.headers["content-type"] == "image/png" and r.content[:8] == b"\x89PNG\r\n\x1a\n"
        # listed, and under the root by name, but the file it leads to is outside every recorded root
        r = c.get("/api/image/file", params={"dataset": "pick", "image_id": "P001/link.png"})
        assert r.status_code == 403 and "outside the run and data folders" in r.json()["detail"]
        # a file under the root that the CSV did not pick is not in the dataset
        r = c.get("/api/image/file", params={"dataset": "pick", "image_id": "P000/cell_001.png"})
        assert r.status_code == 404


def test_data_root_remaps_a_moved_collection(tmp_path):
    from cytosae.explorer import create_app

    run, collection, _, ids = picked_run(tmp_path / "before")
    moved = tmp_path / "moved"
    shutil.move(collection, moved)
    with TestClient(create_app(run), base_url=LOCAL) as c:
        r = c.get("/api/image/file", params={"dataset": "pick", "image_id": ids[1]})
        assert r.status_code == 404 and "--data-root" in r.json()["detail"]
    for given in (str(moved), f"pick={moved}"):
        with TestClient(create_app(run, data_roots=[given]), base_url=LOCAL) as c:
            assert c.get("/api/image/file", params={"dataset": "pick", "image_id": ids[1]}).status_code == 200
            r = c.get("/api/image/file", params={"dataset": "pick", "image_id": "P001/link.png"})
            assert r.status_code == 403  # the moved link still leads out of every root


def test_manifest_roots(tmp_path):
    """The CSV's folder when it holds every file (relative or absolute), else the common folder."""
    for rel in ("a/x.png", "a/b/y.png", "c/z.png"):
        (tmp_path / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / rel).write_bytes(b"")
    data = (tmp_path / "data").resolve()
    inside = write_pick(tmp_path / "data" / "m.csv", [Path("a/x.png"), data / "c" / "z.png"], ["", ""])
    assert list(load_manifest(inside)["image_id"]) == ["a/x.png", "c/z.png"]
    away = write_pick(tmp_path / "picks" / "m.csv", [data / "a" / "b" / "y.png", data / "a" / "x.png"], ["", ""])
    m = load_manifest(away)
    assert list(m["image_id"]) == ["b/y.png", "x.png"]
    assert list(m["path"]) == [str(data / "a" / "b" / "y.png"), str(data / "a" / "x.png")]
    one = write_pick(tmp_path / "picks" / "one.csv", [data / "c" / "z.png"], [""])
    assert list(load_manifest(one)["image_id"]) == ["z.png"]
    up = write_pick(tmp_path / "picks" / "up.csv", [Path("../data/a/x.png"), Path("../data/c/z.png")], ["", ""])
    assert list(load_manifest(up)["image_id"]) == ["a/x.png", "c/z.png"]
    with pytest.raises(ManifestError, match="share no folder but /"):
        load_manifest(write_pick(tmp_path / "picks" / "root.csv", [data / "a" / "x.png", Path("/etc/hostname")],
                                 ["", ""]))


def test_static_report_holds_the_picked_cells(tmp_path):
    """The report is rendered through the same app: every top image of a picked run is in it as a JPEG."""
    from explorer_fixtures import make_pipeline_run
    from PIL import Image

    from cytosae.explorer.report import build_report, canonical_url, fnv1a

    run = make_pipeline_run(tmp_path / "p", picked=True)
    res = build_report(run, tmp_path / "site", n_latents=3, n_images=2)
    top = pd.read_parquet(run / "stats" / "top_images.parquet")
    shown = top[top["latent"].isin(res["latents"])]
    assert len(shown) and not any(i.startswith("/") for i in shown["image_id"])
    for image_id in set(shown["image_id"]):
        jpg = tmp_path / "site" / "data" / f"{fnv1a(canonical_url('image/file', {'dataset': 'sample', 'image_id': image_id}))}.jpg"
        assert jpg.is_file(), image_id
        assert Image.open(jpg).size[0] > 0


def test_a_store_made_before_the_fix_is_served_once_its_folder_is_named(tmp_path):
    """Stores written before issue #16 was fixed hold absolute image ids and no data root: refused (403, naming
    --data-root), then served once `--data-root` names the collection; a file outside that folder stays refused."""
    import numpy as np

    from cytosae.explorer import create_app
    from cytosae.run import Run
    from cytosae.store import import_embeddings

    collection = tmp_path / "collection"
    sample = pd.read_csv(make_sample(collection, n_patients=1, cells_per_patient=2, size=32))
    files = [str((collection / p).resolve()) for p in sample["path"]]
    other = tmp_path / "other" / "x.png"
    other.parent.mkdir()
    shutil.copy(files[0], other)
    files.append(str(other.resolve()))
    old = pd.DataFrame({"image_id": files, "path": files})  # what load_manifest gave such a CSV before the fix
    np.save(tmp_path / "emb.npy", np.zeros((len(files), 8), np.float32))
    run = Run.open(tmp_path / "run", create=True)
    import_embeddings(tmp_path / "emb.npy", old, run.store_dir("old"), dtype="float32")
    run.add_dataset("old", data=tmp_path / "picks" / "pick.csv")
    with TestClient(create_app(run.path), base_url=LOCAL) as c:
        r = c.get("/api/image/file", params={"dataset": "old", "image_id": files[0]})
        assert r.status_code == 403 and "--data-root" in r.json()["detail"]
    with TestClient(create_app(run.path, data_roots=[str(collection)]), base_url=LOCAL) as c:
        assert c.get("/api/image/file", params={"dataset": "old", "image_id": files[1]}).status_code == 200
        assert c.get("/api/image/file", params={"dataset": "old", "image_id": files[2]}).status_code == 403
