"""Backbones: DinoBloom / DINOv2 / timm ViTs, published checkpoint layouts, weight download."""
from .backbone import DINOBLOOM, Backbone, load_backbone
from .download import download_weights

__all__ = ["DINOBLOOM", "Backbone", "download_weights", "load_backbone"]
