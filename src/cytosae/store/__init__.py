"""Activation store: token activations written once in shards, read sequentially."""
from .format import FORMAT, FORMAT_VERSION
from .importer import import_embeddings
from .reader import ActivationStore
from .writer import EmptyStoreError, ExtractConfig, ExtractResult, extract

__all__ = ["ActivationStore", "EmptyStoreError", "ExtractConfig", "ExtractResult", "extract", "import_embeddings", "FORMAT", "FORMAT_VERSION"]
