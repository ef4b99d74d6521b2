"""Patch-level evidence: maps, top latents per image and patch, overlays, masks, galleries."""
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cytosae import load_backbone
from cytosae.analysis.heatmaps import (CellViewer, mask, overlay, patch_map, top_latents, write_latent_galleries)
from cytosae.data import load_manifest
from cytosae.store import ActivationStore, ExtractConfig, extract
from cytosae.analysis.encoded import EncodedStore


def _acts(n_latents=6):
    """257 tokens: latent 1 on patch (row 5, col 3) only, latent 2 on CLS only, latent 4 weak on every patch."""
    z = np.zeros((257, n_latents), np.float32)
    z[1 + 5 * 16 + 3, 1] = 3.0
    z[0, 2] = 9.0
    z[1:, 4] = 0.1
    return z


def test_patch_map_is_row_major_without_cls():
    m = patch_map(_acts(), 1)
    assert m.shape == (16, 16) and m[5, 3] == 3.0 and m.sum() == 3.0
    assert patch_map(_acts(), 2).sum() == 0.0  # CLS is not a patch
    with pytest.raises(IndexError, match="latent 6 does not exist"):
        patch_map(_acts(), 6)
    with pytest.raises(ValueError, match="square grid"):
        patch_map(_acts()[:200], 1)


def test_top_latents_for_the_image_and_for_one_patch():
    img = top_latents(_acts())
    assert img.latent.tolist() == [4, 1]  # mean over patches: 0.1 beats 3/256; CLS-only latent 2 absent
    assert img.patches_firing.tolist() == [256, 1]
    patch = top_latents(_acts(), patch=5 * 16 + 3)
    assert patch.latent.tolist() == [1, 4] and patch.value.tolist() == pytest.approx([3.0, 0.1])
    assert top_latents(_acts(), patch=0).latent.tolist() == [4]  # patch 0 is token 1, not CLS
    with pytest.raises(IndexError, match="256 patches"):
        top_latents(_acts(), patch=256)


def test_overlay_and_mask_touch_only_the_firing_patch():
    base = Image.new("RGB", (224, 224), (100, 150, 200))
    m = patch_map(_acts(), 1)
    ov = np.asarray(overlay(base, m, alpha=0.6))
    assert ov.shape == (224, 224, 3)
    inside, outside = ov[5 * 14 + 7, 3 * 14 + 7], ov[0, 0]  # pixel centre of patch (5, 3); a silent patch
    assert outside.tolist() == [100, 150, 200] and inside.tolist() != [100, 150, 200]
    mk = np.asarray(mask(base, m))
    assert mk[5 * 14 + 7, 3 * 14 + 7].tolist() == [100, 150, 200] and (mk[0, 0] > 200).all()  # rest faded to white
    assert np.asarray(overlay(base, np.zeros((16, 16)))).tolist() == np.asarray(base).tolist()


def test_gallery_of_top_images_from_a_real_store(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(4):
        (tmp_path / "data" / "blast").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (60, 70, 3), dtype=np.uint8)).save(tmp_path / "data" / "blast" / f"{i}.png")
    torch.manual_seed(0)
    bb = load_backbone("dinobloom-s", depth=3)
    res = extract(load_manifest(tmp_path / "data"), bb, tmp_path / "store", ExtractConfig(layer=-1, progress=False))
    store = ActivationStore(res.out_dir)
    weights = torch.randn(384, 8)
    viewer = CellViewer(EncodedStore.of_function(lambda x: torch.relu(x @ weights), weights.shape[1], store=store))
    image_id = store.image_ids[0]
    assert viewer.image(image_id).size == (224, 224) and viewer.label(image_id) == "blast"
    z = viewer.activations(image_id)
    assert z.shape == (257, 8)
    np.testing.assert_allclose(z, torch.relu(store.get_image(image_id) @ weights).numpy(), rtol=1e-5)
    top = pd.DataFrame({"dataset": store.path.name, "latent": 3, "by": "image", "rank": range(4),
                        "image_id": store.image_ids, "value": [1.0, 0.8, 0.5, 0.2]})
    written = write_latent_galleries(viewer, top, [3, 5], tmp_path / "gal", k=4)
    assert [p.name for p in written] == ["latent_000003_image.png"]  # latent 5 has no top images
    assert Image.open(written[0]).size[0] > 400


def test_top_cells_rank_the_mean_patch_activation_of_chosen_latents_within_a_group():
    from cytosae.analysis.heatmaps import cell_activations, top_cells

    tokens = torch.zeros(4, 5, 3)  # 4 cells, CLS + 4 patches, 3 latents (encode = identity)
    tokens[0, 1:, 2] = 1.0   # cell a: mean 1.0 on latent 2
    tokens[1, 1, 2] = 2.0    # cell b: mean 0.5
    tokens[2, 0, 2] = 9.0    # cell c: CLS only -> 0, not a top cell
    tokens[3, 1:3, 2] = 3.0  # cell d: mean 1.5
    ids = ["a", "b", "c", "d"]
    acts = cell_activations(EncodedStore.of_function(lambda x: x, 3, [(ids[:2], tokens[:2]), (ids[2:], tokens[2:])]), [2, 0])
    assert acts.shape == (4, 2) and acts.loc["d", 2] == pytest.approx(1.5) and acts.loc["c", 2] == 0.0
    top = top_cells(acts, [2, 0], k=2)
    assert top.image_id.tolist() == ["d", "a"] and top["rank"].tolist() == [0, 1]  # latent 0 never fires: no rows
    assert top_cells(acts, [2], k=5, keep={"a", "b", "c"}).image_id.tolist() == ["a", "b"]
