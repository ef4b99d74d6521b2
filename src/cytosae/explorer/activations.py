"""Per-token SAE activations of one image, from the activation store or from an uploaded image.

A TopK SAE's activation of latent j depends on all other latents, so we always run
the full encoder and keep the result sparse (tokens x latents CSR); a small LRU keeps
recently viewed images so clicking patches does not re-encode.
"""
from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from .rundir import RunDir
from .sae_adapter import load_sae


class BackboneUnavailable(RuntimeError):
    """Uploads cannot be encoded: the backbone named by the run cannot be loaded here."""


@dataclass
class ImageActivations:
    acts: sp.csr_matrix  # (n_tokens, n_latents)
    has_cls: bool
    grid: int

    @property
    def n_patches(self) -> int:
        return self.grid * self.grid

    def _patch_rows(self) -> sp.csr_matrix:
        return self.acts[1:] if self.has_cls else self.acts

    def patch(self, p: int) -> sp.csr_matrix:
        if not 0 <= p < self.n_patches:
            raise IndexError(f"patch {p} does not exist: this image has {self.n_patches} patches")
        return self.acts[p + int(self.has_cls)]

    @staticmethod
    def _top(row: sp.csr_matrix | np.ndarray, k: int) -> list[dict]:
        row = sp.csr_matrix(row)
        idx, val = row.indices, row.data
        keep = val > 0
        idx, val = idx[keep], val[keep]
        order = np.argsort(-val, kind="stable")[:k]
        return [{"latent": int(idx[i]), "value": float(val[i])} for i in order]

    def top_cls(self, k: int) -> list[dict]:
        return self._top(self.acts[0], k) if self.has_cls else []

    def top_patch_max(self, k: int) -> list[dict]:
        """Latents ranked by their strongest patch; `patches` counts patches where each fires."""
        if self.n_patches == 0:
            return []  # a store of image embeddings only (no patch tokens)
        rows = self._patch_rows()
        mx = rows.max(axis=0).toarray().ravel()
        cnt = (rows > 0).sum(axis=0).A.ravel()
        order = np.argsort(-mx, kind="stable")[:k]
        return [{"latent": int(j), "value": float(mx[j]), "patches": int(cnt[j])} for j in order if mx[j] > 0]

    def top_patch(self, p: int, k: int) -> list[dict]:
        return self._top(self.patch(p), k)

    def heatmap(self, latent: int) -> list[float]:
        """Activation of `latent` on each patch, row-major over the grid."""
        return [float(v) for v in self._patch_rows()[:, latent].toarray().ravel()]

    def cls_value(self, latent: int) -> float:
        return float(self.acts[0, latent]) if self.has_cls else float("nan")


class Encoder:
    """Turns tokens (from the store, or from the backbone for uploads) into ImageActivations."""

    def __init__(self, run: RunDir, cache_size: int = 256, chunk: int = 128, device="cpu", sae=None) -> None:
        """`sae`: the run's SAE already loaded and checked by the caller (the CLI does, to refuse a damaged or
        unfinished one in one line), so the large weights file is not read and hashed a second time."""
        self.run = run
        self.device = torch.device(device)
        self.chunk = chunk
        self._cache: OrderedDict[tuple, ImageActivations] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._sae = None if sae is None else sae.to(self.device).eval()
        self._backbone = None

    @property
    def sae(self):
        with self._lock:
            if self._sae is None:
                # read and checked on the CPU, moved after: a GPU failure (out of memory, no driver) is not
                # reported as a damaged sae.safetensors
                self._sae = self.run.open_sae(lambda d: load_sae(d, "cpu")).to(self.device)
            return self._sae

    @torch.no_grad()
    def encode_tokens(self, tokens: torch.Tensor, has_cls: bool = True) -> ImageActivations:
        from cytosae.analysis.encoded import EncodedStore

        encoded = EncodedStore(None, self.sae, self.device)  # the analyses' encoder: TopK pairs stay sparse
        parts = []
        for s in range(0, tokens.shape[0], self.chunk):  # bounded memory: chunk x n_latents dense at a time
            chunk = tokens[s:s + self.chunk].float()
            # sparse straight from the non-zeros: a dense->CSR scan of 257 x 49k floats costs more than the encoder
            rows, cols, vals = (t.cpu().numpy() for t in encoded.encode_tokens(chunk[None]).nonzero())
            parts.append(sp.csr_matrix((vals, (rows, cols)), shape=(chunk.shape[0], encoded.n_latents)))
        acts = sp.vstack(parts).tocsr()
        n_patch = tokens.shape[0] - int(has_cls)
        grid = math.isqrt(n_patch)
        if grid * grid != n_patch:
            raise ValueError(f"{n_patch} patch tokens do not form a square grid")
        return ImageActivations(acts, has_cls, grid)

    def _cached(self, key: tuple, compute) -> ImageActivations:
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        value = compute()
        with self._lock:
            self._cache[key] = value
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return value

    def for_store_image(self, dataset: str, image_id: str) -> ImageActivations:
        def compute():
            store = self.run.store(dataset)
            return self.encode_tokens(store.get_image(image_id), has_cls=store.has_cls)
        return self._cached(("store", dataset, image_id), compute)

    def latent_map(self, dataset: str, image_id: str, latent: int) -> tuple[float, list[float], int]:
        """(CLS activation, per-patch activations, grid) of one latent on one stored image.

        Always the SAE's full encoder (cached per image): only the package's SAE.encode knows each
        architecture's thresholds and input scale, and the cache serves every other latent of the image.
        """
        acts = self.for_store_image(dataset, image_id)
        return acts.cls_value(latent), acts.heatmap(latent), acts.grid

    # ------------------------------------------------------------------ uploads
    def backbone(self):
        with self._lock:
            if self._backbone is None:
                self._backbone = self._load_backbone()
            return self._backbone

    def _load_backbone(self):
        spec = self.run.backbone_spec()
        name = spec.get("name")
        if not name or name == "imported":
            raise BackboneUnavailable("this run's activations were imported, not extracted with a backbone, "
                                      "so uploaded images cannot be encoded the same way; pick a dataset image")
        try:
            from cytosae import load_backbone
        except ImportError:
            try:
                from cytosae.backbones import load_backbone
            except ImportError as exc:
                raise BackboneUnavailable(f"cytosae.backbones is not available in this installation ({exc})") from None
        weights = spec.get("weights")
        if weights and not os.path.isabs(weights):
            weights = str(self.run.path / weights)
        options = dict(spec.get("options") or {})
        resize = (self.run.preprocessing() or {}).get("resize")
        if resize and "resize" not in options:
            options["resize"] = resize  # same squash/pad/crop as the store, or the patches would not correspond
        # random weights are a pure function of the seed the store recorded, so the same backbone is rebuilt here
        random_seed = next((spec[k] for k in ("random_weights_seed", "seed") if spec.get(k) is not None), None)
        if weights or spec.get("weights_sha256"):
            random_seed = None
        if not weights and spec.get("weights_sha256") is None and random_seed is None:
            raise BackboneUnavailable(f"backbone {name!r} had random weights drawn without a recorded seed; uploads "
                                      "would not match the store (re-extract, or pass --weights)")
        if random_seed is not None:
            options["seed"] = int(random_seed)
        try:
            bb = load_backbone(name, weights=weights, device=self.device, **options)
        except Exception as exc:  # missing weights file, no network for a download, unknown name
            raise BackboneUnavailable(f"backbone {name!r} (weights {weights or 'default'}) could not be loaded: {exc}") from None
        stain = (self.run.preprocessing() or {}).get("stain")
        if stain:  # the store's colour normalisation (extract --stain), so an upload is seen as its cells were
            from dataclasses import replace

            from cytosae.data.stain import Stain
            bb.preprocess_config = replace(bb.preprocess_config, stain=Stain.from_dict(stain))
        if spec.get("weights_sha256") and getattr(bb, "weights_sha256", None) not in (None, spec["weights_sha256"]):
            raise BackboneUnavailable(f"backbone weights differ from those the store was extracted with "
                                      f"(sha256 {bb.weights_sha256[:12]} vs {spec['weights_sha256'][:12]})")
        return bb, spec.get("layer", -2)

    def backbone_note(self) -> str:
        """What encoded the uploads, for the page: random weights are said plainly, with the seed they came from."""
        bb, layer = self.backbone()
        if bb.random_weights:
            return (f"{bb.name}, block {layer}, RANDOM weights rebuilt from the run's seed {bb.seed} (as the store "
                    "was extracted): the latents mean nothing about blood cells")
        return f"{bb.name}, block {layer}, weights sha256 {bb.weights_sha256[:12]}"

    @torch.no_grad()
    def for_upload(self, upload_id: str, pil_image) -> ImageActivations:
        def compute():
            bb, layer = self.backbone()
            x = bb.preprocess(pil_image)[None].to(self.device)
            tokens = bb.tokens(x, layer=-2 if layer is None else layer)[0].cpu()
            return self.encode_tokens(tokens, has_cls=True)
        return self._cached(("upload", upload_id), compute)

    def get_upload(self, upload_id: str) -> ImageActivations | None:
        with self._lock:
            return self._cache.get(("upload", upload_id))
