"""Activation store: token activations written once in shards, read sequentially."""
from .format import FORMAT, FORMAT_VERSION

# The reader, writer and importer need torch; format.py (the file layout, atomic writers, file readers) does not.
# Importing them on first use keeps `cytosae.store.format` light for cytosae.run, which raises its InvalidFile.
_LAZY = {"ActivationStore": "reader", "EmptyStoreError": "writer", "ExtractConfig": "writer",
         "ExtractResult": "writer", "extract": "writer", "import_embeddings": "importer"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ActivationStore", "EmptyStoreError", "ExtractConfig", "ExtractResult", "extract", "import_embeddings", "FORMAT", "FORMAT_VERSION"]
