"""Agreement between experts who judged latents (explorer/validation.py): per-latent agreement, Cohen's kappa for
two experts, Fleiss' kappa for three or more, the share of latents judged coherent, and how often the experts'
names for a latent agree with the automatic description's best class.

Kappa is computed over the three answers (coherent, not coherent, unsure), on the latents that every expert judged
(Fleiss' kappa needs the same number of raters per latent). It is undefined (None) when chance agreement is 1,
i.e. every answer was the same category.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
from sklearn.metrics import cohen_kappa_score

ANSWERS = ("coherent", "not_coherent", "unsure")


def cohen_kappa(a: list[str], b: list[str], labels=ANSWERS) -> float | None:
    """Cohen's kappa of two experts' answers to the same items, in the same order; None when undefined."""
    if len(a) != len(b):
        raise ValueError(f"two experts' answers must pair up: {len(a)} vs {len(b)}")
    if not a or len(set(a) | set(b)) == 1:  # p_e = 1: kappa is 0/0
        return None
    return float(cohen_kappa_score(a, b, labels=list(labels)))


def fleiss_kappa(counts) -> float | None:
    """Fleiss' kappa of an (items, categories) matrix of counts, each row summing to the same number of raters
    (>= 2); None when undefined. Written here because statsmodels (which has one) is not a dependency."""
    n_ij = np.asarray(counts, dtype=float)
    if n_ij.ndim != 2 or n_ij.shape[0] == 0:
        raise ValueError("counts must be a non-empty (items, categories) matrix")
    raters = n_ij.sum(axis=1)
    if not np.all(raters == raters[0]) or raters[0] < 2:
        raise ValueError(f"every item needs the same number (>= 2) of raters; got {sorted(set(raters.tolist()))}")
    n, n_items = raters[0], n_ij.shape[0]
    p_j = n_ij.sum(axis=0) / (n_items * n)
    p_e = float(np.sum(p_j ** 2))
    if np.isclose(p_e, 1.0):
        return None
    p_i = (np.sum(n_ij ** 2, axis=1) - n) / (n * (n - 1))
    return float((p_i.mean() - p_e) / (1 - p_e))


def modal_share(answers: list[str]) -> float:
    """Share of experts giving the most frequent answer (1.0 = all agree)."""
    return Counter(answers).most_common(1)[0][1] / len(answers)


def _kappa(df: pd.DataFrame, experts: list[str]) -> dict:
    wide = df.pivot(index="latent", columns="expert", values="answer").dropna()  # latents every expert judged
    out = {"method": None, "value": None, "latents": int(len(wide)), "note": None}
    if len(experts) < 2:
        out["note"] = "one expert: no agreement to measure"
    elif wide.empty:
        out["note"] = "no latent was judged by every expert"
    elif len(experts) == 2:
        out["method"] = "cohen"
        out["value"] = cohen_kappa(wide[experts[0]].tolist(), wide[experts[1]].tolist())
    else:
        out["method"] = "fleiss"
        counts = np.stack([(wide.to_numpy() == c).sum(axis=1) for c in ANSWERS], axis=1)
        out["value"] = fleiss_kappa(counts)
    if out["method"] and out["value"] is None:
        out["note"] = "undefined: every answer was the same (chance agreement is 1)"
    return out


def _names_vs_best_class(df: pd.DataFrame, descriptions: pd.DataFrame | None) -> dict:
    if descriptions is None:
        return {"compared": 0, "matching": 0, "share": None, "note": "no description: run cytosae describe"}
    best = descriptions["best_class"]
    compared = matching = 0
    for latent, name in zip(df["latent"], df["name"]):
        cls = best.get(latent)
        if not name or cls is None or cls != cls or not str(cls).strip():
            continue
        compared += 1
        name_l, cls_l = name.casefold(), str(cls).casefold()
        matching += cls_l in name_l or name_l in cls_l
    return {"compared": compared, "matching": matching, "share": matching / compared if compared else None,
            "note": None if compared else "no named answer for a latent with a best class"}


def agreement(answers: list[dict], descriptions: pd.DataFrame | None = None) -> dict:
    """The summary `cytosae annotations agreement` prints; `answers` as ValidationStore.all_answers() gives them,
    `descriptions` as read_descriptions() gives them (indexed by latent) or None."""
    df = pd.DataFrame(answers, columns=["expert", "latent", "answer", "name"])
    experts = sorted(df["expert"].unique().tolist())
    per_latent = []
    for latent, g in df.groupby("latent", sort=True):
        counts = Counter(g["answer"])
        top = max(ANSWERS, key=lambda c: (counts[c], -ANSWERS.index(c)))
        # a tie is reported as such; `modal` is then the first tied answer in ANSWERS order
        tied = sum(counts[c] == counts[top] for c in ANSWERS) > 1
        per_latent.append({"latent": int(latent), "n": len(g), "modal": top, "tied": tied,
                           "agreement": modal_share(list(g["answer"])), "counts": {c: counts[c] for c in ANSWERS}})
    multi = [p["agreement"] for p in per_latent if p["n"] >= 2]
    # judged coherent: more than half of the latent's experts said so
    coherent = sum(p["counts"]["coherent"] * 2 > p["n"] for p in per_latent)
    return {"experts": experts, "n_answers": int(len(df)), "latents_judged": len(per_latent),
            "kappa": _kappa(df, experts),
            "mean_agreement": float(np.mean(multi)) if multi else None, "latents_with_2_or_more": len(multi),
            "coherent_latents": int(coherent), "coherent_share": coherent / len(per_latent) if per_latent else None,
            "names_vs_best_class": _names_vs_best_class(df, descriptions), "per_latent": per_latent}


def lines(summary: dict) -> list[str]:
    """The summary for a terminal."""
    k = summary["kappa"]
    fmt = lambda x: "–" if x is None else f"{x:.3f}"  # noqa: E731
    kappa = (f"{k['method'].capitalize()}'s kappa {fmt(k['value'])} over {k['latents']} latents judged by every expert"
             if k["method"] else "kappa: –") + (f" ({k['note']})" if k["note"] else "")
    nb = summary["names_vs_best_class"]
    names = (f"names agreeing with the description's best class: {nb['matching']} of {nb['compared']} "
             f"({fmt(nb['share'])})") + (f" ({nb['note']})" if nb["note"] else "")
    return [f"{len(summary['experts'])} experts, {summary['n_answers']} answers, {summary['latents_judged']} latents judged",
            kappa,
            f"mean per-latent agreement (share giving the modal answer): {fmt(summary['mean_agreement'])} "
            f"over {summary['latents_with_2_or_more']} latents with 2 or more answers",
            f"judged coherent (by more than half of their experts): {summary['coherent_latents']} of "
            f"{summary['latents_judged']} latents ({fmt(summary['coherent_share'])})",
            names]
