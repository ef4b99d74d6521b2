"""classify/results.json as its readers read it (the explorer's diagnosis page, notebooks, `cytosae classify`'s
summary lines): its name and schema, beside analysis/classify.py, whose write_classify and write_labels write it;
and the tables written beside it (predictions, explanations, MIL attention): their names, columns and kinds.

Two shapes share the file: patient-level diagnosis (`task` = the target column: n_patients, class_counts, per
model macro_f1 and auroc) and multi-label targets (`task` = "multi-label": labels, n_units, per model macro_auroc
and per_label). Scores the writer could not compute are null (JSON has no NaN), so every score may be null.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

from pydantic import Field, model_validator

from cytosae.store.format import Written

RESULTS = "results.json"
PREDICTIONS = "predictions.parquet"  # per model and patient (or unit, multi-label): out-of-fold probabilities
EXPLANATIONS = "explanations.parquet"  # per patient: the concepts that pushed its prediction
ATTENTION = "attention.parquet"  # MIL: per model and cell, its out-of-fold attention
FIX = "rebuild it with `cytosae classify` (--run RUN: the same command)"
# per table, the columns its readers use (the explorer's patient cells, notebooks) and the kinds they compute with:
# `p_*` (one probability column per class or label) and `attention_*` must be numbers wherever they appear. Ids and
# class labels are compared as text (astype(str)), so any type reads.
COLUMNS = {PREDICTIONS: ("model",), EXPLANATIONS: ("patient_id", "model", "latent", "contribution", "rank"),
           ATTENTION: ("model", "patient_id", "image_id", "predicted", "attention", "rank")}
KINDS = {PREDICTIONS: {"model": "text", "p_*": "number"},
         EXPLANATIONS: {"model": "text", "latent": "integer", "contribution": "number", "rank": "integer"},
         ATTENTION: {"model": "text", "attention": "number", "attention_*": "number", "rank": "integer"}}
# predictions.parquet's two shapes (classify/results.py): patient-level diagnosis, or multi-label units
PREDICTION_SHAPES = {"diagnosis": ("patient_id", "true", "decided"), "multi-label": ("unit",)}
Count = Annotated[int, Field(ge=0)]
Score = Optional[float]


class ModelScores(Written):
    """One model's entry under `models` (and `external`): the scores a reader formats, when present."""
    macro_f1: Score = None
    weighted_f1: Score = None
    auroc: Score = None
    auroc_ci: Optional[list[Score]] = None
    macro_f1_ci: Optional[list[Score]] = None
    folds: Optional[Count] = None
    repeats: Optional[Count] = None
    macro_auroc: Score = None
    per_label: Optional[dict[str, dict[str, Any]]] = None


class ClassifyResults(Written):
    task: str
    protocol: dict[str, Any]
    models: dict[str, ModelScores]
    dataset: Optional[str] = None
    n_patients: Optional[Count] = None
    class_counts: Optional[dict[str, Count]] = None
    labels: Optional[list[str]] = None
    n_units: Optional[Count] = None
    external: Optional[dict[str, ModelScores]] = None

    @model_validator(mode="after")
    def _shape(self) -> "ClassifyResults":
        if self.task == "multi-label":
            needed, per_model = ("labels", "n_units"), ("macro_auroc", "per_label")
        else:
            needed, per_model = ("n_patients", "class_counts"), ("macro_f1", "auroc")
        for key in needed:
            if getattr(self, key) is None:
                raise ValueError(f"{key}: is missing (a {self.task!r} result always records it)")
        for name, scores in self.models.items():
            for key in per_model:
                if key not in scores.model_fields_set:
                    raise ValueError(f"models.{name}.{key}: is missing (a {self.task!r} result always records it)")
        return self


def read_classify_results(classify_dir: str | Path, shown: str | None = None) -> dict:
    """classify/results.json checked against ClassifyResults; InvalidFile naming the file (`shown`) and field
    otherwise."""
    from cytosae.store.format import read_json_model

    return read_json_model(Path(classify_dir) / RESULTS, ClassifyResults, FIX, shown)


def read_classify_table(classify_dir: str | Path, file: str, shown: str | None = None):
    """One of classify/'s tables (a COLUMNS key) with the columns its readers use, each of its kind (KINDS), or
    InvalidFile naming the file (`shown`) and the column. predictions.parquet has one of PREDICTION_SHAPES and at
    least one `p_*` column."""
    from cytosae.store.format import InvalidFile, check_columns, read_table

    path = Path(classify_dir) / file
    shown = path if shown is None else shown
    df = read_table(path, COLUMNS[file], FIX, shown, KINDS[file])
    if file == PREDICTIONS:
        shape = "multi-label" if "unit" in df.columns else "diagnosis"
        check_columns(df, PREDICTION_SHAPES[shape], FIX, shown)
        if not any(str(c).startswith("p_") for c in df.columns):
            raise InvalidFile(shown, "columns", f"has no p_CLASS probability column (it has {list(df.columns)})", FIX)
    return df
