"""A store's images encoded by an SAE on one device: what every encoding pass (stats, patients, heatmaps, disease
examples, factor purity) reads, so that no caller hands a CPU tensor to a GPU SAE or re-resolves the device.

    EncodedStore(store, sae, device, batch_size)   built once per command; checks the SAE is on `device`
    EncodedStore.of_function(encode, n_latents, batches=..., store=...)   any (N, D) -> (N, n_latents) >= 0 map
    .batches()                                     EncodedBatch per image batch: ids and the activations

The activations of a batch come sparse where the architecture keeps a fixed number of latents per token (the TopK
family's `SAE.encode_sparse`: per token the k values and latent indices, one top-k and no dense scatter), dense
otherwise (relu-l1, jumprelu, BatchTopK's inference threshold). Image-level reductions are asked of the batch
(`patch_mean`, `patch_max`, `fires_any`, `token`), which gives each as (b, n_latents) from either form: a pass
never builds the (b x T x n_latents) tensor where the SAE does not need it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from cytosae.sae.kernels import positive_counts

Batches = Callable[[], Iterable[tuple[list[str], torch.Tensor]]]


def _first_max(patches: torch.Tensor, best: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`patches.max(1)` of a dense (b, p, n) batch from its maxima `best` (b, n): the first patch holding each
    maximum, found by one comparison per patch from the last to the first. torch's max with indices over the
    middle dimension took 1.4x as long (204 vs 143 ms for 8 x 256 x 49,152, one thread)."""
    first = torch.zeros(best.shape, dtype=torch.long, device=best.device)
    for p in range(patches.shape[1] - 1, -1, -1):
        first.masked_fill_(patches[:, p] == best, p)
    return best, first


@dataclass
class EncodedBatch:
    """One batch of b images x t tokens (CLS first when `has_cls` and t > 1, as the store says). Either `dense`
    (b, t, n) or `vals`/`idx` (b, t, w): token i of image j has activation vals[j, i, r] on latent idx[j, i, r]
    and 0 on the latents not listed."""
    ids: list[str]
    n_latents: int
    dense: torch.Tensor | None = None
    vals: torch.Tensor | None = None
    idx: torch.Tensor | None = None
    has_cls: bool = True
    # a dense batch's reductions over its tokens, each one pass over (b x T x n) computed once: several of the
    # asked-for figures are cheap reductions of the same (b, n) maxima
    _reduced: dict = field(default_factory=dict, repr=False, compare=False)

    def _once(self, key: str, compute: Callable[[], torch.Tensor | tuple]):
        if key not in self._reduced:
            self._reduced[key] = compute()
        return self._reduced[key]

    def _token_max(self) -> torch.Tensor:
        """(b, n) largest activation over every token of each image (dense batches): CLS and the patch maximum."""
        if self._patch_tokens() == slice(None):
            return self.patch_max_values()
        return self._once("token_max", lambda: torch.maximum(self.dense[:, 0], self.patch_max_values()))

    @property
    def shape(self) -> tuple[int, int]:
        """(images, tokens per image)."""
        t = self.dense if self.dense is not None else self.vals
        return t.shape[0], t.shape[1]

    @property
    def sparse(self) -> bool:
        return self.dense is None

    def _patch_tokens(self) -> slice:
        """Patch tokens: all but CLS; one vector per image (imported embeddings) is its own only patch, and a store
        of patch tokens only (imported with has_cls=False) has no CLS to leave out."""
        return slice(1, None) if self.has_cls and self.shape[1] > 1 else slice(None)

    @property
    def n_patches(self) -> int:
        return self.shape[1] - int(self._patch_tokens() != slice(None))

    def _flat(self, tokens: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(image * n_latents + latent, value) of the kept pairs of `tokens`, flattened."""
        b = self.shape[0]
        image = torch.arange(b, device=self.idx.device).view(b, 1, 1) * self.n_latents
        return (image + self.idx[:, tokens]).flatten(), self.vals[:, tokens].flatten()

    def to_dense(self) -> torch.Tensor:
        """(b, t, n) activations; built from the pairs for a sparse batch (one image at a time is cheap)."""
        if self.dense is not None:
            return self.dense
        b, t = self.shape
        return torch.zeros(b, t, self.n_latents, device=self.vals.device).scatter_(2, self.idx, self.vals)

    def patch_mean(self) -> torch.Tensor:
        """(b, n) mean over the patch tokens (the image-level activation of the statistics)."""
        if self.dense is not None:
            return self.dense[:, self._patch_tokens()].mean(1)
        b, t = self.shape
        where, vals = self._flat(self._patch_tokens())
        # float64 sums: the mean of up to 256 patches, each pair added once
        total = torch.zeros(b * self.n_latents, dtype=torch.float64, device=vals.device)
        total.index_add_(0, where, vals.double())
        return (total / self.n_patches).float().view(b, self.n_latents)

    def patch_max_values(self) -> torch.Tensor:
        """(b, n) strongest patch activation, without its index (amax: a sixth of max()'s time on a dense batch)."""
        if self.dense is None:
            return self.patch_max()[0]
        if "patch_max" in self._reduced:
            return self._reduced["patch_max"][0]
        return self._once("patch_amax", lambda: self.dense[:, self._patch_tokens()].amax(1))

    def patch_max(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, n) strongest patch activation and its patch index (the first such patch; 0 where none fires)."""
        if self.dense is not None:
            patches = self.dense[:, self._patch_tokens()]
            if patches.device.type != "cpu":  # a GPU's max with indices is fast: no maxima pass before it
                return self._once("patch_max", lambda: patches.max(1))
            return self._once("patch_max", lambda: _first_max(patches, self.patch_max_values()))
        b, t = self.shape
        where, vals = self._flat(self._patch_tokens())
        best = torch.zeros(b * self.n_latents, device=vals.device).scatter_reduce_(0, where, vals, "amax")
        w = self.idx.shape[2]
        patch = torch.arange(self.idx[:, self._patch_tokens()].shape[1], device=vals.device)
        patch = patch.view(1, -1, 1).expand(b, -1, w).flatten()
        at_best = (vals == best[where]) & (vals > 0)
        first = torch.full((b * self.n_latents,), t, dtype=torch.long, device=vals.device)
        first.scatter_reduce_(0, where, torch.where(at_best, patch, t), "amin")
        first = torch.where(first == t, 0, first)
        return best.view(b, self.n_latents), first.view(b, self.n_latents)

    def fires_any(self) -> torch.Tensor:
        """(b, n) bool: the latent is > 0 on some token of the image (CLS included)."""
        if self.dense is not None:
            return self._token_max() > 0
        b, _ = self.shape
        where, vals = self._flat(slice(None))
        # the largest value per (image, latent) > 0: values are >= 0, and no boolean index (a device sync)
        best = torch.zeros(b * self.n_latents, device=vals.device).scatter_reduce_(0, where, vals, "amax")
        return (best > 0).view(b, self.n_latents)

    def fire_counts(self) -> torch.Tensor:
        """(n,) float64: tokens of the batch where each latent is > 0."""
        if self.dense is not None:
            return positive_counts(self.dense.view(-1, self.n_latents))
        out = torch.zeros(self.n_latents, dtype=torch.float64, device=self.vals.device)
        return out.index_add_(0, self.idx.flatten(), (self.vals > 0).flatten().double())

    def max_over_tokens(self) -> torch.Tensor:
        """(n,) largest activation over every token of the batch (0 where none fires)."""
        if self.dense is not None:
            return self._token_max().amax(0)
        out = torch.zeros(self.n_latents, device=self.vals.device)
        return out.scatter_reduce_(0, self.idx.flatten(), self.vals.flatten(), "amax")

    def nonzero(self, image: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token, latent, value) of one image's activations > 0, tokens ascending (a sparse matrix's COO)."""
        if self.dense is not None:
            tok, lat = (self.dense[image] > 0).nonzero(as_tuple=True)
            return tok, lat, self.dense[image][tok, lat]
        keep = self.vals[image] > 0
        tok = torch.arange(self.shape[1], device=keep.device)[:, None].expand_as(keep)
        return tok[keep], self.idx[image][keep], self.vals[image][keep]

    def token(self, i: int) -> torch.Tensor:
        """(b, n) activations of token i of every image (0: CLS)."""
        if self.dense is not None:
            return self.dense[:, i]
        b, _ = self.shape
        out = torch.zeros(b, self.n_latents, device=self.vals.device)
        return out.scatter_(1, self.idx[:, i], self.vals[:, i])


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


class EncodedStore:
    """A store (or any source of (ids, tokens (b, T, D)) batches) paired with an encoder on one device."""

    def __init__(self, store, sae, device: torch.device, batch_size: int = 8):
        """`device`: already resolved (steps.common.device); the SAE must be there (`SAE.load(dir, device=...)`
        or `sae.to(device)`), where every batch is sent."""
        device = torch.device(device)
        on = sae.W_enc.device
        if not _same_device(on, device):
            raise ValueError(f"the SAE is on {on} but its batches go to {device}: load it there "
                             f"(SAE.load(dir, device='{device}') or sae.to('{device}'))")
        self.store, self.sae, self.device, self.batch_size = store, sae, device, batch_size
        self.n_latents = sae.cfg.n_latents
        self.encode: Callable[[torch.Tensor], torch.Tensor] = sae.encode
        self._sparse = sae.encode_sparse
        self._batches: Batches = lambda: store.iter_images(batch_size)

    @classmethod
    def of_function(cls, encode: Callable[[torch.Tensor], torch.Tensor], n_latents: int,
                    batches: Iterable[tuple[list[str], torch.Tensor]] | None = None, store=None,
                    device: str | torch.device = "cpu", batch_size: int = 8) -> "EncodedStore":
        """Any dense encoder `encode` (N, D) -> (N, n_latents) >= 0 (a function, a baseline) over `batches`, or
        over `store`'s images when no batches are given; `device`: where `encode` computes."""
        self = cls.__new__(cls)
        self.store, self.sae, self.device, self.batch_size = store, None, torch.device(device), batch_size
        self.n_latents, self.encode, self._sparse = n_latents, encode, lambda x: None
        self._batches = (lambda: batches) if batches is not None else (lambda: store.iter_images(batch_size))
        return self

    @property
    def has_cls(self) -> bool:
        return True if self.store is None else bool(self.store.has_cls)

    @property
    def grid(self) -> int | None:
        return None if self.store is None else self.store.grid

    def encode_tokens(self, tokens: torch.Tensor, ids: list[str] | None = None) -> EncodedBatch:
        """(b, T, D) tokens (any device) -> their EncodedBatch on self.device."""
        b, t, d = tokens.shape
        x = tokens.to(self.device, non_blocking=True).reshape(-1, d)
        pairs = self._sparse(x)
        if pairs is not None:
            vals, idx = pairs
            return EncodedBatch(list(ids or []), self.n_latents, vals=vals.float().view(b, t, -1),
                                idx=idx.view(b, t, -1), has_cls=self.has_cls)
        z = torch.as_tensor(self.encode(x)).reshape(b, t, self.n_latents).float()
        return EncodedBatch(list(ids or []), self.n_latents, dense=z, has_cls=self.has_cls)

    def batches(self) -> Iterator[EncodedBatch]:
        """Every image batch encoded without autograd. The mode is entered per batch, never across a `yield`: a
        grad mode held by a suspended generator is the caller's thread's, and stays on if the caller stops early."""
        for ids, tokens in self._batches():
            with torch.no_grad():
                out = self.encode_tokens(tokens, ids)
            yield out

    def image(self, image_id: str) -> torch.Tensor:
        """(T, n_latents) dense activations of one stored image, on the CPU."""
        with torch.inference_mode():
            tokens = self.store.get_image(image_id).float()
            return self.encode_tokens(tokens[None]).to_dense()[0].cpu()
