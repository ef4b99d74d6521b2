"""The `cytosae` command line: a thin layer over the Python API.

Each command parses arguments, calls one API function and prints what it did,
on what. Heavy imports happen inside commands so `cytosae --help` stays fast.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Sparse autoencoders for hematology foundation models: images -> activations -> SAE -> concepts.",
)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


# ---------------------------------------------------------------- data (sample)


# ---------------------------------------------------------------- backbones / store (extract, import)


# ---------------------------------------------------------------- sae (train, evaluate, import-cytosae)


# ---------------------------------------------------------------- analysis (stats, patients, compare, classify)


# ---------------------------------------------------------------- explorer (explore, report, annotations)


def main() -> None:  # pragma: no cover - entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
