"""What every step shares: opening its run, store and SAE with one-line errors, recording it in run.json."""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from cytosae.run import Run, check_name
from cytosae.steps.config import StepError, StepSettings

Warn = Optional[Callable[[str], None]]
log = logging.getLogger("cytosae.steps")


def warner(warn: Warn) -> Callable[[str], None]:
    """Where a step's warnings go: the caller's (the CLI prints them in yellow), else the log."""
    return warn or log.warning


@contextlib.contextmanager
def one_line(prefix: str = "") -> Iterator[None]:
    """Errors of bad input raised below (missing files, damaged stores, wrong values) as one-line StepErrors."""
    try:
        yield
    except StepError:
        raise
    except (FileNotFoundError, ValueError) as exc:
        raise StepError(f"{prefix}{exc}") from None


def open_run(run: str | Path | Run | None, create: bool = False, sae: str | None = None) -> Run | None:
    """The run (None without one) as the step sees it: with `sae`, as that SAE of its sweep sees it (its own
    SAE directory, analysis folders and, in a layer sweep, stores)."""
    if run is None:
        if sae is not None:
            raise StepError(f"--sae {sae} names an SAE of a run's sweep: give --run RUN too (or SAE_DIR and --out "
                            f"without --sae)")
        return None
    with one_line():
        rd = run if isinstance(run, Run) else Run.open(run, create=create)
        return rd.for_sae(sae) if sae is not None else rd


def run_dataset(rd: Run, dataset: str | None) -> str:
    with one_line():
        return rd.dataset(dataset)


def need(value, what: str, run_hint: str):
    """A required input that may come from the run instead of the settings."""
    if value is None:
        raise StepError(f"{what} is missing: give it, or --run RUN to {run_hint}")
    return value


def open_store(path: Path):
    """The activation store at `path`, checked (shard checksums), or a one-line error."""
    from cytosae.store import ActivationStore

    with one_line():
        return ActivationStore(path)


def open_sae(path: Path, allow_unfinished: bool = False, warn: Warn = None):
    """The SAE at `path`, checked (checksum, shapes, finite weights, finished training), or a one-line error."""
    from cytosae.sae import SAE
    from cytosae.sae.model import UnfinishedSAE, check_finished

    with one_line():
        sae = SAE.load(path, require_finished=not allow_unfinished)
    if allow_unfinished:
        try:
            check_finished(path, sae.training_progress)
        except UnfinishedSAE as exc:
            warner(warn)(f"warning: {str(exc).split('; rerun')[0]}; using it as it is (--allow-unfinished)")
    return sae


def device(spec: str):
    """The command's device, resolved once. (Encoding passes leave glibc's allocator as it is: allocator.py.)"""
    from cytosae.devices import resolve_device

    with one_line():
        return resolve_device(spec)


def analysis_batch(dev) -> int:
    """Images per SAE encoding batch: 8 keeps CPU memory small (8 x 257 x 49,152 floats = 0.4 GB);
    a GPU wants bigger batches to be busy, and 32 (1.6 GB) fits any GPU."""
    return 32 if dev.type == "cuda" else 8


def encoded_store(store, sae, dev):
    """The store's images through `sae` on `dev` (resolved once by the step), batched by analysis_batch: what
    every encoding pass of the step reads."""
    from cytosae.analysis.encoded import EncodedStore

    with one_line(f"{store.path}: "):
        return EncodedStore(store, sae, dev, analysis_batch(dev))


def draws_images(store) -> bool:
    """Galleries need the images as the backbone saw them and patch tokens; imported embeddings have neither."""
    return bool(store.meta.get("settings", {}).get("preprocessing")) and store.grid is not None


def record(rd: Run | None, step: str, cfg: StepSettings, started: float, inputs: dict | None = None, **extra) -> None:
    """Record the step that just finished in the run: its settings are the config as written (with the values
    taken from the run filled in), under the command that does the same."""
    if rd is None:
        return
    from cytosae.distributed import world_from_env

    if world_from_env()[0] != 0:  # under torchrun, rank 0 speaks for the run
        return
    settings = {**cfg.model_dump(mode="json"), **extra}
    command = f"cytosae {step.partition(':')[0]}"
    if rd.sae_name is not None and not step.endswith(f":{rd.sae_name}"):  # a sweep SAE's own record (`stats:NAME`)
        step = f"{step}:{rd.sae_name}"
    rd.record_step(step, command, settings, inputs=inputs, seconds=time.time() - started)


def default_name(data: Path) -> str:
    """A dataset's default name in a run: the data folder's name; for a CSV its own name (`cells.csv` -> cells),
    or its folder's for the generic `manifest.csv` (what `cytosae sample` writes)."""
    if data.suffix.lower() == ".csv":
        return data.absolute().parent.name if data.stem.lower() == "manifest" else data.stem
    return data.resolve().name


__all__ = ["StepError", "check_name", "open_run", "open_store", "open_sae", "record", "need", "device"]
