"""Patient-level diagnosis from concept barcodes, against baselines, in patient-level cross-validation.

One row per patient: a patient's cells are summarised before any split, so a patient is never in a
training and a test fold at once. Scores are computed on out-of-fold predictions:

- for each repeat of stratified k-fold, every patient gets one out-of-fold prediction; macro-F1,
  per-class F1 and AUROC (binary: of the positive class; several classes: one-vs-rest, macro) are
  computed over all patients of that repeat, then averaged over repeats;
- confidence intervals: 95% percentile bootstrap over patients (resampling patients with
  replacement) of that same statistic: in each resample, the per-repeat metrics averaged over repeats.

Feature sets ("models"): concept barcodes (fraction of the patient's cells where each latent fires)
with L1- and L2-regularised logistic regression and a random forest; baselines on the same cells:
the mean-pooled backbone embedding (CLS token of the stored block, averaged over the patient's
cells), the cell-type composition (fraction of each cell type) and, when asked, the proportion of one
cell type alone (the DeepAPL study's promyelocyte proportion).

Modules by concern: models (settings, estimators), features, folds, metrics, bootstrap, thresholds,
calibration, cv (the repeated patient folds, MIL included), importance, external, multilabel, results
(files written) and patients (the whole analysis). Every name importable from the former single module
is re-exported here.
"""
from .bootstrap import CI_METHOD, _bootstrap_ci, group_weights, mean_auroc_draws, percentile_ci, weighted_auc
from .calibration import Calibration
from .cv import (_out_of_fold, cross_validate, cross_validate_mil, mil_fit_predict, run_cv,
                 sklearn_fit_predict)
from .external import _external, _external_all, external_validation, external_validation_mil
from .features import (_baseline_sets, _slug, barcode_features, barcode_matrix, composition_features,
                       mean_embedding_features)
from .folds import _group_folds, _splits, inner_folds
from .importance import ablation, concept_contributions, concept_importance
from .metrics import _auc, _binary_macro_f1, _confusion, _fast_scores, _mean_scores, _scores, brier
from .models import ClassifyConfig, ModelOrPrior, _fit, _in_classes, _positive, make_model
from .multilabel import classify_labels, classify_multilabel, label_table, truthy
from .patients import MIL_NOTES, classify_patients
from .results import _finite, write_classify, write_labels
from .thresholds import best_threshold

__all__ = ["CI_METHOD", "Calibration", "ClassifyConfig", "MIL_NOTES", "ModelOrPrior", "ablation", "barcode_features",
           "barcode_matrix", "best_threshold", "brier", "classify_labels", "classify_multilabel", "classify_patients",
           "composition_features", "concept_contributions", "concept_importance", "cross_validate",
           "cross_validate_mil", "external_validation", "external_validation_mil", "group_weights", "inner_folds",
           "label_table", "make_model", "mean_auroc_draws", "mean_embedding_features", "mil_fit_predict",
           "percentile_ci", "run_cv", "sklearn_fit_predict", "truthy", "weighted_auc", "write_classify",
           "write_labels"]
