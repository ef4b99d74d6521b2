"""cytosae: sparse autoencoders for hematology foundation models."""
__version__ = "0.1.0"

_SAE_EXPORTS = ("SAE", "SAEConfig", "train_sae")


def __getattr__(name):  # lazy: `import cytosae` stays cheap
    if name in _SAE_EXPORTS:
        from cytosae import sae
        return getattr(sae, name)
    if name in ("open_run", "RunView"):
        from cytosae import notebook
        return getattr(notebook, name)
    if name == "load_backbone":
        from cytosae.backbones import load_backbone
        return load_backbone
    raise AttributeError(f"module 'cytosae' has no attribute {name!r}")
