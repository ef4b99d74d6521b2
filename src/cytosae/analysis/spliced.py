"""Faithfulness with the SAE spliced into the backbone.

A store holds the residual stream after block L (before the final norm). Its tokens are pushed through the
backbone's remaining blocks L+1.. and the final norm three ways: clean (the stored tokens), spliced (the SAE's
reconstruction of every token) and a control (every token replaced by the dataset mean of its group: the CLS
mean, the patch mean). The SAE is faithful when the spliced output stays close to the clean one, and when what a
classifier reads from the final CLS survives: `recovered` = (spliced - control) / (clean - control), 1 = all the
accuracy the clean tokens have over a content-free input, 0 = none of it.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch

from cytosae.sae.evaluate import fvu_warnings

GROUPS = ("cls", "patch")
INPUTS = ("clean", "spliced", "control")
LABEL_COLUMNS = ("label", "diagnosis")
KNN_K = 5
MAX_FOLDS = 5
Reconstruct = Callable[[torch.Tensor], torch.Tensor]  # (B, T, D) store-unit tokens -> same shape

DEFINITIONS = {
    "cosine": "mean over tokens of the cosine between the final output (after the final norm) of this input and "
              "that of the clean tokens",
    "relative_l2": "sqrt(sum ||out - clean||^2 / sum ||clean||^2) over the group's tokens",
    "fvu": "fraction of variance of the stored tokens the reconstruction leaves unexplained (the token mean = 1)",
    "knn": f"accuracy of a {KNN_K}-NN classifier (cosine distance) on the final CLS, cross-validated",
    "probe": "accuracy of a logistic-regression probe (standardised features) on the final CLS, cross-validated",
    "recovered": "(spliced - control) / (clean - control) of the accuracy; null when clean does no better than control",
    "control": "every token replaced by the dataset mean of its group (CLS mean, patch mean), through the same "
               "batched forward pass as the other inputs; every image then has the same final CLS, so the probe "
               "predicts its training folds' majority class and k-NN the majority of tied neighbours (sklearn takes "
               "the first k in training order): with patient-grouped folds that can be below chance",
}


# ---------------------------------------------------------------- the same backbone as the store's


def _extracted(store) -> dict:
    """The store's extraction settings, or a one-line ValueError for a store with no backbone recorded."""
    s = store.meta.get("settings") or {}
    if not s.get("backbone") or s.get("backbone") == "imported" or s.get("layer_index") is None:
        raise ValueError(f"store {store.path} was imported, not extracted by cytosae: it records no backbone to "
                         "splice the SAE into; extract it with `cytosae extract`")
    return s


def check_backbone(backbone, store) -> int:
    """The block index L the store's tokens are after, or a one-line ValueError when `backbone` is not the one
    the store was extracted with (name, weights sha256 / random seed, depth, width)."""
    s, where = _extracted(store), f"store {store.path}"
    if backbone.name != s["backbone"]:
        raise ValueError(f"{where} was extracted with backbone {s['backbone']!r}, not {backbone.name!r}")
    if s.get("weights_sha256"):
        if backbone.weights_sha256 != s["weights_sha256"]:
            got = f"sha256 {backbone.weights_sha256[:12]}" if backbone.weights_sha256 else "RANDOM weights"
            raise ValueError(f"{where} was extracted with weights sha256 {s['weights_sha256'][:12]}, this backbone "
                             f"has {got}; pass --weights the file it was extracted with")
    elif not backbone.random_weights:
        raise ValueError(f"{where} was extracted with RANDOM weights (seed {s.get('random_weights_seed')}), this "
                         f"backbone has weights sha256 {backbone.weights_sha256[:12]}")
    elif s.get("random_weights_seed") is None or backbone.seed != s["random_weights_seed"]:
        raise ValueError(f"{where} was extracted with RANDOM weights drawn with seed {s.get('random_weights_seed')}, "
                         f"this backbone's were drawn with seed {backbone.seed}: another backbone")
    if s.get("n_blocks") not in (None, backbone.n_blocks) or store.d_model != backbone.embed_dim \
            or store.n_tokens != backbone.n_tokens:
        raise ValueError(f"{where} was extracted with a {s.get('n_blocks')}-block backbone, {store.n_tokens} tokens "
                         f"of d={store.d_model}; this {backbone.name} has {backbone.n_blocks} blocks, "
                         f"{backbone.n_tokens} tokens of d={backbone.embed_dim} (other backbone options?)")
    return int(s["layer_index"])


def backbone_for_store(store, spec: dict | None = None, weights=None, device="cpu"):
    """Load the backbone `store` was extracted with, checked by `check_backbone`. `spec`: a run's backbone record
    (weights path, seed, timm options); `weights` overrides its weights file."""
    from cytosae.backbones import load_backbone

    s, spec = _extracted(store), dict(spec or {})
    weights = weights or spec.get("weights")
    if s.get("weights_sha256") and not weights:
        raise ValueError(f"store {store.path} was extracted with weights sha256 {s['weights_sha256'][:12]}: pass "
                         "--weights the file (or --run the run that records it)")
    seed = s.get("random_weights_seed")
    with warnings.catch_warnings():  # random weights are checked against the store's seed instead
        warnings.simplefilter("ignore", UserWarning)
        bb = load_backbone(s["backbone"], weights=weights, device=device,
                           seed=int(seed) if seed is not None else 0, **dict(spec.get("options") or {}))
    check_backbone(bb, store)
    return bb


def sae_reconstruct(sae) -> Reconstruct:
    """The SAE's reconstruction of every token, in store units (encode then decode, inference semantics)."""
    def reconstruct(tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(-1, tokens.shape[-1]).to(sae.W_enc.device)
        with torch.no_grad():
            return sae.decode(sae.encode(flat)).reshape(tokens.shape)
    return reconstruct


# ---------------------------------------------------------------- streaming passes over the store


def _batches(store, max_images: int | None, batch: int):
    seen = 0
    for _, toks in store.iter_images(batch_size=batch):
        if max_images is not None and seen >= max_images:
            return
        toks = toks[: None if max_images is None else max_images - seen]
        seen += toks.shape[0]
        yield toks


def group_means(store, max_images: int | None = None, batch: int = 8) -> dict[str, torch.Tensor]:
    """float32 dataset mean of the CLS token and of the patch tokens (summed in float64), plus each group's total
    variance sum ||x - mean||^2 (`cls_var`, `patch_var`), for the FVU."""
    sums = {g: torch.zeros(store.d_model, dtype=torch.float64) for g in GROUPS}
    sq, n = {g: 0.0 for g in GROUPS}, {g: 0 for g in GROUPS}
    for toks in _batches(store, max_images, batch):
        for g, x in (("cls", toks[:, 0]), ("patch", toks[:, 1:].reshape(-1, store.d_model))):
            x = x.double()
            sums[g] += x.sum(0)
            sq[g] += float(x.pow(2).sum())
            n[g] += x.shape[0]
    if n["cls"] == 0:
        raise ValueError(f"store {store.path} has no image to measure on")
    out = {g: (sums[g] / n[g]).float() for g in GROUPS}
    out.update({f"{g}_var": sq[g] - n[g] * float((sums[g] / n[g]).pow(2).sum()) for g in GROUPS})
    return out


class _Output:
    """Streaming closeness of one input's final output to the clean one, per token group (float64 sums)."""

    def __init__(self) -> None:
        self.cos = {g: 0.0 for g in GROUPS}
        self.sse = {g: 0.0 for g in GROUPS}
        self.ref = {g: 0.0 for g in GROUPS}
        self.n = {g: 0 for g in GROUPS}

    def add(self, out: torch.Tensor, clean: torch.Tensor) -> None:
        for g, sl in (("cls", slice(0, 1)), ("patch", slice(1, None))):
            o, c = out[:, sl].reshape(-1, out.shape[-1]).double(), clean[:, sl].reshape(-1, out.shape[-1]).double()
            self.cos[g] += float(torch.nn.functional.cosine_similarity(o, c, dim=1, eps=1e-12).sum())
            self.sse[g] += float((o - c).pow(2).sum())
            self.ref[g] += float(c.pow(2).sum())
            self.n[g] += o.shape[0]

    def result(self) -> dict:
        return {g: {"cosine": self.cos[g] / self.n[g],
                    "relative_l2": float(np.sqrt(self.sse[g] / self.ref[g])) if self.ref[g] > 0 else float("nan")}
                for g in GROUPS}


def splice(backbone, store, reconstruct: Reconstruct, layer: int, means: dict, max_images: int | None = None,
           batch: int = 8) -> dict:
    """Push the store's block-`layer` tokens through the rest of `backbone` as clean, spliced and control inputs.
    Returns the final CLS of each input (numpy (n, D)), the closeness of spliced and control to clean per group,
    and the reconstruction's FVU per group."""
    dev = backbone.device
    mean = {g: means[g].to(dev) for g in GROUPS}
    close = {k: _Output() for k in INPUTS[1:]}
    sse = {g: 0.0 for g in GROUPS}
    cls = {k: [] for k in INPUTS}
    for toks in _batches(store, max_images, batch):
        toks = toks.to(dev)
        recon = reconstruct(toks).to(dev, torch.float32)
        sse["cls"] += float((toks[:, 0] - recon[:, 0]).double().pow(2).sum())
        sse["patch"] += float((toks[:, 1:] - recon[:, 1:]).double().pow(2).sum())
        control = torch.cat([mean["cls"].expand(toks.shape[0], 1, -1),
                             mean["patch"].expand(toks.shape[0], toks.shape[1] - 1, -1)], dim=1)
        outs = {k: backbone.finish(x, layer) for k, x in zip(INPUTS, (toks, recon, control))}
        for k in INPUTS[1:]:
            close[k].add(outs[k], outs["clean"])
        for k in INPUTS:
            cls[k].append(outs[k][:, 0].cpu().numpy())
    fvu = {g: sse[g] / means[f"{g}_var"] if means[f"{g}_var"] > 0 else float("nan") for g in GROUPS}
    return {"cls_out": {k: np.concatenate(v) for k, v in cls.items()},
            "output": {k: close[k].result() for k in INPUTS[1:]}, "fvu": fvu}


# ---------------------------------------------------------------- what a classifier reads from the final CLS


def cell_folds(y: np.ndarray, groups: np.ndarray | None) -> tuple[list, str]:
    """The same cross-validation folds for all three inputs: grouped by patient when patients are known."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if groups is not None:
        n_splits = min(MAX_FOLDS, len(np.unique(groups)))
        if n_splits < 2:
            raise ValueError("all images come from one patient: no patient-grouped folds")
        cv, how = StratifiedGroupKFold(n_splits, shuffle=True, random_state=0), f"{n_splits}-fold grouped by patient_id"
    else:
        n_splits = min(MAX_FOLDS, int(pd.Series(y).value_counts().min()))
        if n_splits < 2:
            raise ValueError("a class has a single image: no stratified folds")
        cv, how = StratifiedKFold(n_splits, shuffle=True, random_state=0), f"{n_splits}-fold stratified"
    with warnings.catch_warnings():  # a class smaller than the number of folds is fine here
        warnings.simplefilter("ignore", UserWarning)
        return list(cv.split(np.zeros(len(y)), y, groups)), how


def _accuracy(make, x: np.ndarray, y: np.ndarray, folds: list) -> float:
    right = 0
    for train, test in folds:
        right += int((make(len(train)).fit(x[train], y[train]).predict(x[test]) == y[test]).sum())
    return right / sum(len(t) for _, t in folds)


def _recovered(acc: dict) -> Optional[float]:
    gap = acc["clean"] - acc["control"]
    return None if abs(gap) < 1e-12 else (acc["spliced"] - acc["control"]) / gap


def downstream(cls_out: dict[str, np.ndarray], images: pd.DataFrame) -> dict:
    """Per label column: k-NN and logistic-probe accuracy of the final CLS under the three inputs, in the same
    folds (pooled over the held-out images), and the fraction recovered. A column that cannot be cross-validated
    says why under `skipped`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    models = {"knn": lambda n: KNeighborsClassifier(min(KNN_K, n), metric="cosine", algorithm="brute"),
              "probe": lambda n: make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))}
    out = {}
    n = len(next(iter(cls_out.values())))
    for col in (c for c in LABEL_COLUMNS if c in images.columns):
        table = images.iloc[:n].reset_index(drop=True)
        keep = table[col].notna().to_numpy()
        y = table[col].astype(str).to_numpy()[keep]
        groups = table["patient_id"].astype(str).to_numpy()[keep] if "patient_id" in table.columns \
            and table["patient_id"].notna().all() else None
        entry = {"n_images": int(keep.sum()), "n_classes": int(len(np.unique(y)))}
        try:
            if entry["n_classes"] < 2:
                raise ValueError(f"one class only ({y[0] if len(y) else 'no labels'})")
            folds, entry["folds"] = cell_folds(y, groups)
            for name, make in models.items():
                acc = {k: _accuracy(make, cls_out[k][keep], y, folds) for k in INPUTS}
                entry[name] = {**acc, "recovered": _recovered(acc)}
        except ValueError as exc:  # too few classes, patients or images for folds; a fold with one class
            entry["skipped"] = str(exc).splitlines()[0]
        out[col] = entry
    return out


# ---------------------------------------------------------------- the whole measurement


def spliced_faithfulness(backbone, store, sae=None, reconstruct: Reconstruct | None = None,
                         max_images: int | None = None, batch: int = 8, warn=None) -> dict:
    """Splice the SAE (or any `reconstruct`) into `backbone` after the store's block; the figures as a dict.
    `warn` receives one line per token group the reconstruction represents worse than its mean (FVU > 1)."""
    if not store.has_cls:
        raise ValueError(f"store {store.path} has no CLS token: the spliced comparison needs CLS + patch tokens")
    layer = check_backbone(backbone, store)
    if reconstruct is None:
        reconstruct = sae_reconstruct(sae)
    means = group_means(store, max_images, batch)
    res = splice(backbone, store, reconstruct, layer, means, max_images, batch)
    n = len(res["cls_out"]["clean"])
    s = store.meta.get("settings") or {}
    figures = {
        "store": str(store.path), "n_images": n,
        "backbone": {"name": backbone.name, "weights_sha256": s.get("weights_sha256"),
                     "random_weights_seed": s.get("random_weights_seed"), "n_blocks": backbone.n_blocks,
                     "layer_index": layer, "remaining_blocks": list(range(layer + 1, backbone.n_blocks))},
        "fvu": res["fvu"], "output": res["output"], "downstream": downstream(res["cls_out"], store.images),
        "definitions": DEFINITIONS,
    }
    for line in fvu_warnings(res["fvu"], f"{n} images") if warn is not None else []:
        warn(line)
    return figures


def lines(f: dict, dataset: str | None = None) -> list[str]:
    """What the figures say, each line naming what was measured and on what."""
    b = f["backbone"]
    on = f"{dataset or f['store']}, {f['n_images']} images"
    rest = f"blocks {b['remaining_blocks'][0]}..{b['remaining_blocks'][-1]}" if b["remaining_blocks"] else "no block"
    weights = (f"weights sha256 {b['weights_sha256'][:12]}" if b["weights_sha256"]
               else f"RANDOM weights, seed {b['random_weights_seed']}")
    out = [f"spliced: SAE reconstruction of block {b['layer_index']} tokens through {rest} + final norm of "
           f"{b['name']} ({b['n_blocks']}-block, {weights}), on {on}:"]
    for g, name in (("cls", "final CLS"), ("patch", "final patches")):
        sp, ct = f["output"]["spliced"][g], f["output"]["control"][g]
        out.append(f"  {name:<14} vs clean: spliced cosine {sp['cosine']:.4f}, rel L2 {sp['relative_l2']:.4f}; "
                   f"control (token means) cosine {ct['cosine']:.4f}, rel L2 {ct['relative_l2']:.4f} "
                   f"(SAE FVU {f['fvu'][g]:.4g})")
    for col, e in f["downstream"].items():
        if "skipped" in e:
            out.append(f"  {col}: not cross-validated ({e['skipped']})")
            continue
        for model, what in (("knn", f"{KNN_K}-NN"), ("probe", "logistic probe")):
            a = e[model]
            rec = "n/a (clean no better than control)" if a["recovered"] is None else f"{a['recovered']:.3f}"
            out.append(f"  {col} ({e['n_classes']} classes, {e['n_images']} images, {e['folds']}) {what} on final "
                       f"CLS: clean {a['clean']:.3f}, spliced {a['spliced']:.3f}, control {a['control']:.3f} -> "
                       f"recovered {rec}")
    return out
