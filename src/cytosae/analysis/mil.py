"""Attention-based multiple-instance learning (MIL) over a patient's cells: the state-of-the-art patient classifier.

A patient is a bag of cells; the model scores each cell, pools the cells with learned attention and classifies the
pooled vector. As in SCEMILA (Hehr et al. 2023) there is one gated-attention branch (Ilse et al. 2018) per class:
class c attends to the cells that speak for c, pools them into its own vector and scores it, so a cell's
attention for the predicted class says how much that cell weighed in the diagnosis.

Two kinds of per-cell input, precomputed once per store (`cell_features`):
- ``embedding``: the backbone's vector of the cell (the stored CLS token, or the mean patch token) - the
  state-of-the-art baseline;
- ``concepts``: the cell's SAE activations under a token policy (as for barcodes) - the interpretable model:
  its first layer maps named concepts, so its weights say which concepts the attention and the classes use.

Training (`fit_mil`): class-balanced cross-entropy, Adam, minibatches of whole bags, early stopping on a
stratified validation split of the TRAINING patients only (the test fold is never seen), seeds fixed.
Inputs are scaled with statistics of the training cells only (embeddings: centred and scaled; concepts:
divided by their maximum, which keeps them sparse and non-negative).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

INPUTS = ("embedding", "concepts")


@dataclass
class MILConfig:
    hidden: int = 64
    attention: int = 32
    dropout: float = 0.1
    lr: float = 5e-3
    weight_decay: float = 1e-4
    max_epochs: int = 100
    patience: int = 15  # epochs without a better validation loss before stopping
    val_fraction: float = 0.2
    batch_bags: int = 8
    seed: int = 0
    device: str = "cpu"
    cpu_threads: int | None = 1  # the matrices are small: on a busy CPU more threads only contend (3-30x slower)
    train_cells: int | None = 128  # per epoch, each training bag shows a fresh random subset of at most this many
    # cells (augmentation, and the cost of a 500-cell bag drops ~4x); validation and prediction use every cell


@dataclass
class Bags:
    """Per-cell features grouped by patient: `x` (n_cells, d) float32, rows of patient i are offsets[i]:offsets[i+1]."""
    x: torch.Tensor
    offsets: np.ndarray
    patients: list[str]
    image_ids: list[str]
    feature_names: list = field(default_factory=list)

    def bag(self, i: int) -> torch.Tensor:
        return self.x[int(self.offsets[i]):int(self.offsets[i + 1])]

    def take(self, which) -> "Bags":
        """The bags at positions `which`, in that order."""
        rows = [np.arange(self.offsets[i], self.offsets[i + 1]) for i in which]
        flat = np.concatenate(rows) if rows else np.zeros(0, dtype=int)
        return Bags(self.x[torch.from_numpy(flat)], np.concatenate([[0], np.cumsum([len(r) for r in rows])]),
                    [self.patients[i] for i in which], [self.image_ids[i] for i in flat], self.feature_names)

    def subset(self, patients: list[str]) -> "Bags":
        """The bags of these patients, in that order (one-line error naming the first missing ones)."""
        where = {p: i for i, p in enumerate(self.patients)}
        missing = [p for p in patients if p not in where]
        if missing:
            raise ValueError(f"{len(missing)} patient(s) have no cell in the store (first: {missing[:3]})")
        return self.take([where[p] for p in patients])


def concat_bags(a: Bags, b: Bags) -> Bags:
    """Two cohorts' bags one after the other (same features: same backbone block, or same SAE)."""
    if a.x.shape[1] != b.x.shape[1]:
        raise ValueError(f"the cohorts' cell features differ in size ({a.x.shape[1]} vs {b.x.shape[1]}): "
                         "both stores must come from the same backbone block (and the same SAE)")
    return Bags(torch.cat([a.x, b.x]), np.concatenate([a.offsets, a.offsets[-1] + b.offsets[1:]]),
                a.patients + b.patients, a.image_ids + b.image_ids, a.feature_names)


def image_features(store, kind: str = "embedding", encode=None, token_policy: str = "cls", embedding: str = "cls",
                   batch_size: int = 64) -> tuple[list[str], torch.Tensor]:
    """(image ids, (n_images, d) float32) of every stored image, in store order.

    kind "embedding": the stored CLS token (`embedding="cls"`) or the mean patch token (`"mean_patch"`);
    kind "concepts": `encode`'s activations reduced per cell by `token_policy` (see patients.cell_activation),
    every latent kept so that two cohorts encoded by one SAE have the same columns.
    Stores with one vector per image use that vector for every choice."""
    from cytosae.analysis.patients import cell_activation

    if kind not in INPUTS:
        raise ValueError(f"MIL input must be one of {INPUTS}, got {kind!r}")
    if kind == "concepts" and encode is None:
        raise ValueError("concept MIL needs the SAE (its encode function)")
    if embedding not in ("cls", "mean_patch"):
        raise ValueError(f"embedding must be 'cls' or 'mean_patch', got {embedding!r}")
    ids, rows = [], []
    with torch.inference_mode():
        for batch_ids, tokens in store.iter_images(batch_size):
            b, t, d = tokens.shape
            if kind == "embedding":
                v = tokens[:, 0] if embedding == "cls" or t == 1 else tokens[:, 1:].mean(1)
            else:
                v = cell_activation(encode(tokens.reshape(-1, d)).reshape(b, t, -1).float(), token_policy)
            ids += list(batch_ids)
            rows.append(v.float().cpu())
    if not ids:
        raise ValueError(f"store {store.path} holds no images")
    return ids, torch.cat(rows)


def cell_features(store, kind: str = "embedding", encode=None, token_policy: str = "cls", embedding: str = "cls",
                  batch_size: int = 64) -> Bags:
    """Per-cell inputs (see image_features) of every patient's cells in `store`, grouped by patient."""
    images = store.images
    if "patient_id" not in images or images["patient_id"].isna().all():
        raise ValueError("the store's manifest has no patient_id column: MIL needs patients")
    patient_of = dict(zip(images["image_id"], images["patient_id"]))
    all_ids, x = image_features(store, kind, encode, token_policy, embedding, batch_size)
    keep = [i for i, j in enumerate(all_ids) if _is_patient(patient_of.get(j))]
    if not keep:
        raise ValueError("no stored cell belongs to a patient in the store's manifest")
    ids, x = [all_ids[i] for i in keep], x[torch.tensor(keep)]
    names = list(range(x.shape[1]))
    pid = np.array([str(patient_of[i]) for i in ids])
    order = np.argsort(pid, kind="stable")
    pid = pid[order]
    patients, starts = np.unique(pid, return_index=True)
    offsets = np.append(starts, len(pid))
    return Bags(x[torch.from_numpy(order)].contiguous(), offsets, [str(p) for p in patients],
                [ids[i] for i in order], names)


def _is_patient(p) -> bool:
    return p is not None and not (isinstance(p, float) and np.isnan(p)) and str(p) != ""


class AttentionMIL(nn.Module):
    """Cell encoder -> one gated-attention branch per class -> per-class pooled vector -> per-class score."""

    def __init__(self, d_in: int, n_classes: int, hidden: int = 64, attention: int = 32, dropout: float = 0.1):
        super().__init__()
        self.n_classes, self.attention = n_classes, attention
        self.encoder = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.V = nn.Linear(hidden, attention * n_classes)
        self.U = nn.Linear(hidden, attention * n_classes)
        self.w = nn.Parameter(torch.randn(n_classes, attention) / attention ** 0.5)
        self.head_w = nn.Parameter(torch.randn(n_classes, hidden) / hidden ** 0.5)
        self.head_b = nn.Parameter(torch.zeros(n_classes))

    def forward(self, x: torch.Tensor, bag: torch.Tensor, n_bags: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x (n_cells, d) of several bags, bag (n_cells,) bag index in 0..n_bags-1 (sorted) ->
        (logits (n_bags, C), attention (n_cells, C): each bag's column sums to 1)."""
        h = self.encoder(x)
        gated = torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))
        scores = (gated.view(-1, self.n_classes, self.attention) * self.w).sum(-1)  # (n_cells, C)
        # softmax within each bag: subtract the bag's max for stability, normalise by the bag's sum
        bag_max = torch.full((n_bags, self.n_classes), -torch.inf, device=x.device).scatter_reduce(
            0, bag[:, None].expand_as(scores), scores, "amax")
        e = torch.exp(scores - bag_max[bag])
        denom = torch.zeros(n_bags, self.n_classes, device=x.device).index_add(0, bag, e)
        att = e / denom[bag]
        pooled = torch.zeros(n_bags, self.n_classes, h.shape[1], device=x.device).index_add(
            0, bag, att[:, :, None] * h[:, None, :])
        logits = (pooled * self.head_w).sum(-1) + self.head_b
        return logits, att


@dataclass
class FittedMIL:
    model: AttentionMIL
    classes: list[str]
    shift: torch.Tensor
    scale: torch.Tensor
    epochs: int
    val_patients: list[str]
    val_proba: np.ndarray | None  # the validation patients' probabilities at the kept epoch (for calibration)
    val_y: np.ndarray | None
    device: str

    def predict(self, bags: Bags) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities (n_bags, C) in `classes` order, attention (n_cells, C) in bags.x row order)."""
        self.model.eval()
        with torch.no_grad():
            logits, att = _forward(self.model, bags, np.arange(len(bags.patients)), self.shift, self.scale,
                                   self.device)
        return torch.softmax(logits, 1).cpu().numpy().astype(np.float64), att.cpu().numpy()


def _batch(bags: Bags, which: np.ndarray, shift, scale, device, cap: int | None = None, rng=None):
    rows = [np.arange(bags.offsets[i], bags.offsets[i + 1]) for i in which]
    if cap is not None:
        rows = [np.sort(rng.choice(r, cap, replace=False)) if len(r) > cap else r for r in rows]
    bag = np.repeat(np.arange(len(which)), [len(r) for r in rows])
    x = bags.x[torch.from_numpy(np.concatenate(rows))].to(device)
    return (x - shift) / scale, torch.from_numpy(bag).to(device)


def _forward(model, bags, which, shift, scale, device, cap=None, rng=None):
    x, bag = _batch(bags, which, shift, scale, device, cap, rng)
    return model(x, bag, len(which))


def _scaling(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "concepts":  # keep zeros at zero: a concept that does not fire contributes nothing
        return torch.zeros(x.shape[1]), x.amax(0).clamp(min=1e-6)
    return x.mean(0), x.std(0).clamp(min=1e-6)


def _validation_split(y: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A stratified share of the training patients held out for early stopping; empty when a class has < 2."""
    val = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        if len(members) < 2:
            return np.array([], dtype=int)
        n = max(1, int(round(fraction * len(members))))
        val += list(rng.choice(members, min(n, len(members) - 1), replace=False))
    return np.sort(np.array(val, dtype=int))


def fit_mil(bags: Bags, y: np.ndarray, classes: list[str], kind: str = "embedding",
            cfg: MILConfig | None = None) -> FittedMIL:
    """Train on every bag of `bags` (y: their class names); early stopping on an inner validation split of them."""
    cfg = cfg or MILConfig()
    threads = torch.get_num_threads()
    if cfg.device == "cpu" and cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    try:
        return _fit_mil(bags, y, classes, kind, cfg)
    finally:
        torch.set_num_threads(threads)


def _fit_mil(bags: Bags, y: np.ndarray, classes: list[str], kind: str, cfg: MILConfig) -> FittedMIL:
    y = np.asarray(y).astype(str)
    codes = np.searchsorted(classes, y)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    val = _validation_split(codes, cfg.val_fraction, rng)
    train = np.setdiff1d(np.arange(len(y)), val)
    train_rows = torch.from_numpy(np.concatenate([np.arange(bags.offsets[i], bags.offsets[i + 1]) for i in train]))
    shift, scale = (t.to(cfg.device) for t in _scaling(bags.x[train_rows], kind))
    model = AttentionMIL(bags.x.shape[1], len(classes), cfg.hidden, cfg.attention, cfg.dropout).to(cfg.device)
    counts = np.bincount(codes[train], minlength=len(classes)).astype(np.float64)
    weight = torch.tensor(len(train) / (len(classes) * np.maximum(counts, 1)), dtype=torch.float32, device=cfg.device)
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    target = torch.from_numpy(codes).to(cfg.device)
    best, best_state, best_epoch, stale = np.inf, None, 0, 0
    for epoch in range(cfg.max_epochs):
        model.train()
        perm = rng.permutation(train)
        for start in range(0, len(perm), cfg.batch_bags):
            which = perm[start:start + cfg.batch_bags]
            logits, _ = _forward(model, bags, which, shift, scale, cfg.device, cfg.train_cells, rng)
            loss = loss_fn(logits, target[torch.from_numpy(which).to(cfg.device)])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if len(val) == 0:
            continue
        model.eval()
        with torch.no_grad():
            logits, _ = _forward(model, bags, val, shift, scale, cfg.device)
            v = float(loss_fn(logits, target[torch.from_numpy(val).to(cfg.device)]))
        if v < best - 1e-4:
            best, best_epoch, stale = v, epoch + 1, 0
            best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    fitted = FittedMIL(model, list(classes), shift, scale, best_epoch or cfg.max_epochs,
                       [bags.patients[i] for i in val], None, None, cfg.device)
    if len(val):
        fitted.val_proba = fitted.predict(bags.take(val))[0]
        fitted.val_y = y[val]
    return fitted


def attention_table(fitted: FittedMIL, bags: Bags, proba: np.ndarray, att: np.ndarray) -> pd.DataFrame:
    """Per cell: its patient, the predicted class, its attention for that class and its rank within the patient
    (rank 0 = the cell that weighed most), plus its attention for every class."""
    pred = np.asarray(fitted.classes)[proba.argmax(1)]
    bag = np.repeat(np.arange(len(bags.patients)), np.diff(bags.offsets))
    own = att[np.arange(len(att)), proba.argmax(1)[bag]]
    table = pd.DataFrame({"patient_id": np.asarray(bags.patients)[bag], "image_id": bags.image_ids,
                          "predicted": pred[bag], "attention": own,
                          **{f"attention_{c}": att[:, i] for i, c in enumerate(fitted.classes)}})
    table["rank"] = table.groupby("patient_id")["attention"].rank(ascending=False, method="first").astype(int) - 1
    return table.sort_values(["patient_id", "rank"]).reset_index(drop=True)


def concept_weights(fitted: FittedMIL, bags: Bags, top: int = 20) -> pd.DataFrame:
    """Concept MIL: per class, the latents whose input weights most raise that class's attention and score.

    Linearised through the first layer: weight of latent j for class c = sum over hidden units of
    W_enc[h, j] / scale_j x (head_w[c, h] + the hidden unit's pull on class c's attention, sum_a w[c,a] V[c,a,h])."""
    m = fitted.model
    with torch.no_grad():
        w_in = (m.encoder[0].weight / fitted.scale[None, :]).cpu()  # (H, d)
        V = m.V.weight.view(m.n_classes, m.attention, -1).cpu()  # (C, A, H)
        pull = torch.einsum("ca,cah->ch", m.w.cpu(), V) + m.head_w.cpu()  # (C, H)
        per = pull @ w_in  # (C, d)
    rows = [{"class": c, "latent": bags.feature_names[j], "weight": float(per[ci, j])}
            for ci, c in enumerate(fitted.classes) for j in range(per.shape[1])]
    table = pd.DataFrame(rows)
    table["abs_weight"] = table.weight.abs()
    return (table.sort_values("abs_weight", ascending=False, kind="stable").groupby("class").head(top)
            .reset_index(drop=True))
