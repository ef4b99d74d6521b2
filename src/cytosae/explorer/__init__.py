"""Web explorer (FastAPI + a self-contained page) and static report for a cytosae run directory."""
from .annotations import AnnotationStore, export as export_annotations

__all__ = ["create_app", "AnnotationStore", "export_annotations", "build_report"]


def create_app(*args, **kwargs):
    from .api import create_app as _create
    return _create(*args, **kwargs)


def build_report(*args, **kwargs):
    from .report import build_report as _build
    return _build(*args, **kwargs)
