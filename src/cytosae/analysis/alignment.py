"""Label alignment: do an SAE's latents track cell classes better than PCA, k-means or an untrained SAE?

Definitions (also written to alignment.json, so every number says what it is):
- each method is an encoder of token vectors (N, D) -> (N, L) scores, pooled to one score per image and
  latent by the same token policy as patient barcodes (analysis.patients.cell_activation: cls = the CLS
  token, any_patch = max over patch tokens, mean = mean over patch tokens);
- per latent x class, that image-level score ranks the images as "of this class": average precision (AP,
  sklearn's step-wise definition, ties grouped) and AUROC (ties count one half), both exact;
- per class, the best latent is the one of highest AP; Purity@16 is the share of its 16 highest-scoring
  images (store order breaks ties) that are of the class; Coverage@0.3 is the share of the class's images
  where it exceeds 0.3 x its range over the dataset, i.e. (s - min) > 0.3 (max - min): saev's
  "exceeds 0.3 x its max" for SAE latents (min 0), and the same for baselines whose scores can be negative;
- per SAE latent, its AP and AUROC for every class are kept too (latent_classes.parquet), its best class being
  the one of highest AP (compare with the class's prevalence: a random ranking's AP);
- only labelled images are ranked (an image without a label is no negative of every class); the table's
  figures are means over the classes that have at least one image;
- baselines on the same tokens and budget: pca = sklearn PCA with min(n_latents, D) components, each in both
  orientations (a component's sign is arbitrary); kmeans = sklearn MiniBatchKMeans with min(n_latents,
  max_clusters) centroids, score = minus the token's distance to the centroid; untrained_sae = the same SAE
  config at its initial weights (SAE(cfg, seed) with the training seed) and the trained SAE's input scale
  (a fixed normalisation computed from the data before training). PCA and k-means are fitted on a sample of
  the tokens the policy pools (CLS tokens, or patch tokens spread evenly over the images).

Exact, not binned: scores are kept as an (n_images x L) float32 matrix per method, so AP and AUROC are
sklearn's numbers, not histogram estimates. Cell datasets hold 10^3 - 10^5 images: 20,000 images x 6,144
latents is 0.5 GB; larger products are refused up front (max_cells) rather than approximated silently.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from pathlib import Path
from typing import Annotated, Callable, Iterable, Optional

import numpy as np
import pandas as pd
import torch

if TYPE_CHECKING:
    from cytosae.analysis.encoded import EncodedStore
from pydantic import Field

from cytosae.store.format import Written

DEFINITIONS = __doc__.split("Definitions (also written to alignment.json, so every number says what it is):\n")[1]
METHODS = ("sae", "pca", "kmeans", "untrained_sae")
PURITY_K = 16
COVERAGE_FRACTION = 0.3

Encoder = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Alignment:
    table: pd.DataFrame      # one row per method: mean best AP, mean Purity@16, mean Coverage@0.3, ...
    per_class: pd.DataFrame  # one row per method x class: best latent, its AP, AUROC, purity, coverage
    summary: dict = field(default_factory=dict)
    probing: pd.DataFrame | None = None  # one row per method x m x class: sparse probing (analysis.probing)
    latent_classes: pd.DataFrame | None = None  # the SAE's every latent x class: AP, AUROC (latent_class_table)


# ---------------------------------------------------------------- exact AP / AUROC for every latent at once


def latent_class_metrics(scores: np.ndarray, positive: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(n_images, L) scores and (C, n_images) bool class membership -> AP (C, L) and AUROC (C, L), each column's
    values equal to sklearn's average_precision_score / roc_auc_score (NaN for a class with no image, or AUROC
    for a class with every image). Columns are sorted once per chunk of latents and reused for every class."""
    n, n_latents = scores.shape
    pos = torch.as_tensor(np.asarray(positive, dtype=np.float64))
    n_pos = pos.sum(1)
    ap = np.full((len(pos), n_latents), np.nan)
    auc = np.full((len(pos), n_latents), np.nan)
    idx = torch.arange(n)[:, None]
    for lo in range(0, n_latents, chunk):
        s = torch.as_tensor(scores[:, lo:lo + chunk], dtype=torch.float64)
        order = s.argsort(dim=0, descending=True, stable=True)
        ss = s.gather(0, order)
        is_end = torch.ones_like(ss, dtype=torch.bool)
        is_end[:-1] = ss[:-1] != ss[1:]
        is_start = torch.ones_like(is_end)
        is_start[1:] = is_end[:-1]
        pos_idx = idx.expand_as(ss)
        # each rank's tie group: where it ends (precision is read there) and starts (for mid-ranks)
        end = torch.where(is_end, pos_idx, n).flip(0).cummin(0).values.flip(0)
        start = torch.where(is_start, pos_idx, -1).cummax(0).values
        midrank = n - (start + end).double() / 2  # ascending 1-based rank, ties averaged
        for c in range(len(pos)):
            p = float(n_pos[c])
            if p == 0:
                continue
            y = pos[c][order]
            tp_end = y.cumsum(0).gather(0, end)
            ap[c, lo:lo + chunk] = ((y * tp_end / (end + 1).double()).sum(0) / p).numpy()
            if p < n:
                auc[c, lo:lo + chunk] = (((y * midrank).sum(0) - p * (p + 1) / 2) / (p * (n - p))).numpy()
    return ap, auc


def latent_class_table(ap: np.ndarray, auc: np.ndarray, positive: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Every latent x class of the (C, L) AP and AUROC matrices: latent, class, ap, auroc, prevalence, best.

    All rows are kept, not only those with AP above the class's prevalence (a random ranking's AP): the latent page
    shows a latent's AP for every class, and a below-chance AP says something too. 49,152 latents x 13 classes is
    640k rows, about 5 MB of parquet. `best` marks each latent's class of highest AP (the first class in sorted
    order on ties); a dead latent ranks every image tied, so its AP equals each class's prevalence and its best
    class is merely the most common one: read `best` with `ap` against `prevalence`. Classes without an image
    (no AP) are left out."""
    keep = [c for c in range(len(classes)) if positive[c].any()]
    ap, auc, n_latents = ap[keep], auc[keep], ap.shape[1]
    best = np.zeros(ap.shape, dtype=bool)
    if keep:
        best[np.nanargmax(np.where(np.isnan(ap), -np.inf, ap), axis=0), np.arange(n_latents)] = True
    prevalence = positive[keep].mean(1)
    # latent-major order: the explorer slices one latent's rows by binary search
    return pd.DataFrame({"latent": np.tile(np.arange(n_latents), (len(keep), 1)).T.ravel(),
                         "class": np.tile(np.array([classes[c] for c in keep], dtype=object), n_latents),
                         "ap": ap.T.ravel(), "auroc": auc.T.ravel(),
                         "prevalence": np.tile(prevalence, n_latents), "best": best.T.ravel()})


def class_alignment(scores: np.ndarray, labels: np.ndarray, classes: list[str], method: str,
                    k: int = PURITY_K, fraction: float = COVERAGE_FRACTION,
                    metrics: tuple[np.ndarray, np.ndarray] | None = None) -> pd.DataFrame:
    """Per class: the best latent by AP, its AP and AUROC, Purity@k and Coverage@fraction (module docstring).
    `metrics`: latent_class_metrics' (AP, AUROC) for these scores when the caller has them already."""
    positive = np.stack([labels == c for c in classes])
    ap, auc = metrics if metrics is not None else latent_class_metrics(scores, positive)
    lo, hi = scores.min(0), scores.max(0)
    rows = []
    for c, cls in enumerate(classes):
        if not positive[c].any():
            continue
        best = int(np.nanargmax(ap[c]))
        s = scores[:, best]
        top = np.argsort(-s, kind="stable")[:k]
        covered = (s - lo[best]) > fraction * (hi[best] - lo[best]) if hi[best] > lo[best] else np.zeros_like(s, bool)
        rows.append({"method": method, "class": cls, "n_images": int(positive[c].sum()), "best_latent": best,
                     "ap": float(ap[c, best]), "auroc": float(auc[c, best]),
                     "prevalence": float(positive[c].mean()), f"purity@{k}": float(positive[c][top].mean()),
                     f"coverage@{fraction:g}": float(covered[positive[c]].mean())})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- image-level scores of several encoders, one pass


def image_scores(encoders: dict, images: Iterable[tuple[list[str], torch.Tensor]], token_policy: str,
                 max_cells: int = 500_000_000, pooling: dict[str, str] | None = None
                 ) -> tuple[list[str], dict[str, np.ndarray]]:
    """One pass over (ids, tokens (b, T, D)): every encoder's (n_images, L) image-level scores, pooled by
    `token_policy` (cell_activation) or by its own policy in `pooling`. `encoders`: name -> EncodedStore (the SAE's
    own, sparse for the TopK family; EncodedStore.of_function for a baseline), all on one device."""
    pooling = pooling or {}
    from cytosae.analysis.patients import cell_activation

    ids: list[str] = []
    parts: dict[str, list[np.ndarray]] = {name: [] for name in encoders}
    width = sum(e.n_latents for e in encoders.values())
    with torch.inference_mode():
        for batch_ids, tokens in images:
            b = tokens.shape[0]
            if (len(ids) + b) * width > max_cells:
                raise ValueError(f"{len(ids) + b:,}+ images x {width:,} scores exceed max_cells={max_cells:,} "
                                 f"(exact scores are kept in memory); raise --max-cells if the memory is there")
            for name, enc in encoders.items():
                batch = enc.encode_tokens(tokens)
                parts[name].append(cell_activation(batch, pooling.get(name, token_policy)).cpu().numpy())
            ids += list(batch_ids)
    if not ids:
        raise ValueError("the store has no images to measure alignment on")
    return ids, {name: np.concatenate(p) for name, p in parts.items()}


# ---------------------------------------------------------------- baselines


def fit_sample(images: Iterable[tuple[list[str], torch.Tensor]], n_images: int, token_policy: str,
               max_tokens: int = 20_000, seed: int = 0) -> np.ndarray:
    """Token vectors the baselines are fitted on: those the policy pools (CLS tokens for cls, else patch tokens,
    the same number drawn at random from every image), at most about max_tokens in all."""
    rng = np.random.default_rng(seed)
    per_image = max(1, -(-max_tokens // max(n_images, 1)))
    keep_every = max(1, -(-n_images // max_tokens))  # more images than tokens wanted: every few images
    out, seen = [], 0
    for _, tokens in images:
        t = tokens.shape[1]
        for img in tokens.float().numpy():
            if seen % keep_every == 0:
                out.append(img[:1] if token_policy == "cls" or t == 1
                           else img[1 + rng.choice(t - 1, size=min(per_image, t - 1), replace=False)])
            seen += 1
    return np.concatenate(out)


def pca_encoder(sample: np.ndarray, n_latents: int, seed: int = 0, device="cpu") -> tuple[Encoder, int]:
    """Projections on min(n_latents, D) principal components, each in both orientations: (N, 2 n_components)."""
    from sklearn.decomposition import PCA

    n = min(n_latents, sample.shape[1], len(sample))
    pca = PCA(n_components=n, random_state=seed).fit(sample.astype(np.float64))
    mean = torch.as_tensor(pca.mean_, dtype=torch.float32, device=device)
    comps = torch.as_tensor(pca.components_.T, dtype=torch.float32, device=device)

    def encode(x: torch.Tensor) -> torch.Tensor:
        p = (x.float() - mean) @ comps
        return torch.cat([p, -p], 1)
    return encode, 2 * n


def kmeans_encoder(sample: np.ndarray, n_latents: int, max_clusters: int = 512, seed: int = 0,
                   device="cpu") -> tuple[Encoder, int]:
    """Minus the distance to each of min(n_latents, max_clusters) MiniBatchKMeans centroids: (N, n_clusters)."""
    from sklearn.cluster import MiniBatchKMeans

    n = min(n_latents, max_clusters, len(sample))
    km = MiniBatchKMeans(n_clusters=n, random_state=seed, n_init=3, batch_size=min(4096, len(sample)))
    km.fit(sample.astype(np.float32))
    centers = torch.as_tensor(km.cluster_centers_, dtype=torch.float32, device=device)

    def encode(x: torch.Tensor) -> torch.Tensor:
        return -torch.cdist(x.float(), centers)
    return encode, n


def untrained_like(sae, seed: int):
    """The SAE's config at its initial weights (seed `seed`), with the trained SAE's input scale."""
    from cytosae.sae import SAE

    fresh = SAE(sae.cfg, seed=seed)
    with torch.no_grad():
        fresh.input_scale.copy_(sae.input_scale.detach().cpu())
    return fresh.to(sae.input_scale.device).eval()


# ---------------------------------------------------------------- the whole measurement


def compute_alignment(encoded: "EncodedStore", label_column: str = "label", token_policy: str = "any_patch",
                      seed: int = 0, max_clusters: int = 512, max_fit_tokens: int = 20_000,
                      max_cells: int = 500_000_000, dataset: str | None = None) -> Alignment:
    """SAE vs PCA, k-means and the untrained SAE on one labelled store (module docstring): `encoded` pairs the
    store with the SAE on its device (analysis.encoded.EncodedStore); the baselines are built on that device."""
    from cytosae.analysis.encoded import EncodedStore

    sae, store, device, batch_size = encoded.sae, encoded.store, encoded.device, encoded.batch_size
    images = store.images
    if label_column not in images.columns:
        raise ValueError(f"{store.path}/images.parquet has no {label_column!r} column (the class labels); "
                         f"it has {list(images.columns)}")
    label_of = {i: _label(v) for i, v in zip(images["image_id"].astype(str), images[label_column])}
    if all(v is None for v in label_of.values()):  # said before the long pass, not after it
        raise ValueError(f"{store.path}/images.parquet: column {label_column!r} holds no labels")
    n_latents = sae.cfg.n_latents
    sample = fit_sample(store.iter_images(batch_size), store.n_images, token_policy, max_fit_tokens, seed)
    of = lambda pair: EncodedStore.of_function(*pair, device=device)  # noqa: E731
    encoders = {"sae": encoded,
                "pca": of(pca_encoder(sample, n_latents, seed, device)),
                "kmeans": of(kmeans_encoder(sample, n_latents, max_clusters, seed, device)),
                "untrained_sae": EncodedStore(store, untrained_like(sae, seed), device, batch_size),
                "raw": of((lambda x: x, store.d_model))}  # the embedding itself, for sparse probing only
    ids, scores = image_scores(encoders, store.iter_images(batch_size), token_policy, max_cells,
                               pooling={"raw": "cls" if token_policy == "cls" else "mean"})
    labels = np.array([label_of.get(i) for i in ids], dtype=object)
    known = np.array([lab is not None for lab in labels])  # an unlabelled cell is no negative of every class
    classes = sorted(set(labels[known]))
    probing, probing_how = _probing(scores, labels, known, classes, images, ids)
    scores.pop("raw")
    positive = np.stack([labels[known] == c for c in classes])
    sae_metrics = latent_class_metrics(scores["sae"][known], positive)  # kept per latent, not only the best
    per_class = pd.concat([class_alignment(scores[m][known], labels[known], classes, m,
                                           metrics=sae_metrics if m == "sae" else None) for m in METHODS],
                          ignore_index=True)
    table = summarise(per_class, {m: s.shape[1] for m, s in scores.items()})
    summary = {"dataset": dataset or store.path.name, "store": str(store.path), "n_images": len(ids),
               "n_labelled": int(known.sum()), "classes": classes,
               "label_column": label_column, "token_policy": token_policy, "n_tokens": store.n_tokens,
               "d_model": store.d_model, "sae": {"arch": sae.cfg.arch, "n_latents": n_latents},
               "seed": seed, "fit_tokens": int(len(sample)), "max_clusters": max_clusters,
               "table": table.to_dict("records"), "definitions": DEFINITIONS.strip(),
               "probing": _probing_summary(probing, probing_how)}
    return Alignment(table, per_class, summary, probing, latent_class_table(*sae_metrics, positive, classes))


def _probing(scores: dict[str, np.ndarray], labels: np.ndarray, known: np.ndarray, classes: list[str],
             images: pd.DataFrame, ids: list[str]) -> tuple[pd.DataFrame | None, str]:
    """Sparse probing of every method and the raw embedding, in folds grouped by patient where there is one;
    (None, why) when the labelled images cannot be split into folds."""
    from cytosae.analysis.probing import sparse_probing

    groups = None
    if "patient_id" in images.columns and images["patient_id"].notna().all():
        patient_of = dict(zip(images["image_id"].astype(str), images["patient_id"].astype(str)))
        groups = np.array([patient_of[i] for i in ids], dtype=object)[known]
    try:
        return sparse_probing({m: s[known] for m, s in scores.items()}, labels[known], classes, groups)
    except ValueError as exc:  # a single patient, or a class with one image: no folds to probe in
        return None, f"not measured: {exc}"


def _probing_summary(probing: pd.DataFrame | None, how: str) -> dict:
    from cytosae.analysis.probing import DEFINITIONS as PROBING_DEFINITIONS, probing_table

    table = [] if probing is None else probing_table(probing).to_dict("records")
    return {"folds": how, "table": table, "definitions": PROBING_DEFINITIONS.strip()}


def _label(value):
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def summarise(per_class: pd.DataFrame, widths: dict[str, int]) -> pd.DataFrame:
    """One row per method: the means over classes, and how many scores it had to choose from."""
    means = per_class.groupby("method", sort=False)[["ap", "auroc", f"purity@{PURITY_K}",
                                                     f"coverage@{COVERAGE_FRACTION:g}"]].mean()
    means.columns = [f"mean_best_{c}" if c in ("ap", "auroc") else f"mean_{c}" for c in means.columns]
    table = means.reset_index()
    table.insert(1, "n_scores", table.method.map(widths))
    table.insert(2, "n_classes", table.method.map(per_class.groupby("method").size()))
    return table


def write_alignment(res: Alignment, out_dir) -> list:
    """OUT/alignment.parquet (the method table), alignment_classes.parquet (per class), alignment.json, and when
    measured probing.parquet and latent_classes.parquet (the SAE's every latent x class)."""
    from cytosae.store.format import atomic_write_json, atomic_write_parquet

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / TABLE, out / CLASSES, out / SUMMARY]
    atomic_write_parquet(paths[0], res.table)
    atomic_write_parquet(paths[1], res.per_class)
    atomic_write_json(paths[2], {**res.summary, "per_class": res.per_class.to_dict("records")})
    if res.latent_classes is not None:
        paths.append(out / LATENT_CLASSES)
        atomic_write_parquet(paths[-1], res.latent_classes)
    if res.probing is not None:
        paths.append(out / PROBING)
        atomic_write_parquet(paths[-1], res.probing)
    return paths


# ---------------------------------------------------------------- quality/ as its readers read it
SUMMARY, TABLE, CLASSES = "alignment.json", "alignment.parquet", "alignment_classes.parquet"
PROBING, LATENT_CLASSES = "probing.parquet", "latent_classes.parquet"
FILES = (TABLE, CLASSES, SUMMARY, LATENT_CLASSES, PROBING)  # every file write_alignment may write (a rerun removes them first)
FIX = "rebuild it with `cytosae align` (--run RUN: the same command)"


class MethodRow(Written):
    method: str
    n_scores: Annotated[int, Field(ge=0)]
    n_classes: Annotated[int, Field(ge=0)]
    mean_best_ap: Optional[float]
    mean_best_auroc: Optional[float]


class ClassRow(Written):
    method: str
    class_: str = Field(alias="class")
    best_latent: Optional[int] = None
    ap: Optional[float]
    auroc: Optional[float]


class AlignmentSummary(Written):
    dataset: str
    n_images: Annotated[int, Field(ge=0)]
    classes: list[str]
    label_column: str
    token_policy: str
    seed: int
    fit_tokens: Annotated[int, Field(ge=0)]
    table: list[MethodRow]
    per_class: list[ClassRow]
    definitions: str


def read_alignment(quality_dir: str | Path, shown: str | None = None) -> dict:
    """quality/alignment.json checked against AlignmentSummary; InvalidFile naming the file (`shown`) and field
    otherwise."""
    from cytosae.store.format import read_json_model

    return read_json_model(Path(quality_dir) / SUMMARY, AlignmentSummary, FIX, shown)
