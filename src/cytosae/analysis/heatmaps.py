"""Where in the cell: per-patch activation maps, overlays, masks, top latents, galleries.

Token layout (the store's): token 0 is CLS, token p + 1 is patch p, and patch p sits at
row p // grid, column p % grid of the image the backbone saw (224 px, 16 x 16 patches of 14 px).
CLS never enters a patch ranking.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from PIL import Image

if TYPE_CHECKING:
    from cytosae.analysis.encoded import EncodedStore


def _patches(z: np.ndarray, has_cls: bool = True) -> tuple[np.ndarray, int]:
    patches = z[1:] if has_cls else z
    grid = math.isqrt(patches.shape[0])
    if grid * grid != patches.shape[0]:
        raise ValueError(f"{patches.shape[0]} patch tokens do not form a square grid (CLS {'included' if has_cls else 'absent'})")
    return patches, grid


def patch_map(z: np.ndarray, latent: int, has_cls: bool = True) -> np.ndarray:
    """(grid, grid) activation of `latent` on each patch."""
    patches, grid = _patches(z, has_cls)
    if not 0 <= latent < z.shape[1]:
        raise IndexError(f"latent {latent} does not exist: the SAE has {z.shape[1]} latents")
    return patches[:, latent].reshape(grid, grid)


def top_latents(z: np.ndarray, k: int = 10, patch: int | None = None, has_cls: bool = True) -> pd.DataFrame:
    """Latents ranked for a whole image (mean over its patches, as in the statistics) or for one patch
    (patch = row * grid + col). Only latents that fire are listed."""
    patches, grid = _patches(z, has_cls)
    if patch is None:
        score = patches.mean(0)
    else:
        if not 0 <= patch < grid * grid:
            raise IndexError(f"patch {patch} does not exist: the image has {grid}x{grid} = {grid * grid} patches")
        score = patches[patch]
    order = np.argsort(-score, kind="stable")[:k]
    order = order[score[order] > 0]
    return pd.DataFrame({"latent": order, "value": score[order], "patches_firing": (patches[:, order] > 0).sum(0)})


def _upsample(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Patch map to pixels; nearest keeps each patch's square visible, so what is shown is what was measured."""
    img = Image.fromarray(amap.astype(np.float32), mode="F").resize(size, Image.NEAREST)
    return np.asarray(img)


def overlay(image: Image.Image, amap: np.ndarray, alpha: float = 0.5, cmap: str = "inferno",
            vmax: float | None = None) -> Image.Image:
    """The image with the activation map blended on top (0 = transparent, vmax = full colour)."""
    import matplotlib

    vmax = float(vmax if vmax is not None else amap.max())
    norm = np.clip(_upsample(amap, image.size) / vmax, 0, 1) if vmax > 0 else np.zeros(image.size[::-1], np.float32)
    colours = matplotlib.colormaps[cmap](norm)[..., :3]
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    a = alpha * norm[..., None]  # no activation leaves the cell untouched
    return Image.fromarray(np.uint8(255 * ((1 - a) * base + a * colours)))


def mask(image: Image.Image, amap: np.ndarray, threshold: float = 0.0, dim: float = 0.2) -> Image.Image:
    """Only the patches where the latent fires above `threshold` stay visible; the rest is dimmed."""
    keep = _upsample((amap > threshold).astype(np.float32), image.size) > 0.5
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    return Image.fromarray(np.uint8(np.where(keep[..., None], base, dim * base + (1 - dim) * 255)))


class CellViewer:
    """Images as the backbone saw them, with the SAE's activations, for one activation store."""

    def __init__(self, encoded: "EncodedStore", data_root: str | Path | None = None):
        """`encoded`: the store's images through the SAE on its device (analysis.encoded.EncodedStore)."""
        from cytosae.data.images import Preprocess

        self.encoded, self.store = encoded, encoded.store
        self.preprocess = Preprocess.from_dict(self.store.meta["settings"]["preprocessing"])
        images = self.store.images
        self._row = {i: r for i, r in zip(images["image_id"], images.to_dict("records"))}
        self.data_root = Path(data_root) if data_root else None

    def image(self, image_id: str) -> Image.Image:
        from cytosae.data import open_rgb

        if image_id not in self._row:
            raise KeyError(f"image {image_id!r} is not in {self.store.path}/images.parquet")
        path = self.store.image_file(image_id, [self.data_root] if self.data_root else [])
        if path is None:
            raise FileNotFoundError(f"the image file of {image_id!r} is not under its data folder "
                                    f"{self.store.data_root or '(not recorded)'}: give its new place as data_root")
        return self.preprocess.resize_image(open_rgb(path))

    def activations(self, image_id: str) -> np.ndarray:
        """(T, n_latents) activations of one stored image."""
        return self.encoded.image(image_id).numpy()

    def label(self, image_id: str, column: str = "label") -> str:
        v = (self._row.get(image_id) or {}).get(column)
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def gallery(viewer: CellViewer, latent: int, image_ids: list[str], values: list[float] | None = None,
            label_column: str = "label", columns: int = 4, alpha: float = 0.55, title: str | None = None):
    """A figure of a latent's top images with its activation overlaid, each titled with label and value."""
    import matplotlib.pyplot as plt

    n = len(image_ids)
    rows = max(1, math.ceil(n / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows + 0.4), squeeze=False)
    maps = [patch_map(viewer.activations(i), latent, viewer.store.has_cls) for i in image_ids]
    vmax = max([float(m.max()) for m in maps] + [1e-12])  # one scale for the whole gallery: cells compare
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image_id, amap, k in zip(axes.ravel(), image_ids, maps, range(n)):
        ax.imshow(overlay(viewer.image(image_id), amap, alpha=alpha, vmax=vmax))
        value = values[k] if values is not None else float(amap.mean())
        ax.set_title(f"{viewer.label(image_id, label_column) or image_id}\n{value:.3g}", fontsize=7)
    fig.suptitle(title or f"latent {latent}: top {n} images (overlay: patch activation, max {vmax:.3g})", fontsize=9)
    return fig


def write_latent_galleries(viewer: CellViewer, top_images: pd.DataFrame, latents: list[int], out_dir: str | Path,
                           dataset: str | None = None, by: str = "image", k: int = 8, label_column: str = "label",
                           caption: dict[int, str] | None = None) -> list[Path]:
    """One gallery PNG per latent from the stats' top_images table (by "image" or "patch")."""
    from cytosae.analysis.figures import save_figure

    out = Path(out_dir)
    rows = top_images[(top_images.by == by) & (top_images.latent.isin(latents))]
    if dataset is not None:
        rows = rows[rows.dataset == dataset]
    written = []
    for j in latents:
        r = rows[rows.latent == j].sort_values("rank").head(k)
        if r.empty:
            continue
        what = "mean patch activation" if by == "image" else "strongest patch"
        title = f"latent {j}: top {len(r)} images by {what}" + (f" — {caption[j]}" if caption and j in caption else "")
        fig = gallery(viewer, j, r.image_id.tolist(), r.value.tolist(), label_column=label_column, title=title)
        written.append(save_figure(fig, out / f"latent_{j:06d}_{by}.png"))
    return written


def cell_activations(encoded: "EncodedStore", latents: list[int]) -> pd.DataFrame:
    """One streaming pass: image-level activation (mean over patches, as in the statistics) of the chosen latents
    for every cell; cells x chosen latents, so memory stays small whatever the SAE's width. Batches are encoded
    on `encoded.device`."""
    cols = torch.as_tensor(latents, dtype=torch.long, device=encoded.device)
    ids_all, parts = [], []
    for batch in encoded.batches():
        ids_all += batch.ids
        parts.append(batch.patch_mean()[:, cols].cpu().numpy())
    values = np.concatenate(parts) if parts else np.zeros((0, len(latents)), np.float32)
    return pd.DataFrame(values, index=pd.Index(ids_all, name="image_id"), columns=list(latents))


def top_cells(acts: pd.DataFrame, latents: list[int], k: int = 8, keep: set[str] | None = None) -> pd.DataFrame:
    """For each latent, the k cells (optionally only those in `keep`) with the highest activation in `acts`
    (from `cell_activations`), firing cells only, ties by image id. Rows like stats' top_images (by = "image")."""
    if keep is not None:
        acts = acts[acts.index.isin(keep)]
    rows = []
    for j in latents:
        v = acts[j]
        best = (pd.DataFrame({"image_id": v.index, "value": v.to_numpy(dtype=float)})[v.to_numpy() > 0]
                .sort_values(["value", "image_id"], ascending=[False, True], kind="stable").head(k))
        rows += [(j, "image", rank, r.image_id, r.value, -1) for rank, r in enumerate(best.itertuples())]
    return pd.DataFrame(rows, columns=["latent", "by", "rank", "image_id", "value", "patch"])
