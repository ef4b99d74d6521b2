"""The pipeline's steps as a Python API: one validated settings class and one function per step.

    from cytosae.steps import TrainSettings, run_train
    res = run_train(TrainSettings(arch="topk", expansion=8, k=16), run="run")
    print("\\n".join(res.lines()))

Each `run_*` takes its settings and a run directory (inputs and outputs default to their places in it, and the
step is recorded in its run.json) or explicit paths in the settings, and returns a result that says what it did,
on what (`.lines()`). Bad settings raise StepError (a ValueError) with one line naming the key. The CLI
(`cytosae train ...`) and studies (`cytosae run study.toml`) call these same functions.
"""
from cytosae.steps.align import run_align
from cytosae.steps.analysis import AnalysisResult, run_patients, run_stats
from cytosae.steps.classify import ClassifyResult, run_classify
from cytosae.steps.compare import CompareSaesResult, run_compare_saes
from cytosae.steps.config import (AlignSettings, ClassifySettings, CompareSaesSettings, DescribeSettings,
                                  EvaluateSettings, ExtractSettings, PatientsSettings, StatsSettings, StepError,
                                  StepSettings, SweepSettings, TrainSettings, build)
from cytosae.steps.describe import run_describe
from cytosae.steps.evaluate import EvaluateResult, run_evaluate
from cytosae.steps.extract import ExtractResult, run_extract
from cytosae.steps.sweep import run_sweep
from cytosae.steps.train import TrainResult, run_train

__all__ = ["StepError", "StepSettings", "build",
           "ExtractSettings", "TrainSettings", "EvaluateSettings", "StatsSettings", "PatientsSettings",
           "ClassifySettings", "AlignSettings", "CompareSaesSettings", "SweepSettings", "DescribeSettings", "run_extract", "run_train", "run_evaluate",
           "run_stats", "run_patients", "run_classify", "run_align", "run_compare_saes", "run_sweep", "run_describe", "ExtractResult",
           "TrainResult", "EvaluateResult", "AnalysisResult", "ClassifyResult", "CompareSaesResult"]
