"""The classify step: patient-level diagnosis from concept barcodes with baselines and attention MIL, or
multi-label targets per image or patient (RUN/classify in a run)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cytosae.run import Run
from cytosae.steps.common import Warn, device, need, one_line, open_run, open_sae, open_store, record, warner
from cytosae.steps.config import ClassifySettings, StepError


@dataclass
class ClassifyResult:
    out: Path
    results: dict  # results.json
    repeats: int
    target: str = "diagnosis"
    labels: list[str] = field(default_factory=list)
    level: str = "patient"

    def lines(self) -> list[str]:
        return self._label_lines() if self.labels else self._diagnosis_lines()

    def _diagnosis_lines(self) -> list[str]:
        from cytosae.analysis.classify_results import ATTENTION, EXPLANATIONS, RESULTS

        res, p, out = self.results, self.results["protocol"], self.out
        lines = [f"{self.target} of {res['n_patients']} patients {res['class_counts']}, {p['repeats']} x "
                     f"{p['folds']}-fold CV over patients; AUROC and macro-F1 of calibrated out-of-fold predictions "
                     f"(threshold from training folds; 95% CI: bootstrap over patients):"]
        for name, m in res["models"].items():
            ci = m["auroc_ci"] or [float("nan")] * 2
            lines.append(f"  {name:<45} AUROC {m['auroc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]  macro-F1 "
                         f"{m['macro_f1']:.3f}  weighted-F1 {m['weighted_f1']:.3f}"
                         + (f"  ({m['repeats']} repeats)" if m['repeats'] != self.repeats else ""))
        for name, m in res.get("external", {}).items():
            ci = m["auroc_ci"] or [float("nan")] * 2
            lines.append(f"  external cohort, {name:<28} AUROC {m['auroc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] "
                         f"(CV {m['auroc_cv']:.3f}, drop {m['auroc_drop_from_cv']:+.3f})  macro-F1 {m['macro_f1']:.3f} "
                         f"(drop {m['macro_f1_drop_from_cv']:+.3f}) ({m['n_train']} train / {m['n_test']} test "
                         f"patients)")
        lines.append(f"-> {out / RESULTS}, {out / 'figures' / 'roc.png'}, {out / 'figures' / 'confusion.png'}"
                     + "".join(f", {out / f}" for f in (EXPLANATIONS, ATTENTION)
                               if (out / f).is_file()))
        return lines

    def _label_lines(self) -> list[str]:
        from cytosae.analysis.classify_results import PREDICTIONS, RESULTS

        res = self.results
        lines = [f"{len(self.labels)} labels of {res['n_units']} {self.level}s, {res['protocol']['cv']}; "
                 f"out-of-fold AUROC:"]
        for name, m in res["models"].items():
            lines.append(f"  {name:<30} macro AUROC {m['macro_auroc']:.3f} over {m['macro_auroc_over']}; "
                         + ", ".join(f"{c} {v['auroc']:.2f}" for c, v in m["per_label"].items()))
        lines.append(f"-> {self.out / RESULTS}, {self.out / PREDICTIONS}")
        return lines


def read_barcodes(path: Path):
    """The barcodes in `path` (the folder `cytosae patients` wrote, or its barcodes.parquet), checked by their
    writer's reader, or a one-line StepError."""
    from cytosae.analysis.patients import BARCODES, read_barcodes as read

    file = path / BARCODES if path.is_dir() else path
    if not file.is_file():
        raise StepError(f"{file} not found: give the folder written by `cytosae patients` or its {BARCODES}")
    with one_line():
        return read(file)


def _placed(cfg: ClassifySettings, rd: Run | None) -> tuple[ClassifySettings, Optional[str]]:
    """The settings with inputs taken from the run (its barcodes, store, SAE, external cohort's store), and the
    dataset whose patients are classified."""
    dataset = None
    if rd is not None:
        dataset = rd.steps.get("patients", {}).get("settings", {}).get("dataset")
        update = {"barcodes": cfg.barcodes or rd.patients_dir, "out": cfg.out or rd.classify_dir}
        if cfg.store is None and dataset in rd.datasets:
            update["store"] = rd.store_dir(dataset)
        if cfg.sae is None and rd.has_sae():
            update["sae"] = rd.sae_dir  # concept MIL and concept features use the run's SAE
        if cfg.external is not None and cfg.external_store is None and cfg.external.name in rd.datasets:
            update["external_store"] = rd.store_dir(cfg.external.name)  # RUN/external/NAME: barcodes of NAME
        cfg = cfg.model_copy(update=update)
    need(cfg.out, "--out", "write to RUN/classify")
    return cfg, dataset


def run_classify(cfg: ClassifySettings, run: str | Path | Run | None = None, warn: Warn = None) -> ClassifyResult:
    """Diagnosis from barcodes in repeated cross-validation over patients (and on an external cohort), with
    baselines and attention MIL; with cfg.labels, multi-label targets instead."""
    started = time.time()
    rd = open_run(run)
    given, (cfg, dataset) = cfg, _placed(cfg, rd)
    if cfg.labels:
        result = _labels(cfg, warn)
    else:
        result = _diagnosis(cfg, dataset, warn)
    record(rd, "classify", given, started, dataset=dataset)
    return result


def _diagnosis(cfg: ClassifySettings, dataset: Optional[str], warn: Warn) -> ClassifyResult:
    from cytosae.analysis.classify import ClassifyConfig, classify_patients, write_classify
    from cytosae.analysis.mil import MILConfig

    barcodes = need(cfg.barcodes, "BARCODES (the patients folder written by `cytosae patients`)", "use RUN/patients")
    bc = read_barcodes(barcodes)
    ext_bc = read_barcodes(cfg.external) if cfg.external else None
    st = open_store(cfg.store) if cfg.store is not None else None
    ext_st = open_store(cfg.external_store) if cfg.external_store is not None else None
    model = open_sae(cfg.sae, warn=warn) if cfg.sae is not None else None
    kinds = cfg.mil_kinds(st is not None, model is not None)
    token_policy = cfg.token_policy or _barcodes_policy(barcodes)
    ccfg = ClassifyConfig(target=cfg.target, n_splits=cfg.folds, n_repeats=cfg.repeats, seed=cfg.seed,
                          positive=cfg.positive, mil=kinds, mil_repeats=cfg.mil_repeats)
    mil_cfg = MILConfig(seed=cfg.seed, device=str(device(cfg.device)) if kinds else cfg.device,
                        max_epochs=cfg.mil_epochs)
    with one_line(f"{barcodes}: "):
        bags, ext_bags = mil_inputs(kinds, st, ext_st, model, token_policy, cfg.mil_embedding)
        res = classify_patients(bc, ccfg, store=st, cell_type_column=cfg.cell_type_column, proportion=cfg.proportion,
                                external=ext_bc, dataset=dataset or (cfg.store.name if cfg.store else None),
                                external_store=ext_st, bags=bags, external_bags=ext_bags, mil_cfg=mil_cfg)
    write_classify(res, cfg.out)
    return ClassifyResult(cfg.out, res, cfg.repeats, target=cfg.target)


def _barcodes_policy(barcodes: Path) -> str:
    """The token policy the barcodes were made with (their summary.json), else cls."""
    from cytosae.analysis.patients import SUMMARY, read_patients_summary

    folder = barcodes if barcodes.is_dir() else barcodes.parent
    if not (folder / SUMMARY).is_file():
        return "cls"
    with one_line():
        return read_patients_summary(folder).get("token_policy") or "cls"


def _labels(cfg: ClassifySettings, warn: Warn) -> ClassifyResult:
    from cytosae.analysis.classify import ClassifyConfig, classify_labels, write_labels

    if cfg.store is None:
        raise StepError("--labels needs --store (its manifest holds the label columns)")
    if cfg.level == "image" and cfg.sae is None:
        warner(warn)("no --sae: image-level labels from the embedding baseline only")
    bc = read_barcodes(cfg.barcodes) if cfg.level == "patient" and cfg.barcodes is not None else None
    st, model = open_store(cfg.store), (open_sae(cfg.sae, warn=warn) if cfg.sae is not None else None)
    ccfg = ClassifyConfig(n_splits=cfg.folds, n_repeats=cfg.repeats, seed=cfg.seed)
    with one_line(f"{cfg.store}: "):
        res = classify_labels(st, cfg.labels, ccfg, level=cfg.level, encode=model.encode if model else None,
                              token_policy=cfg.token_policy or "cls", barcodes=bc)
    write_labels(res, cfg.out)
    return ClassifyResult(cfg.out, res, cfg.repeats, labels=list(cfg.labels), level=cfg.level)


def mil_inputs(kinds, store, external_store, sae, token_policy: str, embedding: str) -> tuple[dict, dict]:
    """Per MIL input kind, the cells' features of the training and (when given) the external cohort."""
    from cytosae.analysis.mil import cell_features

    bags, ext = {}, {}
    for kind in kinds:
        args = dict(encode=sae.encode if sae is not None else None, token_policy=token_policy, embedding=embedding)
        bags[kind] = cell_features(store, kind, **args)
        if external_store is not None:
            ext[kind] = cell_features(external_store, kind, **args)
    return bags, ext
