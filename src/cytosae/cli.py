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


def _open_store(path: Path):
    """The activation store at `path`, or a one-line error saying what is wrong and how to make one."""
    from cytosae.store import ActivationStore

    try:
        return ActivationStore(path)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))


def _open_sae(path: Path, allow_unfinished: bool = False):
    """The SAE at `path`, checked (checksum, shapes, finite weights, finished training), or a one-line error."""
    from cytosae.sae import SAE
    from cytosae.sae.model import UnfinishedSAE, check_finished

    try:
        sae = SAE.load(path, require_finished=not allow_unfinished)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    if allow_unfinished:
        try:
            check_finished(path, sae.training_progress)
        except UnfinishedSAE as exc:
            typer.secho(f"warning: {str(exc).split('; rerun')[0]}; using it as it is (--allow-unfinished)",
                        fg=typer.colors.YELLOW, err=True)
    return sae


ALLOW_UNFINISHED = typer.Option(False, "--allow-unfinished",
                                help="Use an SAE whose training has not finished (saved at an intermediate checkpoint).")


RUN_HELP = "Run directory (docs/run-layout.md): inputs and outputs default to their places in it, and the step is " \
           "recorded in its run.json."


def _open_run(run: Optional[Path], create: bool = False):
    """The run at `run` (None when not given), or a one-line error."""
    if run is None:
        return None
    from cytosae.run import Run

    try:
        return Run.open(run, create=create)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))


def _run_dataset(rd, dataset: Optional[str]) -> str:
    try:
        return rd.dataset(dataset)
    except ValueError as exc:
        _fail(str(exc))


def _need(value, what: str, run_hint: str):
    """A required input that may come from the run instead of the command line."""
    if value is None:
        _fail(f"{what} is missing: give it, or --run RUN to {run_hint}")
    return value


def _record(ctx: typer.Context, run, step: str, started: float, inputs: Optional[dict] = None, **extra) -> None:
    """Record the command that just finished as `step` in the run (its settings are the command's parameters)."""
    if run is None:
        return
    import time

    from cytosae.distributed import world_from_env

    if world_from_env()[0] != 0:  # under torchrun, rank 0 speaks for the run
        return
    settings = {k: v for k, v in ctx.params.items() if k != "run"}
    settings.update(extra)
    run.record_step(step, f"cytosae {ctx.info_name}", settings, inputs=inputs, seconds=time.time() - started)


# ---------------------------------------------------------------- data (sample)


@app.command()
def sample(
    out: Path = typer.Argument(..., help="Folder to write images, manifest.csv and patients.csv into."),
    seed: int = typer.Option(0, help="Same seed, same bytes."),
    patients: int = typer.Option(12, help="Number of synthetic patients (alternating APL-like / AML-like)."),
    cells: int = typer.Option(24, help="Cells per patient."),
) -> None:
    """Draw the built-in synthetic sample: cells with known factors, patients whose class mix follows diagnosis."""
    import pandas as pd

    from cytosae.data.synthetic import make_sample

    manifest = make_sample(out, seed=seed, n_patients=patients, cells_per_patient=cells)
    table = pd.read_csv(manifest)
    typer.echo(f"wrote {len(table)} synthetic cells ({table.label.nunique()} classes, {patients} patients) and "
               f"their generating factors to {manifest}")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-run"), "--out", help="Run directory to write."),
    weights: Optional[Path] = typer.Option(None, help="DinoBloom-S weights; without them the backbone is random."),
    seed: int = typer.Option(0),
) -> None:
    """The whole pipeline on the built-in synthetic sample (what `make demo` runs)."""
    from cytosae.demo import run_demo

    run_demo(out, seed=seed, weights=weights, say=typer.echo)


@app.command("run")
def run_cmd(
    study: Path = typer.Argument(..., help="Study file (TOML): datasets, backbone, SAE, analyses (docs/run-layout.md)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say which steps would run, run none."),
) -> None:
    """Run a whole study: every step not done yet (resumable; a changed setting reruns that step and those after it)."""
    from cytosae.study import StudyError, load_study, run_study

    try:
        status = run_study(study, say=lambda s: typer.secho(s, bold=True), dry_run=dry_run)
        run_dir = load_study(study)["run"]["dir"]
    except (StudyError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    done = [k for k, v in status.items() if v == "done"]
    typer.echo(f"study {study}: {len(done)} steps run, {len(status) - len(done)} "
               f"{'planned' if dry_run else 'already done'}; run directory {run_dir}. Browse it: cytosae explore {run_dir}")


# ---------------------------------------------------------------- backbones / store (extract, import)


def _fit_stain(method: str, reference: Optional[Path]):
    """extract's --stain/--stain-reference as a fitted Stain (None for none); ValueError saying what is missing."""
    from cytosae.data.stain import STAIN_METHODS, fit_stain

    if method not in STAIN_METHODS:
        raise ValueError(f"--stain must be one of {' | '.join(STAIN_METHODS)}, got {method!r}")
    if method == "none":
        if reference is not None:
            raise ValueError("--stain-reference needs --stain macenko or --stain reinhard")
        return None
    if reference is None:
        raise ValueError(f"--stain {method} needs --stain-reference REF (an image with the colours to match)")
    return fit_stain(method, reference)


@app.command()
def extract(
    ctx: typer.Context,
    data: Path = typer.Argument(..., help="Class-per-folder tree, patient-per-folder tree (with --patients) or manifest CSV."),
    out: Optional[Path] = typer.Option(None, "--out", help="Store directory (created; rerun the same command to resume). "
                                                           "Default with --run: RUN/stores/NAME."),
    run: Optional[Path] = typer.Option(None, "--run", help=RUN_HELP),
    name: Optional[str] = typer.Option(None, "--name", help="Dataset name in the run (default: the data folder's name)."),
    backbone: str = typer.Option("dinobloom-b", help="dinobloom-s|b|l|g or any timm ViT name."),
    weights: Optional[Path] = typer.Option(None, help="Checkpoint file; without it the backbone has RANDOM weights."),
    layer: int = typer.Option(-2, help="Block whose output (residual stream) is stored; -2 = second-to-last."),
    patients: Optional[Path] = typer.Option(None, help="Patients table (CSV with patient_id) for a patient-per-folder tree."),
    resize: str = typer.Option("squash", help="squash (CytoSAE) | pad | crop, to 224x224."),
    dtype: str = typer.Option("float16", help="float16 | float32 | bfloat16 on disk."),
    batch_size: int = typer.Option(32, help="Images per forward pass."),
    shard_size: int = typer.Option(512, help="Images per shard file (the unit of resumption)."),
    workers: Optional[int] = typer.Option(None, help="DataLoader processes decoding images while the model computes "
                                                     "(default: min(8, CPUs - 1))."),
    device: str = typer.Option("auto", help="auto (the GPU when there is one) | cpu | cuda | cuda:N. Under torchrun "
                                            "each process takes GPU LOCAL_RANK."),
    precision: str = typer.Option("fp32", help="Forward pass: fp32 (matches the reference model) | bf16 | fp16 "
                                               "autocast (faster on GPUs; recorded in the store)."),
    max_minutes: Optional[float] = typer.Option(None, help="Stop after the shard that crosses this many minutes "
                                                           "(e.g. a cluster job's limit); rerun to resume."),
    seed: int = typer.Option(0, help="Seed of the RANDOM backbone weights used without --weights (recorded in the store)."),
    max_pixels: int = typer.Option(50_000_000, help="Images with more pixels are skipped (read from the header, before "
                                                    "decoding: a 164 KB PNG can decode to 2 GB); 0 = no budget."),
    stain: str = typer.Option("none", help="Colour normalisation to --stain-reference before resizing: none | macenko "
                                           "| reinhard (its fitted numbers are recorded in the store)."),
    stain_reference: Optional[Path] = typer.Option(None, help="Reference image whose colours every image is "
                                                              "normalised to (with --stain)."),
) -> None:
    """Write a backbone's token activations (CLS + patches) for every image to a sharded store.

    Several GPUs or machines: `torchrun --nproc-per-node N -m cytosae extract ...` splits the shards
    between the processes and writes one store (OUT on a filesystem they all see)."""
    import time

    from cytosae.backbones import load_backbone
    from cytosae.data import load_manifest
    from cytosae.distributed import init_from_env, shutdown
    from cytosae.store import ExtractConfig
    from cytosae.store import extract as run_extract

    started = time.time()
    rd = _open_run(run, create=True)
    if rd is not None:
        from cytosae.run import check_name

        name = name or (data.parent.name if data.suffix.lower() == ".csv" else data.resolve().name)
        try:
            check_name(name)
        except ValueError as exc:
            _fail(f"{exc}; choose one with --name")
        out = out or rd.store_dir(name)
    out = _need(out, "--out (the store directory)", "write it to RUN/stores/NAME")
    try:
        cfg = ExtractConfig(layer=layer, dtype=dtype, batch_size=batch_size, shard_size=shard_size,
                            num_workers=workers, precision=precision, max_pixels=max_pixels or None,
                            max_seconds=60 * max_minutes if max_minutes is not None else None)
        dev, rank, world = init_from_env(device)
        fitted = _fit_stain(stain, stain_reference)
    except ValueError as exc:
        _fail(str(exc))
    try:
        manifest = load_manifest(data, patients=patients)
        # random weights are a function of --seed: the same in every process and in every resumed run
        bb = load_backbone(backbone, weights=weights, resize=resize, seed=seed, device=dev)
        if bb.random_weights and rank == 0:
            typer.secho("WARNING: no --weights given: the backbone has RANDOM weights; its activations mean nothing "
                        "about blood cells. Fine for a demo, never for a study.", fg=typer.colors.YELLOW, err=True)
        if fitted is not None:
            from dataclasses import replace

            bb.preprocess_config = replace(bb.preprocess_config, stain=fitted)
        res = run_extract(manifest, bb, out, cfg)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    finally:
        shutdown()
    if rank == 0 and not res.complete:
        typer.echo(f"store {res.out_dir} unfinished: stopped after --max-minutes {max_minutes:g} with {res.n_shards} "
                   f"shards ({res.n_images} images) done; run the same command again to finish it.")
        return
    if rank == 0:
        typer.echo(f"store {res.out_dir}: {res.n_images} images x {bb.n_tokens} tokens x {bb.embed_dim} dims "
                   f"({dtype}) from {bb.name} block {layer} on {dev} ({precision}"
                   f"{f', {world} processes' if world > 1 else ''}); {res.n_skipped} unreadable images skipped "
                   f"(listed in {res.out_dir / 'skipped.csv'}); {res.shards_reused} of {res.n_shards} shards reused "
                   f"from an earlier run; {res.images_per_second:.1f} images/s over the images "
                   f"{'this process ' if world > 1 else ''}computed now.")
    if rd is not None and rank == 0:
        rd.add_dataset(name, data=rd.portable(data.absolute()))
        rd.set_backbone({"name": backbone, "weights": rd.portable(weights) if weights else None, "layer": layer,
                         "seed": None if weights else seed, "options": {}})
        _record(ctx, rd, f"extract:{name}", started, inputs={"weights": weights, "patients": patients,
                                                        "manifest": data if data.is_file() else None,
                                                        "stain_reference": stain_reference})


@app.command("import-embeddings")
def import_embeddings_cmd(
    array: Path = typer.Argument(..., help=".npy or .safetensors array, (N, D) or (N, T, D); row i = image in manifest row i."),
    manifest_csv: Path = typer.Argument(..., help="CSV naming each row's image (image_id or path column, plus any labels)."),
    out: Path = typer.Option(..., "--out", help="Store directory to create."),
    key: Optional[str] = typer.Option(None, help="Tensor name inside a .safetensors file holding several."),
    no_cls: bool = typer.Option(False, "--no-cls", help="Token 0 is a patch, not a CLS token."),
    source: str = typer.Option("imported", help="Name of the model that produced the embeddings (recorded)."),
) -> None:
    """Import precomputed embeddings of any model as an activation store."""
    import pandas as pd

    from cytosae.store import ActivationStore, import_embeddings

    try:
        table = pd.read_csv(manifest_csv)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        _fail(f"{manifest_csv} could not be read as CSV: {str(exc).strip().splitlines()[-1]}")
    if "image_id" not in table.columns:
        if "path" not in table.columns:
            _fail(f"{manifest_csv} needs an 'image_id' or 'path' column; it has {list(table.columns)}")
        table.insert(0, "image_id", table["path"].astype(str))
    store = ActivationStore(import_embeddings(array, table, out, key=key, has_cls=not no_cls, source=source))
    typer.echo(f"store {out}: {store.n_images} images x {store.n_tokens} tokens x {store.d_model} dims from {array}")


# ---------------------------------------------------------------- sae (train, evaluate, import-cytosae)


@app.command()
def train(
    ctx: typer.Context,
    store: Optional[Path] = typer.Argument(None, help="Activation store directory (from `cytosae extract`); with --run: "
                                                      "the store of --dataset."),
    out: Optional[Path] = typer.Option(None, "--out", help="SAE directory: checkpoints and the final sae.safetensors + "
                                                           "config.json. Rerun the same command to resume. Default with --run: RUN/sae."),
    run: Optional[Path] = typer.Option(None, "--run", help=RUN_HELP),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="With --run: the dataset to train on (default: the only one)."),
    arch: str = typer.Option("topk", help="relu-l1 (CytoSAE) | topk | batchtopk | jumprelu | matryoshka"),
    expansion: int = typer.Option(64, help="n_latents = expansion x d_model (64 x 768 = 49,152 as in CytoSAE)."),
    tokens: str = typer.Option("all", help="Train on all | cls | patch tokens."),
    total_tokens: int = typer.Option(0, help="Tokens to train on; 0 = every token of every epoch. At most "
                                             "epochs x the store's tokens."),
    epochs: int = typer.Option(1, help="Passes over the whole store, each in a new random order of all images "
                                       "(shards included), then mixed by the shuffle buffer."),
    k: int = typer.Option(32, help="Active latents per token (topk family)."),
    l1_coeff: float = typer.Option(8e-5, help="L1 coefficient (relu-l1)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default per architecture)."),
    batch_size: int = typer.Option(4096, help="Tokens per step."),
    shuffle: int = typer.Option(262144, help="Shuffle buffer in tokens (mixes tokens across images); 0 = off."),
    checkpoint_every: int = typer.Option(5_000_000, help="Tokens between checkpoints."),
    seed: int = typer.Option(0, help="Random seed (init and shuffling)."),
    log: str = typer.Option("jsonl", help="Metrics log besides the progress bar: none | jsonl (OUT/metrics.jsonl) | "
                                          "tensorboard (OUT/tensorboard) | wandb (optional packages)."),
    log_every: int = typer.Option(50, help="Steps between logged metrics."),
    device: str = typer.Option("auto", help="auto (CUDA when available) | cpu | cuda | cuda:N. Under torchrun each "
                                            "process takes cuda:LOCAL_RANK."),
    precision: str = typer.Option("fp32", help="fp32 | bf16 (autocast matmuls; weights and optimizer stay fp32)."),
) -> None:
    """Train a sparse autoencoder on a store's token activations (resumable; several GPUs with torchrun)."""
    import time

    from cytosae.sae import TrainingDiverged, store_epochs, train_sae
    from cytosae.sae.loggers import make_logger
    from cytosae.distributed import init_from_env, shutdown
    from cytosae.sae.trainer import PRECISIONS

    started = time.time()
    rd = _open_run(run)
    if rd is not None:
        dataset = _run_dataset(rd, dataset)
        store, out = store or rd.store_dir(dataset), out or rd.sae_dir
    store = _need(store, "STORE", "train on the run's dataset")
    out = _need(out, "--out (the SAE directory)", "write it to RUN/sae")
    st = _open_store(store)
    per_image = {"all": st.n_tokens, "cls": 1, "patch": st.n_tokens - 1}.get(tokens)
    if per_image is None:
        _fail(f"--tokens must be all, cls or patch, got {tokens!r}")
    if epochs < 1:
        _fail(f"--epochs must be at least 1, got {epochs}")
    if precision not in PRECISIONS:
        _fail(f"--precision must be one of {'|'.join(PRECISIONS)}, got {precision!r}")
    available = st.n_images * per_image
    if total_tokens > epochs * available:
        _fail(f"--total-tokens {total_tokens:,} is more than {epochs} epoch(s) of {store} hold ({available:,} {tokens} "
              f"tokens each); pass --epochs {-(-total_tokens // available)} or ask for fewer tokens")
    try:
        dev, rank, _ = init_from_env(device)
    except ValueError as exc:
        _fail(str(exc))
    batches = store_epochs(st, epochs, tokens=tokens, batch_size=batch_size, seed=seed, shuffle_tokens=shuffle)
    opts = {"k": k} if arch in ("topk", "batchtopk", "matryoshka") else {"l1_coeff": l1_coeff} if arch == "relu-l1" else {}
    try:
        logger = make_logger(log, out, config={"arch": arch, "expansion": expansion, "tokens": tokens, "store": str(store),
                                               "batch_size": batch_size, "seed": seed, **opts})
    except ValueError as exc:
        _fail(str(exc))
    try:
        sae = train_sae(batches, st.d_model, arch, expansion * st.d_model, total_tokens or None, seed=seed,
                        batch_size=batch_size, lr=lr, checkpoint_dir=out, checkpoint_every=checkpoint_every,
                        logger=logger, log_every=log_every, device=dev, precision=precision, **opts)
    except (ValueError, TrainingDiverged) as exc:
        _fail(str(exc))
    finally:
        if logger is not None:
            logger.close()
    s = sae.training_summary
    shutdown()
    if rank != 0:
        return
    typer.echo(f"SAE {arch} ({sae.cfg.n_latents} latents on d={sae.cfg.d_in}) trained on {s['tokens_seen']:,} "
               f"{tokens} tokens of {store} ({epochs} epoch(s), images in shuffled order) in {s['steps']} steps "
               f"on {dev} ({precision}) -> {out}")
    _record(ctx, rd, "train", started, dataset=dataset)


@app.command()
def evaluate(
    ctx: typer.Context,
    sae_dir: Optional[Path] = typer.Argument(None, help="SAE directory (sae.safetensors + config.json); with --run: RUN/sae."),
    store: Optional[Path] = typer.Argument(None, help="Activation store to measure on; with --run: the store of --dataset."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the figures as JSON here (with --run: RUN/sae/eval.json)."),
    run: Optional[Path] = typer.Option(None, "--run", help=RUN_HELP),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="With --run: the dataset to measure on (default: the "
                                                                  "one the SAE was trained on, else the only one)."),
    max_images: Optional[int] = typer.Option(None, help="Only the first N images of the store."),
    allow_unfinished: bool = ALLOW_UNFINISHED,
    device: str = typer.Option("auto", help="auto (CUDA when available) | cpu | cuda | cuda:N."),
) -> None:
    """Reconstruction and sparsity of an SAE on a store, for all, CLS and patch tokens."""
    import json
    import os

    import time

    from cytosae.sae import evaluate_sae

    started = time.time()
    rd = _open_run(run)
    if rd is not None:
        dataset = _run_dataset(rd, dataset or rd.steps.get("train", {}).get("settings", {}).get("dataset"))
        sae_dir, store = sae_dir or rd.sae_dir, store or rd.store_dir(dataset)
        out = out or rd.sae_dir / "eval.json"
    sae_dir = _need(sae_dir, "SAE_DIR", "use the run's SAE")
    store = _need(store, "STORE", "measure on the run's dataset")
    dev = _device(device)
    sae, st = _open_sae(sae_dir, allow_unfinished), _open_store(store)
    sae = sae.to(dev)
    res = evaluate_sae(sae, st, max_images=max_images)
    res["sae_dir"], res["store"] = str(sae_dir), str(store)
    if rd is not None:  # a run can move: paths inside it are recorded relative to it
        res["sae_dir"], res["store"], res["dataset"] = rd.portable(sae_dir), rd.portable(store), dataset
    if out is not None:
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(res, indent=2))
        os.replace(tmp, out)
    typer.echo(f"SAE {sae_dir} ({sae.cfg.arch}, {sae.cfg.n_latents} latents) measured on store {store}:")
    cols = ["tokens", "fvu", "explained_variance", "cosine_similarity", "l0", "dead_fraction", "dense_fraction", "shrinkage"]
    typer.echo(f"{'tokens':<8}" + "".join(f"{c:>20}" for c in cols))
    for group in ("all", "cls", "patch"):
        if group in res:
            typer.echo(f"{group:<8}" + "".join(f"{res[group].get(c, float('nan')):>20.4g}" for c in cols))
    typer.echo("fvu = unexplained variance fraction; dead = never fired on these tokens; dense = fires on >10% of them"
               + (f"; JSON -> {out}" if out else ""))
    _record(ctx, rd, "evaluate", started, dataset=dataset)


@app.command("import-cytosae")
def import_cytosae(
    pt: Path = typer.Argument(..., help="Published CytoSAE checkpoint (.pt); read without running its code."),
    out_dir: Path = typer.Argument(..., help="SAE directory to write (sae.safetensors + config.json)."),
) -> None:
    """Convert a CytoSAE / PatchSAE checkpoint to cytosae's SAE format."""
    from cytosae.sae import import_cytosae_checkpoint

    try:
        sae = import_cytosae_checkpoint(pt, out_dir)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"imported {pt}: relu-l1 SAE, {sae.cfg.n_latents} latents on d={sae.cfg.d_in} "
               f"(l1_coeff={sae.cfg.l1_coeff:g}) -> {out_dir}")


# ---------------------------------------------------------------- analysis (stats, patients, compare, classify)


@app.command()
def stats(
    ctx: typer.Context,
    sae_dir: Optional[Path] = typer.Argument(None, help="SAE directory (sae.safetensors + config.json); with --run: RUN/sae."),
    stores: Optional[list[Path]] = typer.Argument(None, help="One or more activation stores (datasets), named by folder; "
                                                             "with --run: every dataset of the run."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the tables (with --run: RUN/stats)."),
    run: Optional[Path] = typer.Option(None, "--run", help=RUN_HELP),
    k: int = typer.Option(16, help="Top images kept per latent."),
    label_column: str = typer.Option("label", help="Manifest column holding (possibly 'a|b' multi-) labels."),
    noisy_threshold: float = typer.Option(0.1, help="CytoSAE's noisy-latent rule: mean activation above this."),
    galleries: int = typer.Option(12, help="Gallery PNGs (top images with overlays) for this many label-specific latents."),
    factors: Optional[str] = typer.Option(None, help="Manifest columns of known per-cell factors (comma-separated): "
                                                     "write the purity of each value's best latent to factor_purity.csv."),
    allow_unfinished: bool = ALLOW_UNFINISHED,
    device: str = typer.Option("auto", help="auto (the GPU when there is one) | cpu | cuda | cuda:N: where tokens are encoded."),
    labels: Optional[str] = typer.Option(None, help="Multi-label targets: comma list of 0/1 manifest columns (one per "
                                                    "label); class profiles per label instead of --label-column."),
) -> None:
    """Per-latent firing frequencies, mean activations, top images, label entropy and class profiles."""
    import time

    from cytosae.analysis import compute_latent_stats, write_stats

    started = time.time()
    rd = _open_run(run)
    if rd is not None:
        sae_dir, out = sae_dir or rd.sae_dir, out or rd.stats_dir
        stores = stores or [rd.store_dir(n) for n in rd.datasets]
    sae_dir = _need(sae_dir, "SAE_DIR", "use the run's SAE")
    stores = _need(stores or None, "STORES", "use every dataset of the run")
    out = _need(out, "--out", "write to RUN/stats")
    dev = _device(device)
    sae = _open_sae(sae_dir, allow_unfinished).to(dev)
    results, opened = [], []
    for path in stores:
        st = _open_store(path)
        opened.append(st)
        try:
            results.append(compute_latent_stats(sae.encode, st.iter_images(_analysis_batch(dev)), st.images,
                                                sae.cfg.n_latents, k=k, label_column=label_column,
                                                noisy_threshold=noisy_threshold, dataset=path.name, device=dev,
                                                label_columns=_split(labels)))
        except ValueError as exc:
            _fail(f"{path}: {exc}")
        s = results[-1].summary
        typer.echo(f"{path.name}: {s['n_images']} images, {s['n_latents']} latents; {s['n_dead_on_dataset']} never fire "
                   f"on it; {s['n_noisy']} noisy (mean image activation > {noisy_threshold})")
    write_stats(results, out)
    if galleries and not all(_draws_images(st) for st in opened):
        typer.echo("no galleries: a store of imported embeddings has no images or patch grid to draw")
    elif galleries:
        from cytosae.analysis.heatmaps import CellViewer, write_latent_galleries

        for path, st, res in zip(stores, opened, results):
            chosen = _gallery_latents(res.latents, galleries, k, res.summary["n_images"])
            written = write_latent_galleries(CellViewer(st, sae.encode, device=dev), res.top_images, chosen,
                                             out / "figures" / "galleries" / path.name, label_column=label_column)
            typer.echo(f"{path.name}: galleries of the {len(written)} latents with the lowest label entropy among those "
                       f"firing on >= {k} images -> {out / 'figures' / 'galleries' / path.name}")
    if factors:
        _factor_purity(sae, stores, opened, results, _split(factors), k, out,
                       label_column)
    typer.echo(f"tables and figures -> {out} (definitions in {out / 'summary.json'})")
    _record(ctx, rd, "stats", started)


def _factor_purity(sae, stores, opened, results, factors: list[str], k: int, out: Path, label_column: str) -> None:
    """Known factors (the synthetic sample's are ground truth): how purely the best latent's top-k holds each value."""
    import pandas as pd

    from cytosae.analysis import factor_purity
    from cytosae.analysis.heatmaps import CellViewer, write_latent_galleries
    from cytosae.store.format import atomic_write_bytes

    tables = []
    for path, st, res in zip(stores, opened, results):
        missing = [f for f in factors if f not in st.images.columns]
        if missing:
            _fail(f"--factors: {path}/images.parquet has no column(s) {missing}; it has {list(st.images.columns)}")
        table = pd.concat([factor_purity(res.top_images, st.images, f, k=k) for f in factors], ignore_index=True)
        tables.append(table.assign(dataset=path.name))
        best = sorted({int(j) for j in table.sort_values("purity", ascending=False).best_latent.head(6)})
        write_latent_galleries(CellViewer(st, sae.encode), res.top_images, best,
                               out / "figures" / "galleries" / path.name, label_column=label_column)
        typer.echo(f"{path.name}: for each value of {len(factors)} known factors, the purity of the best latent's "
                   f"top-{k} images (n={len(table)} values): {int((table.purity >= 0.9).sum())} reach 90%, median "
                   f"{table.purity.median():.0%}; best per factor: "
                   + ", ".join(f"{f}={r.value} {r.purity:.0%}" for f, g in table.groupby("factor", sort=False)
                               for r in [g.loc[g.purity.idxmax()]]))
    atomic_write_bytes(out / "factor_purity.csv", pd.concat(tables).to_csv(index=False).encode())
    typer.echo(f"factor purity -> {out / 'factor_purity.csv'}")


def _device(spec: str):
    from cytosae.devices import resolve_device

    try:
        return resolve_device(spec)
    except ValueError as exc:
        _fail(str(exc))


def _analysis_batch(device) -> int:
    """Images per SAE encoding batch: 8 keeps CPU memory small (8 x 257 x 49,152 floats = 0.4 GB);
    a GPU wants bigger batches to be busy, and 32 (1.6 GB) fits any GPU."""
    return 32 if device.type == "cuda" else 8


def _split(csv: Optional[str]) -> list[str]:
    return [c.strip() for c in csv.split(",") if c.strip()] if csv else []


def _draws_images(store) -> bool:
    """Galleries need the images as the backbone saw them and patch tokens; imported embeddings have neither."""
    return bool(store.meta.get("settings", {}).get("preprocessing")) and store.grid is not None


def _gallery_latents(latents, n: int, k: int, n_images: int) -> list[int]:
    """The most label-specific latents among those with a full set of k top images."""
    full = latents[(latents.freq_image * n_images >= k - 0.5) & latents.label_entropy.notna()]
    return [int(j) for j in full.sort_values(["label_entropy", "mean_act"], ascending=[True, False], kind="stable")
            .latent.head(n)]


@app.command()
def patients(
    ctx: typer.Context,
    sae_dir: Optional[Path] = typer.Argument(None, help="SAE directory; with --run: RUN/sae."),
    store: Optional[Path] = typer.Argument(None, help="Activation store whose manifest has patient_id (and the target "
                                                      "column); with --run: the store of --dataset."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for barcodes and comparison (with --run: RUN/patients)."),
    run: Optional[Path] = typer.Option(None, "--run", help=RUN_HELP),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="With --run: the dataset whose patients are compared "
                                                                  "(default: the only one)."),
    external: bool = typer.Option(False, "--external", help="With --run: this dataset is an external cohort; write to "
                                                            "RUN/patients/external/NAME (for `classify --external`)."),
    threshold: float = typer.Option(0.0, help="A latent counts as firing in a cell above this activation."),
    token_policy: str = typer.Option("cls", help="cls | any_patch | mean: which tokens decide a cell's activation."),
    target: str = typer.Option("diagnosis", help="Patient column that defines the groups compared."),
    examples: int = typer.Option(5, help="Per comparison, draw example cells with overlays for this many enriched latents."),
    allow_unfinished: bool = ALLOW_UNFINISHED,
    device: str = typer.Option("auto", help="auto (the GPU when there is one) | cpu | cuda | cuda:N: where tokens are encoded."),
) -> None:
    """Patient barcodes (fraction of each patient's cells where each latent fires) and a rank test between groups."""
    import time

    from cytosae.analysis import patient_barcodes, write_patients

    started = time.time()
    rd = _open_run(run)
    if rd is not None:
        dataset = _run_dataset(rd, dataset)
        sae_dir, store = sae_dir or rd.sae_dir, store or rd.store_dir(dataset)
        out = out or (rd.external_patients_dir(dataset) if external else rd.patients_dir)
    sae_dir = _need(sae_dir, "SAE_DIR", "use the run's SAE")
    store = _need(store, "STORE", "use the run's dataset")
    out = _need(out, "--out", "write to RUN/patients")
    dev = _device(device)
    sae, st = _open_sae(sae_dir, allow_unfinished).to(dev), _open_store(store)
    try:
        bc = patient_barcodes(sae.encode, st.iter_images(_analysis_batch(dev)), st.images, sae.cfg.n_latents,
                              threshold=threshold, token_policy=token_policy, target=target, device=dev)
    except ValueError as exc:
        _fail(f"{store}: {exc}")
    write_patients(bc, out, target, {"threshold": threshold, "token_policy": token_policy,
                                     "store": rd.portable(store) if rd else str(store), "dataset": dataset or store.name})
    typer.echo(f"barcodes of {bc.patient_id.nunique()} patients x {sae.cfg.n_latents} latents "
               f"(token policy {token_policy}, threshold {threshold}) -> {out}")
    if (out / "compare.parquet").is_file():
        import json

        summary = json.loads((out / "summary.json").read_text())
        for c in summary["comparisons"]:
            typer.echo(f"{target} {c['group_a']} vs {c['group_b']}: {c['n_q_below_0.05']} of {c['n_latents']} latents "
                       f"with BH q < 0.05 -> {out / c['figure']}")
        if examples and not _draws_images(st):
            typer.echo("no example cells: a store of imported embeddings has no images or patch grid to draw")
        elif examples:
            from cytosae.analysis.patients import write_disease_examples

            drawn = write_disease_examples(sae.encode, st, out, target, per_comparison=examples, device=dev)
            typer.echo(f"example cells with overlays for {sum(len(d['latents']) for d in drawn)} disease-specific "
                       f"latents -> {out / 'figures' / 'examples'}")
    _record(ctx, rd, f"patients:{dataset}" if external else "patients", started, dataset=dataset)


@app.command()
def classify(
    ctx: typer.Context,
    barcodes: Optional[Path] = typer.Argument(None, help="Patients folder from `cytosae patients` (or its "
                                                         "barcodes.parquet); with --run: RUN/patients; not needed for "
                                                         "--labels at image level."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for results.json, predictions and ROC figure "
                                                           "(with --run: RUN/classify)."),
    run: Optional[Path] = typer.Option(None, "--run", help=RUN_HELP),
    target: str = typer.Option("diagnosis", help="Patient column to predict."),
    labels: Optional[str] = typer.Option(None, help="Multi-label targets instead of --target: comma list of 0/1 "
                                                    "manifest columns; per-label and macro AUROC (needs --store)."),
    level: str = typer.Option("patient", help="--labels: predict per image (concepts from --sae) or per patient "
                                              "(barcodes)."),
    store: Optional[Path] = typer.Option(None, help="The activation store of the same cells: enables the baselines "
                                                    "(mean-pooled embedding, cell-type composition) and MIL."),
    cell_type_column: Optional[str] = typer.Option(None, help="Manifest column of cell types (default: cell_type, else label)."),
    proportion: Optional[str] = typer.Option(None, help="Also a one-feature baseline: the proportion of this cell type "
                                                        "(e.g. Promyelocyte for APL)."),
    external: Optional[Path] = typer.Option(None, help="Barcodes of another cohort (same SAE): train here, test there."),
    external_store: Optional[Path] = typer.Option(None, help="That cohort's activation store: tests the baselines and "
                                                             "MIL there too."),
    sae: Optional[Path] = typer.Option(None, "--sae", help="SAE directory of the barcodes: enables concept MIL."),
    mil: str = typer.Option("auto", help="Attention MIL inputs: auto (embedding with --store, and concepts with --sae), "
                                         "none, or a comma list of embedding,concepts."),
    token_policy: Optional[str] = typer.Option(None, help="Concept MIL: cls | any_patch | mean (default: the "
                                                          "barcodes' policy from their summary.json, else cls)."),
    mil_embedding: str = typer.Option("cls", help="Embedding MIL: cls (the stored CLS token) or mean_patch."),
    mil_repeats: Optional[int] = typer.Option(None, help="Repeats of the MIL models (default: --repeats; the first "
                                                         "repeats use the same folds as the other models)."),
    mil_epochs: int = typer.Option(100, help="Most MIL training epochs (early stopping usually ends sooner)."),
    device: str = typer.Option("cpu", help="MIL training device: cpu, cuda, cuda:1, ..."),
    folds: int = typer.Option(5, help="k of stratified k-fold (lowered to the smallest class's patient count)."),
    repeats: int = typer.Option(10, help="Repeats of k-fold with different shuffles."),
    positive: Optional[str] = typer.Option(None, help="Binary tasks: class whose AUROC and ROC are reported (default: rarer)."),
    seed: int = typer.Option(0, help="Seed of the fold shuffles, bootstrap, forest and MIL."),
) -> None:
    """Patient-level diagnosis from concept barcodes, with baselines and attention MIL, in repeated cross-validation
    over patients (and on an external cohort)."""
    import json

    import pandas as pd

    from cytosae.analysis.classify import ClassifyConfig, classify_patients, write_classify
    from cytosae.analysis.mil import MILConfig

    def read_barcodes(path: Path):
        file = path / "barcodes.parquet" if path.is_dir() else path
        if not file.is_file():
            _fail(f"{file} not found: give the folder written by `cytosae patients` or its barcodes.parquet")
        return pd.read_parquet(file)

    import time

    started = time.time()
    rd = _open_run(run)
    dataset = None
    if rd is not None:
        barcodes, out = barcodes or rd.patients_dir, out or rd.classify_dir
        dataset = rd.steps.get("patients", {}).get("settings", {}).get("dataset")
        if store is None and dataset in rd.datasets:
            store = rd.store_dir(dataset)
        if sae is None and rd.has_sae():
            sae = rd.sae_dir  # concept MIL and concept features use the run's SAE
        if external is not None and external_store is None and external.name in rd.datasets:
            external_store = rd.store_dir(external.name)  # RUN/external/NAME: barcodes of dataset NAME
    out = _need(out, "--out", "write to RUN/classify")
    if labels:
        _classify_labels(barcodes, out, _split(labels), level, store, sae, token_policy, folds, repeats, seed)
        return
    barcodes = _need(barcodes, "BARCODES (the patients folder written by `cytosae patients`)", "use RUN/patients")
    bc = read_barcodes(barcodes)
    ext_bc = read_barcodes(external) if external else None
    st = _open_store(store) if store is not None else None
    ext_st = _open_store(external_store) if external_store is not None else None
    model = _open_sae(sae) if sae is not None else None
    if mil == "auto":
        kinds = tuple(k for k, ok in (("embedding", st is not None), ("concepts", st is not None and model is not None))
                      if ok)
    elif mil == "none":
        kinds = ()
    else:
        kinds = tuple(k.strip() for k in mil.split(",") if k.strip())
        bad = [k for k in kinds if k not in ("embedding", "concepts")]
        if bad:
            _fail(f"--mil {mil!r}: unknown input {bad[0]!r}; use auto, none, or a comma list of embedding,concepts")
        if st is None or ("concepts" in kinds and model is None):
            _fail(f"--mil {mil}: MIL needs --store (and --sae for concepts)")
    if token_policy is None:
        summary = barcodes / "summary.json" if barcodes.is_dir() else barcodes.parent / "summary.json"
        token_policy = json.loads(summary.read_text()).get("token_policy", "cls") if summary.is_file() else "cls"
    cfg = ClassifyConfig(target=target, n_splits=folds, n_repeats=repeats, seed=seed, positive=positive, mil=kinds,
                         mil_repeats=mil_repeats)
    mil_cfg = MILConfig(seed=seed, device=str(_device(device)) if kinds else device, max_epochs=mil_epochs)
    try:
        bags, ext_bags = _mil_inputs(kinds, st, ext_st, model, token_policy, mil_embedding)
        res = classify_patients(bc, cfg, store=st, cell_type_column=cell_type_column, proportion=proportion,
                                external=ext_bc, dataset=dataset or (store.name if store else None), external_store=ext_st,
                                bags=bags, external_bags=ext_bags, mil_cfg=mil_cfg)
    except ValueError as exc:
        _fail(f"{barcodes}: {exc}")
    write_classify(res, out)
    p = res["protocol"]
    typer.echo(f"{target} of {res['n_patients']} patients {res['class_counts']}, {p['repeats']} x {p['folds']}-fold CV "
               f"over patients; AUROC and macro-F1 of calibrated out-of-fold predictions (threshold from training "
               f"folds; 95% CI: bootstrap over patients):")
    for name, m in res["models"].items():
        ci = m["auroc_ci"] or [float("nan")] * 2
        typer.echo(f"  {name:<45} AUROC {m['auroc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]  macro-F1 {m['macro_f1']:.3f}  "
                   f"weighted-F1 {m['weighted_f1']:.3f}" + (f"  ({m['repeats']} repeats)" if m['repeats'] != repeats
                                                             else ""))
    for name, m in res.get("external", {}).items():
        ci = m["auroc_ci"] or [float("nan")] * 2
        typer.echo(f"  external cohort, {name:<28} AUROC {m['auroc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] "
                   f"(CV {m['auroc_cv']:.3f}, drop {m['auroc_drop_from_cv']:+.3f})  macro-F1 {m['macro_f1']:.3f} "
                   f"(drop {m['macro_f1_drop_from_cv']:+.3f}) ({m['n_train']} train / {m['n_test']} test patients)")
    typer.echo(f"-> {out / 'results.json'}, {out / 'figures' / 'roc.png'}, {out / 'figures' / 'confusion.png'}"
               + "".join(f", {out / f}" for f in ("explanations.parquet", "attention.parquet") if (out / f).is_file()))
    _record(ctx, rd, "classify", started, dataset=dataset)


def _classify_labels(barcodes, out, labels, level, store, sae, token_policy, folds, repeats, seed) -> None:
    import pandas as pd

    from cytosae.analysis.classify import ClassifyConfig, classify_labels, write_labels

    if store is None:
        _fail("--labels needs --store (its manifest holds the label columns)")
    if level == "image" and sae is None:
        typer.echo("no --sae: image-level labels from the embedding baseline only")
    bc = None
    if level == "patient" and barcodes is not None:
        file = barcodes / "barcodes.parquet" if barcodes.is_dir() else barcodes
        if not file.is_file():
            _fail(f"{file} not found: give the folder written by `cytosae patients` or its barcodes.parquet")
        bc = pd.read_parquet(file)
    st, model = _open_store(store), (_open_sae(sae) if sae is not None else None)
    cfg = ClassifyConfig(n_splits=folds, n_repeats=repeats, seed=seed)
    try:
        res = classify_labels(st, labels, cfg, level=level, encode=model.encode if model else None,
                              token_policy=token_policy or "cls", barcodes=bc)
    except ValueError as exc:
        _fail(f"{store}: {exc}")
    write_labels(res, out)
    typer.echo(f"{len(labels)} labels of {res['n_units']} {level}s, {res['protocol']['cv']}; out-of-fold AUROC:")
    for name, m in res["models"].items():
        typer.echo(f"  {name:<30} macro AUROC {m['macro_auroc']:.3f} over {m['macro_auroc_over']}; "
                   + ", ".join(f"{c} {v['auroc']:.2f}" for c, v in m["per_label"].items()))
    typer.echo(f"-> {out / 'results.json'}, {out / 'predictions.parquet'}")


def _mil_inputs(kinds, store, external_store, sae, token_policy: str, embedding: str) -> tuple[dict, dict]:
    """Per MIL input kind, the cells' features of the training and (when given) the external cohort."""
    from cytosae.analysis.mil import cell_features

    bags, ext = {}, {}
    for kind in kinds:
        args = dict(encode=sae.encode if sae is not None else None, token_policy=token_policy, embedding=embedding)
        bags[kind] = cell_features(store, kind, **args)
        if external_store is not None:
            ext[kind] = cell_features(external_store, kind, **args)
    return bags, ext


# ---------------------------------------------------------------- explorer (explore, report, annotations)


DATA_ROOT_HELP = ("Where the images are now, if the data or the run moved: a folder holding the images under their "
                  "image ids, or NAME=FOLDER for dataset NAME (repeatable).")

annotations_app = typer.Typer(no_args_is_help=True, help="Latent annotations made in the explorer (annotations.sqlite).")
app.add_typer(annotations_app, name="annotations")


@app.command()
def explore(
    run_dir: Path = typer.Argument(..., help="Run directory (run.json, stores/, sae/, stats/, ...)."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on; 127.0.0.1 keeps it private to this machine."),
    port: int = typer.Option(8000, help="TCP port."),
    data_root: list[str] = typer.Option([], "--data-root", help=DATA_ROOT_HELP),
    allow_unfinished: bool = ALLOW_UNFINISHED,
    device: str = typer.Option("auto", "--device", help="Where the SAE (and uploads' backbone) run: auto | cpu | cuda | "
                                                        "cuda:N; auto = CUDA when available."),
    allow_host: list[str] = typer.Option([], "--allow-host", help="Another host name the page may be opened under "
                                                                  "(repeatable); loopback names and --host are allowed."),
) -> None:
    """Browse, inspect and name the SAE's latents in a web page (JSON API described at /openapi.json)."""
    import uvicorn

    from cytosae.explorer import create_app
    from cytosae.explorer.api import startup_lines

    sae = _check_run_sae(run_dir, allow_unfinished)
    lines, token = startup_lines(run_dir.resolve(), host, port)
    try:
        web = create_app(run_dir, data_roots=data_root, preload=True, device=device, host=host, token=token,
                         allow_hosts=allow_host, sae=sae)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    for line in lines:  # the token is printed once, here, and nowhere else
        typer.echo(line)
    uvicorn.run(web, host=host, port=port, log_level="warning")


def _check_run_sae(run_dir: Path, allow_unfinished: bool):
    """A run's cytosae SAE, checked like `evaluate` checks it, handed on to the explorer so that it is read once;
    None where there is none to check (the explorer reports missing ones itself)."""
    import json

    from cytosae.run import Run

    try:
        sae_dir = Run.open(run_dir).sae_dir
        written_by_cytosae = "format_version" in json.loads((sae_dir / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return None  # not a run, or no SAE config: create_app says what is missing
    return _open_sae(sae_dir, allow_unfinished) if written_by_cytosae else None


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="Run directory."),
    out: Path = typer.Option(..., "--out", help="Folder for the static site (created)."),
    latents: int = typer.Option(200, help="How many latent pages to include (annotated first, then most frequent)."),
    images: int = typer.Option(12, help="How many image pages (each with all its patches clickable) to include."),
    data_root: list[str] = typer.Option([], "--data-root", help=DATA_ROOT_HELP),
    allow_unfinished: bool = ALLOW_UNFINISHED,
) -> None:
    """Write the explorer's pages as a static site that opens without a server (index.html)."""
    from cytosae.explorer import build_report

    sae = _check_run_sae(run_dir, allow_unfinished)
    try:
        res = build_report(run_dir, out, n_latents=latents, n_images=images, data_roots=data_root, sae=sae)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"static report of {run_dir}: {res['latent_pages']} latent pages, {res['image_pages']} image pages, "
               f"{res['files']} files -> {out / 'index.html'}")


@annotations_app.command("export")
def annotations_export(
    run_dir: Path = typer.Argument(..., help="Run directory holding annotations.sqlite."),
    format: str = typer.Option("csv", "--format", help="csv | json"),
    out: Path = typer.Option(..., "--out", help="File to write."),
) -> None:
    """Export every latent annotation (name, tags, note, status, author, time)."""
    from cytosae.explorer.annotations import AnnotationStore, DamagedAnnotations, export

    from cytosae.run import ANNOTATIONS

    db = run_dir / ANNOTATIONS
    if not db.is_file():
        _fail(f"{db} does not exist: no annotations have been made in this run yet")
    if format not in ("csv", "json"):
        _fail(f"--format must be csv or json, got {format!r}")
    try:
        n = export(AnnotationStore(db), out, format)
    except DamagedAnnotations as exc:
        _fail(str(exc))
    typer.echo(f"{n} annotations from {db} -> {out} ({format})")


def main() -> None:  # pragma: no cover - entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
