"""Where training metrics go besides the progress bar: a JSON-lines file, TensorBoard or Weights & Biases.

A logger is a callable `logger(step, metrics)` (what `train_sae(logger=...)` takes) with a `close()`.
TensorBoard and W&B are optional: they are imported only when asked for, and a missing package
is reported with the command that installs it.
"""
from __future__ import annotations

import json
from pathlib import Path

LOGGERS = ("none", "jsonl", "tensorboard", "wandb")


class JSONLinesLogger:
    """Appends one JSON object per logged step to DIR/metrics.jsonl; a resumed run continues the same file."""

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")

    def __call__(self, step: int, metrics: dict) -> None:
        self._fh.write(json.dumps({"step": step, **metrics}) + "\n")
        self._fh.flush()  # a killed run keeps every line logged before it died

    def close(self) -> None:
        self._fh.close()


class TensorBoardLogger:
    """Scalars under train/<metric> in DIR/tensorboard (view with `tensorboard --logdir DIR/tensorboard`)."""

    def __init__(self, directory: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("--log tensorboard needs the tensorboard package: pip install tensorboard==2.21.0") from None
        self.log_dir = Path(directory) / "tensorboard"
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def __call__(self, step: int, metrics: dict) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(f"train/{name}", value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbLogger:
    """One W&B run; offline unless the user has configured W&B (WANDB_MODE, `wandb login`)."""

    def __init__(self, directory: str | Path, config: dict | None = None, project: str = "cytosae") -> None:
        try:
            import wandb
        except ImportError:
            raise ValueError("--log wandb needs the wandb package: pip install wandb") from None
        self._run = wandb.init(project=project, dir=str(directory), config=config or {}, resume="allow")

    def __call__(self, step: int, metrics: dict) -> None:
        self._run.log(metrics, step=step)

    def close(self) -> None:
        self._run.finish()


def make_logger(kind: str, directory: str | Path, config: dict | None = None):
    """The logger named `kind` writing into `directory` (usually the SAE's output folder); None for "none"."""
    if kind == "none":
        return None
    if kind == "jsonl":
        return JSONLinesLogger(directory)
    if kind == "tensorboard":
        return TensorBoardLogger(directory)
    if kind == "wandb":
        return WandbLogger(directory, config)
    raise ValueError(f"--log must be one of {LOGGERS}, got {kind!r}")
