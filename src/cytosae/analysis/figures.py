"""Figures of the concept analyses, as PNG files (matplotlib, no display needed).

Every figure's title or axis labels say what was measured and on what, so a PNG that
travels without its JSON summary still reads correctly.
"""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files; never open a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Render to memory, then write atomically: a killed run never leaves half a PNG."""
    from cytosae.store.format import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path


def frequency_activation_scatter(latents: pd.DataFrame, dataset: str) -> plt.Figure:
    """log10 image firing frequency vs log10 mean activation, coloured by top-k label entropy (PatchSAE/CytoSAE view)."""
    alive = latents[(latents.freq_image > 0) & (latents.mean_act > 0)]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    sc = ax.scatter(np.log10(alive.freq_image), np.log10(alive.mean_act), c=alive.label_entropy.fillna(0),
                    s=4, cmap="viridis", alpha=0.8, linewidths=0)
    fig.colorbar(sc, ax=ax, label="label entropy of top images (nats)")
    ax.set_xlabel("log10 image-level firing frequency")
    ax.set_ylabel("log10 mean activation over firing images")
    ax.set_title(f"{len(alive):,} latents firing on {dataset} ({len(latents) - len(alive):,} never fire)")
    return fig


def class_profile_heatmap(class_profile: pd.DataFrame, latents: pd.DataFrame, dataset: str, top: int = 40) -> plt.Figure:
    """Per-class mean activation of the `top` latents with the most class-specific profile (lowest entropy, firing)."""
    firing = latents[(latents.freq_image > 0)].sort_values(["label_entropy", "mean_act"], ascending=[True, False])
    chosen = firing.latent.head(top).tolist()
    mat = class_profile[class_profile.latent.isin(chosen)].pivot(index="class", columns="latent", values="mean_act")
    mat = mat.reindex(columns=chosen)
    # Each latent scaled to its own maximum: latents differ in scale by orders of magnitude.
    scaled = mat / mat.max(axis=0).replace(0, 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(chosen) + 2), 0.35 * len(mat) + 1.8))
    im = ax.imshow(scaled.to_numpy(), aspect="auto", cmap="magma", vmin=0, vmax=1)
    ax.set_yticks(range(len(mat)), mat.index)
    ax.set_xticks(range(len(chosen)), [str(j) for j in chosen], rotation=90, fontsize=6)
    ax.set_xlabel("latent (lowest label entropy first)")
    fig.colorbar(im, ax=ax, label="mean image activation / latent's max over classes")
    ax.set_title(f"class profiles on {dataset}")
    return fig


def barcode_figure(barcodes: pd.DataFrame, target: str, latents: list[int]) -> plt.Figure:
    """Patients (rows, grouped by `target`) x chosen latents: fraction of the patient's cells where it fires."""
    wide = barcodes[barcodes.latent.isin(latents)].pivot(index="patient_id", columns="latent", values="frac")
    groups = barcodes.drop_duplicates("patient_id").set_index("patient_id")[target].astype(str)
    order = groups.reindex(wide.index).sort_values(kind="stable").index
    wide = wide.reindex(index=order, columns=latents)
    fig, ax = plt.subplots(figsize=(max(6, 0.2 * len(latents) + 2), max(3, 0.12 * len(wide) + 1.5)))
    im = ax.imshow(wide.to_numpy(), aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    _group_ticks(ax, groups.reindex(order).to_numpy(), axis="y")
    ax.set_xticks(range(len(latents)), [str(j) for j in latents], rotation=90, fontsize=6)
    ax.set_xlabel("latent (most variable between patients first)")
    fig.colorbar(im, ax=ax, label="fraction of the patient's cells where the latent fires")
    ax.set_title(f"patient barcodes ({len(wide)} patients, grouped by {target})")
    return fig


def patient_correlation_heatmap(barcodes: pd.DataFrame, target: str) -> plt.Figure:
    """Pearson correlation between patients' full barcodes, patients ordered by `target`."""
    wide = barcodes.pivot(index="patient_id", columns="latent", values="frac")
    groups = barcodes.drop_duplicates("patient_id").set_index("patient_id")[target].astype(str)
    order = groups.reindex(wide.index).sort_values(kind="stable").index
    x = wide.reindex(order).to_numpy(dtype=float)
    x = x[:, x.std(0) > 0]  # latents constant across patients carry no correlation
    corr = np.corrcoef(x) if x.shape[1] >= 2 else np.eye(len(order))
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    im = ax.imshow(np.nan_to_num(corr), cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    g = groups.reindex(order).to_numpy()
    _group_ticks(ax, g, axis="y")
    _group_ticks(ax, g, axis="x")
    fig.colorbar(im, ax=ax, label="Pearson r between barcodes")
    ax.set_title(f"patient x patient barcode correlation\n({len(order)} patients, {x.shape[1]} latents varying)", fontsize=9)
    return fig


def volcano(compare: pd.DataFrame, group_a: str, group_b: str, q_max: float = 0.05, label_top: int = 10) -> plt.Figure:
    """Effect (difference of mean firing fractions) against -log10 BH q, one point per latent."""
    df = compare[(compare.group_a.astype(str) == str(group_a)) & (compare.group_b.astype(str) == str(group_b))]
    y = -np.log10(df.q.clip(lower=1e-300))
    sig = df.q < q_max
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    ax.scatter(df.effect[~sig], y[~sig], s=5, c="0.6", linewidths=0, label=f"q >= {q_max}")
    ax.scatter(df.effect[sig], y[sig], s=8, c="crimson", linewidths=0, label=f"q < {q_max} ({int(sig.sum())})")
    for _, row in df.nsmallest(label_top, "q").iterrows():
        ax.annotate(str(int(row.latent)), (row.effect, -np.log10(max(row.q, 1e-300))), fontsize=6)
    ax.axhline(-np.log10(q_max), color="0.4", lw=0.6, ls="--")
    ax.set_xlabel(f"mean fraction of cells firing: {group_a} - {group_b}")
    ax.set_ylabel("-log10 q (Benjamini-Hochberg)")
    ax.set_title(f"disease comparison per latent: {group_a} vs {group_b} ({len(df):,} latents)")
    ax.legend(fontsize=7, loc="upper left")
    return fig


def roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], title: str) -> plt.Figure:
    """curves: name -> (false positive rate, true positive rate, AUROC)."""
    fig, ax = plt.subplots(figsize=(5.2, 5.0))
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, lw=1.4, label=f"{name} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=7.5)
    ax.legend(fontsize=7, loc="lower right")
    return fig


def _group_ticks(ax, groups: np.ndarray, axis: str) -> None:
    """One tick per group at its centre, lines between groups: patients are too many to label one by one."""
    edges = [0] + [i for i in range(1, len(groups)) if groups[i] != groups[i - 1]] + [len(groups)]
    centres = [(a + b - 1) / 2 for a, b in zip(edges, edges[1:])]
    names = [str(groups[a]) for a in edges[:-1]]
    if axis == "y":
        ax.set_yticks(centres, names)
        for e in edges[1:-1]:
            ax.axhline(e - 0.5, color="k", lw=0.8)
    else:
        ax.set_xticks(centres, names)
        for e in edges[1:-1]:
            ax.axvline(e - 0.5, color="k", lw=0.8)


def confusion_figure(matrices: dict[str, dict], title: str) -> plt.Figure:
    """matrices: model name -> {"classes", "matrix"} (rows true class, columns decided class), one panel each."""
    n = len(matrices)
    cols = min(n, 3)
    rows = -(-n // cols)
    k = len(next(iter(matrices.values()))["classes"])
    fig, axes = plt.subplots(rows, cols, figsize=(cols * (1.2 + 0.45 * k), rows * (1.0 + 0.45 * k)), squeeze=False)
    for ax, (name, c) in zip(axes.flat, matrices.items()):
        m = np.asarray(c["matrix"])
        ax.imshow(m, cmap="Blues")
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > m.max() / 2 else "black")
        ax.set_xticks(range(k), c["classes"], rotation=45, ha="right", fontsize=6)
        ax.set_yticks(range(k), c["classes"], fontsize=6)
        ax.set_title(name, fontsize=7)
        ax.set_xlabel("decided class (patients)", fontsize=6)
        ax.set_ylabel("true class", fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=7.5)
    fig.tight_layout()
    return fig
