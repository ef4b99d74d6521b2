"""Stability: do two SAEs (two seeds of one study, two datasets, two sizes) learn the same latents?

A latent's direction is its decoder row (W_dec is (n_latents, d_in), model.py). A's latents are matched one-to-one
to B's by decoder cosine with the optimal assignment (the matching with the largest total cosine), and the share of
A's latents whose match reaches 0.7 / 0.9 is reported (docs/concepts.md says what they mean).

Two ways to solve the assignment, with one objective: the total of max(cosine, 0) over matched pairs, so a latent
with no partner of positive cosine is left unmatched and counts as cosine 0.
- dense: scipy's linear_sum_assignment on the full (n_A, n_B) matrix; exact, but O(n^3) time and n_A x n_B memory:
  used while the matrix is small (n_A x n_B <= DENSE_MAX_CELLS).
- candidates: for each latent of A only its top-c latents of B (computed blockwise, bounded memory, on the chosen
  device) are candidates, plus one "unmatched" edge of cosine 0 of its own; scipy's
  min_weight_full_bipartite_matching (LAPJVsp) solves that sparse graph exactly. This equals the dense answer
  whenever the optimal partner of every latent is among its top c (tests/test_stability.py), and is otherwise a
  lower bound of the total: a latent whose c best partners are taken by others is left unmatched, cosine 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

THRESHOLDS = (0.7, 0.9)
DENSE_MAX_CELLS = 4096 * 4096  # linear_sum_assignment on 16 M cells: seconds, 128 MB
BLOCK_BYTES = 256 * 1024 * 1024  # one block of cosines (A rows x all of B) on the device
METHODS = ("auto", "dense", "candidates")

DEFINITIONS = {
    "cosine": "cosine of the decoder rows (latent directions) of a matched pair; unmatched latents count as 0",
    "share_above_0.7": "share of A's latents whose matched latent of B has cosine >= 0.7: clearly the same feature",
    "share_above_0.9": "share of A's latents whose match has cosine >= 0.9: the same direction up to noise",
    "median_cosine": "median over all of A's latents of the matched cosine (unmatched = 0)",
    "mean_jaccard": "mean over matched pairs of |top images of a ∩ top images of b| / |union| (stats/top_images, "
                    "by image, the k both runs kept, datasets both runs hold, pairs where either latent has top "
                    "images); mean_jaccard_above_0.7: the same over the pairs of cosine >= 0.7",
}


@dataclass
class Matching:
    """A's latent i is matched to B's latent `match[i]` (-1: unmatched) at decoder cosine `cosine[i]` (0 unmatched)."""
    match: np.ndarray   # (n_A,) int64
    cosine: np.ndarray  # (n_A,) float64
    method: str         # "dense" | "candidates"
    candidates: int | None  # c of the candidate method


def _directions(w_dec: torch.Tensor, dev: torch.device) -> torch.Tensor:
    w = w_dec.detach().to(dev, torch.float32)
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def top_candidates(a: torch.Tensor, b: torch.Tensor, c: int, device: str | torch.device = "cpu",
                   block_bytes: int = BLOCK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """For each row of `a` (n_A, d) the `c` rows of `b` (n_B, d) of highest cosine: (indices, cosines), each
    (n_A, c), best first. Computed `block_bytes` of cosines at a time on `device`."""
    dev = torch.device(device)
    an, bn = _directions(a, dev), _directions(b, dev)
    c = min(c, bn.shape[0])
    rows = max(1, block_bytes // (4 * bn.shape[0]))
    idx, val = [], []
    with torch.no_grad():
        for start in range(0, an.shape[0], rows):
            v, i = torch.topk(an[start:start + rows] @ bn.T, c, dim=1)
            idx.append(i.cpu())
            val.append(v.cpu())
    return torch.cat(idx).numpy().astype(np.int64), torch.cat(val).double().numpy()


def match_dense(a: torch.Tensor, b: torch.Tensor, device: str | torch.device = "cpu") -> Matching:
    """The exact optimal assignment on the full cosine matrix (small SAEs only: n_A x n_B floats in memory)."""
    from scipy.optimize import linear_sum_assignment

    dev = torch.device(device)
    with torch.no_grad():
        cos = (_directions(a, dev) @ _directions(b, dev).T).clamp_min(0).double().cpu().numpy()
    rows, cols = linear_sum_assignment(-cos)
    return _finish(a.shape[0], rows, cols, cos[rows, cols], "dense", None)


def match_candidates(a: torch.Tensor, b: torch.Tensor, c: int = 8, device: str | torch.device = "cpu",
                     block_bytes: int = BLOCK_BYTES) -> Matching:
    """The optimal assignment restricted to each latent of A's top-c latents of B (see the module's docstring)."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    n_a, n_b = a.shape[0], b.shape[0]
    idx, val = top_candidates(a, b, c, device, block_bytes)
    keep = val > 0  # a negative or zero cosine is never better than staying unmatched
    rows = np.repeat(np.arange(n_a), idx.shape[1])[keep.ravel()]
    # costs 2 - cosine (in [1, 2)), the unmatched edge of row i (column n_b + i) costs 2, i.e. cosine 0: every
    # weight positive (a sparse matrix cannot store a zero-weight edge) and every row can always be matched
    cols = np.concatenate([idx[keep], n_b + np.arange(n_a)])
    cost = np.concatenate([2.0 - val[keep], np.full(n_a, 2.0)])
    graph = csr_matrix((cost, (np.concatenate([rows, np.arange(n_a)]), cols)), shape=(n_a, n_b + n_a))
    rows, cols = min_weight_full_bipartite_matching(graph)
    real = cols < n_b
    rows, cols = rows[real], cols[real]
    cos = val[rows][idx[rows] == cols[:, None]]  # each matched column is one of its row's candidates, once
    return _finish(n_a, rows, cols, cos, "candidates", int(idx.shape[1]))


def _finish(n_a: int, rows, cols, cos, method: str, c: int | None) -> Matching:
    match, cosine = np.full(n_a, -1, dtype=np.int64), np.zeros(n_a)
    pos = np.asarray(cos) > 0  # a pair of cosine 0 (clipped) is no match
    match[np.asarray(rows)[pos]] = np.asarray(cols)[pos]
    cosine[np.asarray(rows)[pos]] = np.asarray(cos)[pos]
    return Matching(match, cosine, method, c)


def match_latents(a: torch.Tensor, b: torch.Tensor, c: int = 8, device: str | torch.device = "cpu",
                  method: str = "auto", dense_max_cells: int = DENSE_MAX_CELLS) -> Matching:
    """Match the latents of decoders `a` (n_A, d) and `b` (n_B, d); method auto = dense while n_A x n_B is at most
    `dense_max_cells`, else candidates."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"decoders of shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be compared: the SAEs "
                         f"must read the same activations (same d_in)")
    if method == "dense" or (method == "auto" and a.shape[0] * b.shape[0] <= dense_max_cells):
        return match_dense(a, b, device)
    return match_candidates(a, b, c, device)


def matching_figures(m: Matching) -> dict:
    """The figures of a matching over all of A's latents (unmatched = cosine 0)."""
    out = {"n_latents_a": int(m.match.size), "n_matched": int((m.match >= 0).sum())}
    for t in THRESHOLDS:
        out[f"share_above_{t}"] = float((m.cosine >= t).mean()) if m.cosine.size else float("nan")
    out["median_cosine"] = float(np.median(m.cosine)) if m.cosine.size else float("nan")
    out["mean_cosine"] = float(m.cosine.mean()) if m.cosine.size else float("nan")
    return out


def top_image_overlap(m: Matching, tops_a, tops_b) -> dict:
    """Mean Jaccard of matched pairs' top images (stats/top_images.parquet tables of the two runs), over the
    datasets both hold and the top k both kept; pairs where neither latent has a top image are left out."""
    common = sorted(set(tops_a["dataset"].unique()) & set(tops_b["dataset"].unique()))
    if not common:
        return {"datasets": [], "k": 0, "n_pairs": 0, "mean_jaccard": None, "mean_jaccard_above_0.7": None,
                "note": "the two runs' stats hold no dataset of the same name"}
    ta, tb = (t[(t["by"] == "image") & t["dataset"].isin(common)] for t in (tops_a, tops_b))
    k = int(min(ta["rank"].max(), tb["rank"].max())) + 1 if len(ta) and len(tb) else 0
    sets_a, sets_b = (_top_sets(t[t["rank"] < k]) for t in (ta, tb))
    jac, cos = [], []
    for i in np.flatnonzero(m.match >= 0):
        sa, sb = sets_a.get(int(i), set()), sets_b.get(int(m.match[i]), set())
        if sa or sb:
            jac.append(len(sa & sb) / len(sa | sb))
            cos.append(m.cosine[i])
    jac, cos = np.asarray(jac), np.asarray(cos)
    strong = jac[cos >= 0.7]
    return {"datasets": common, "k": k, "n_pairs": int(jac.size),
            "mean_jaccard": float(jac.mean()) if jac.size else None,
            "n_pairs_above_0.7": int(strong.size),
            "mean_jaccard_above_0.7": float(strong.mean()) if strong.size else None}


def _top_sets(t) -> dict[int, set]:
    keys = list(zip(t["dataset"].astype(str), t["image_id"].astype(str)))
    out: dict[int, set] = {}
    for latent, key in zip(t["latent"].astype(int), keys):
        out.setdefault(int(latent), set()).add(key)
    return out


def lines(figures: dict) -> list[str]:
    """What was measured on what, one line each."""
    a, b = figures["a"], figures["b"]
    how = (f"{figures['method']} assignment" if figures["method"] == "dense" else
           f"assignment on each latent's top {figures['candidates']} candidates")
    out = [f"SAE A {a['sae_dir']} ({a['arch']}, {a['n_latents']} latents) vs SAE B {b['sae_dir']} ({b['arch']}, "
           f"{b['n_latents']} latents), d_in {a['d_in']}: one-to-one matching by decoder cosine ({how}, cosines on "
           f"{figures['device']})",
           f"of A's {figures['n_latents_a']} latents, {figures['n_matched']} matched; "
           f"share with cosine >= 0.7: {figures['share_above_0.7']:.3f}, >= 0.9: {figures['share_above_0.9']:.3f}; "
           f"median matched cosine {figures['median_cosine']:.3f} (unmatched = 0)"]
    ov = figures.get("top_images")
    if ov is None:
        out.append("top-image overlap: not measured (both need a run with stats/top_images.parquet, `cytosae stats`)")
    elif ov["mean_jaccard"] is None:
        out.append(f"top-image overlap: not measured ({ov.get('note', 'no matched pair has top images')})")
    else:
        strong = ov["mean_jaccard_above_0.7"]
        out.append(f"top-image overlap of matched pairs (top {ov['k']} images, datasets {', '.join(ov['datasets'])}): "
                   f"mean Jaccard {ov['mean_jaccard']:.3f} over {ov['n_pairs']} pairs"
                   + (f", {strong:.3f} over the {ov['n_pairs_above_0.7']} pairs of cosine >= 0.7"
                      if strong is not None else ""))
    return out


def sae_summary(sae, sae_dir: Path | str) -> dict:
    return {"sae_dir": str(sae_dir), "arch": sae.cfg.arch, "n_latents": int(sae.cfg.n_latents),
            "d_in": int(sae.cfg.d_in)}
