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


def _warn(message: str) -> None:
    typer.secho(message, fg=typer.colors.YELLOW, err=True)


def _step(ctx: typer.Context, settings: str, function: str, warns: bool = True) -> None:
    """Run step `function` of cytosae.steps with the command's flags as its `settings`, and print its result.
    Names, not objects: the steps (and torch) are imported only when a command runs, so --help stays fast."""
    import cytosae.steps as steps

    values = {k: list(v) if isinstance(v, tuple) else v for k, v in ctx.params.items() if k != "run"}
    try:
        cfg = steps.build(getattr(steps, settings), values)
        run = getattr(steps, function)
        res = run(cfg, run=ctx.params.get("run"), **({"warn": _warn} if warns else {}))
    except steps.StepError as exc:
        _fail(str(exc))
    for line in res.lines():
        typer.echo(line)


def _open_sae(path: Path, allow_unfinished: bool = False):
    """The SAE at `path`, checked like the steps check it, or a one-line error."""
    from cytosae.steps.common import StepError, open_sae

    try:
        return open_sae(path, allow_unfinished, warn=_warn)
    except StepError as exc:
        _fail(str(exc))


ALLOW_UNFINISHED = typer.Option(False, "--allow-unfinished",
                                help="Use an SAE whose training has not finished (saved at an intermediate checkpoint).")


SWEEP_SAE = typer.Option(None, "--sae", help="With --run: which SAE of the run's sweep to analyse (a name in "
                        "RUN/quality/sweep.json); its inputs and outputs default to its own folders, RUN/saes/NAME/... "
                        "(default: the run's own SAE, at sae/).")

RUN_HELP = "Run directory (docs/run-layout.md): inputs and outputs default to their places in it, and the step is " \
           "recorded in its run.json."


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
    patients: int = typer.Option(12, help="Synthetic patients (alternating APL-like / AML-like); diagnosis needs "
                                          "2 of each."),
    cells: int = typer.Option(24, help="Cells per patient."),
) -> None:
    """The whole pipeline on the built-in synthetic sample (what `make demo` runs)."""
    from cytosae.demo import run_demo

    if patients < 1 or cells < 1:
        _fail(f"--patients and --cells must be at least 1, got {patients} and {cells}")
    run_demo(out, seed=seed, weights=weights, n_patients=patients, cells_per_patient=cells, say=typer.echo)


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
    max_aspect: float = typer.Option(20.0, help="Images whose long side is more than this many times their short side "
                                                "are skipped (read from the header, before any resize: an 8 x 400,000 "
                                                "strip cropped to 224 px would be 224 x 11.2 M px); 0 = no limit."),
    stain: str = typer.Option("none", help="Colour normalisation to --stain-reference before resizing: none | macenko "
                                           "| reinhard (its fitted numbers are recorded in the store)."),
    stain_reference: Optional[Path] = typer.Option(None, help="Reference image whose colours every image is "
                                                              "normalised to (with --stain)."),
) -> None:
    """Write a backbone's token activations (CLS + patches) for every image to a sharded store.

    Several GPUs or machines: `torchrun --nproc-per-node N -m cytosae extract ...` splits the shards
    between the processes and writes one store (OUT on a filesystem they all see)."""
    _step(ctx, "ExtractSettings", "run_extract")


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
    _step(ctx, "TrainSettings", "run_train", warns=False)


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
    sae_name: Optional[str] = SWEEP_SAE,
    allow_unfinished: bool = ALLOW_UNFINISHED,
    device: str = typer.Option("auto", help="auto (CUDA when available) | cpu | cuda | cuda:N."),
    spliced: bool = typer.Option(False, "--spliced", help="Also splice the SAE into the backbone: its reconstruction "
                                 "of the store's tokens through the remaining blocks, against the clean tokens and a "
                                 "token-mean control (final CLS/patches, k-NN and probe accuracy per label); JSON "
                                 "next to --out as NAME.spliced.json."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="With --spliced: the backbone weights the store "
                                           "was extracted with (default: the run's; random weights need none)."),
) -> None:
    """Reconstruction and sparsity of an SAE on a store, for all, CLS and patch tokens."""
    _step(ctx, "EvaluateSettings", "run_evaluate")


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
    sae_name: Optional[str] = SWEEP_SAE,
    allow_unfinished: bool = ALLOW_UNFINISHED,
    device: str = typer.Option("auto", help="auto (the GPU when there is one) | cpu | cuda | cuda:N: where tokens are encoded."),
    labels: Optional[str] = typer.Option(None, help="Multi-label targets: comma list of 0/1 manifest columns (one per "
                                                    "label); class profiles per label instead of --label-column."),
) -> None:
    """Per-latent firing frequencies, mean activations, top images, label entropy and class profiles."""
    _step(ctx, "StatsSettings", "run_stats")


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
    sae_name: Optional[str] = SWEEP_SAE,
    allow_unfinished: bool = ALLOW_UNFINISHED,
    device: str = typer.Option("auto", help="auto (the GPU when there is one) | cpu | cuda | cuda:N: where tokens are encoded."),
) -> None:
    """Patient barcodes (fraction of each patient's cells where each latent fires) and a rank test between groups."""
    _step(ctx, "PatientsSettings", "run_patients")


@app.command()
def align(
    ctx: typer.Context,
    sae_dir: Optional[Path] = typer.Argument(None, help="SAE directory; with --run: RUN/sae."),
    store: Optional[Path] = typer.Argument(None, help="Labelled activation store; with --run: the store of --dataset."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for alignment.parquet/.json (with --run: RUN/quality)."),
    run: Optional[Path] = typer.Option(None, "--run", help=RUN_HELP),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="With --run: the dataset to measure on (default: the "
                                                                  "only one)."),
    label_column: str = typer.Option("label", help="Manifest column holding each cell's class."),
    token_policy: str = typer.Option("any_patch", help="cls | any_patch (max over patches) | mean: which tokens decide "
                                                       "an image's score."),
    seed: Optional[int] = typer.Option(None, help="Seed of the untrained SAE and the baselines (default: the run's "
                                                  "training seed, else 0)."),
    max_clusters: int = typer.Option(512, help="Most k-means centroids (n_latents, capped here)."),
    fit_tokens: int = typer.Option(20_000, help="Tokens PCA and k-means are fitted on."),
    max_cells: int = typer.Option(500_000_000, help="Most images x scores kept in memory (exact AP/AUROC)."),
    sae_name: Optional[str] = SWEEP_SAE,
    allow_unfinished: bool = ALLOW_UNFINISHED,
    device: str = typer.Option("auto", help="auto (the GPU when there is one) | cpu | cuda | cuda:N: where tokens are encoded."),
) -> None:
    """Label alignment: per class, how well the best SAE latent ranks its cells (AP, Purity@16, Coverage@0.3),
    against PCA, k-means and the untrained SAE on the same tokens."""
    _step(ctx, "AlignSettings", "run_align")


@app.command()
def sweep(
    ctx: typer.Context,
    run: Path = typer.Option(..., "--run", help=RUN_HELP),
    primary: Optional[str] = typer.Option(None, help="Name of the SAE at RUN/sae (default: the run's recorded sweep)."),
    saes: Optional[str] = typer.Option(None, help="Comma list of the SAEs at RUN/saes/NAME (default: the run's "
                                                  "recorded sweep)."),
) -> None:
    """The SAEs of a sweep side by side (RUN/quality/sweep.json, sweep.parquet, figures/sweep_pareto.png): L0, FVU,
    dead latents, label alignment and spliced recovery, with the Pareto front marked. `cytosae run` writes it for
    a study with [sae] lists (docs/concepts.md, "Choosing an SAE: sweeps")."""
    _step(ctx, "SweepSettings", "run_sweep")


@app.command()
def describe(
    ctx: typer.Context,
    sae_dir: Optional[Path] = typer.Argument(None, help="SAE directory; with --run: RUN/sae."),
    stores: Optional[list[Path]] = typer.Argument(None, help="Activation stores to describe the latents on; with "
                                                             "--run: every dataset of the run."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for descriptions.parquet/.json (with --run: "
                                                          "RUN/concepts)."),
    run: Optional[Path] = typer.Option(None, "--run", help=RUN_HELP),
    stats: Optional[Path] = typer.Option(None, "--stats", help="Stats folder whose top_images.parquet gives the top "
                                                               "classes (with --run: RUN/stats when present)."),
    patients: Optional[Path] = typer.Option(None, "--patients", help="Patients folder whose compare.parquet gives "
                                                                     "the enrichment (with --run: RUN/patients when "
                                                                     "present)."),
    label_column: str = typer.Option("label", help="Manifest column holding each cell's class."),
    max_nonzeros: int = typer.Option(200_000_000, help="Most non-zero image-level activations kept in memory (for "
                                                       "the exact AP of each latent's best class)."),
    sae_name: Optional[str] = SWEEP_SAE,
    allow_unfinished: bool = ALLOW_UNFINISHED,
    device: str = typer.Option("auto", help="auto (the GPU when there is one) | cpu | cuda | cuda:N: where tokens are encoded."),
) -> None:
    """One line per latent from measured facts: where in the cell it fires, how far, what colour, its classes,
    datasets and patient enrichment (RUN/concepts/descriptions.parquet, .json)."""
    _step(ctx, "DescribeSettings", "run_describe")


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
    _step(ctx, "ClassifySettings", "run_classify")


@app.command("compare-saes")
def compare_saes(
    ctx: typer.Context,
    a: Path = typer.Argument(..., help="SAE A: an SAE directory, or a run (its SAE; with its stats, the top-image "
                                       "overlap is measured too)."),
    b: Path = typer.Argument(..., help="SAE B, the same way (e.g. the same study trained with another seed)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the figures as JSON here."),
    candidates: int = typer.Option(8, help="Large SAEs: each latent of A may be matched only to its this many most "
                                           "similar latents of B (exact when its best partner is among them)."),
    method: str = typer.Option("auto", help="auto (dense while n_A x n_B <= 4096^2, else candidates) | dense | "
                                            "candidates."),
    allow_unfinished: bool = ALLOW_UNFINISHED,
    device: str = typer.Option("auto", help="auto (the GPU when there is one) | cpu | cuda | cuda:N: where decoder "
                                            "cosines are computed."),
) -> None:
    """Stability: match A's latents one-to-one to B's by decoder cosine (optimal assignment); the share matched at
    cosine >= 0.7 and >= 0.9, the median matched cosine, and the top-image overlap of matched pairs."""
    _step(ctx, "CompareSaesSettings", "run_compare_saes")


# ---------------------------------------------------------------- explorer (explore, report, annotations)


DATA_ROOT_HELP = ("Where the images are now, if the data or the run moved: a folder holding the images under their "
                  "image ids, or NAME=FOLDER for dataset NAME (repeatable).")

SAE_NAME_HELP = ("Which SAE of the run's sweep to show (a name in RUN/quality/sweep.json; default: the run's own SAE, "
                 "at sae/). Its own stats, top images, quality and annotations are shown (RUN/saes/NAME/...).")

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
    sae_name: Optional[str] = typer.Option(None, "--sae", help=SAE_NAME_HELP),
) -> None:
    """Browse, inspect and name the SAE's latents in a web page (JSON API described at /openapi.json)."""
    import uvicorn

    from cytosae.explorer import create_app
    from cytosae.explorer.api import startup_lines

    sae = _check_run_sae(run_dir, allow_unfinished, sae_name)
    lines, token = startup_lines(run_dir.resolve(), host, port)
    try:
        web = create_app(run_dir, data_roots=data_root, preload=True, device=device, host=host, token=token,
                         allow_hosts=allow_host, sae=sae, sae_name=sae_name)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    for line in lines:  # the token is printed once, here, and nowhere else
        typer.echo(line)
    typer.echo("showing " + web.state.explorer.run.shown_sae()["title"])
    uvicorn.run(web, host=host, port=port, log_level="warning")
    # Ctrl-C while the tables still load: interpreter shutdown under a thread inside torch can abort (SIGABRT, exit
    # -6), so the preload stops at its next step and is waited for
    web.state.explorer.stop_preload()


def _check_run_sae(run_dir: Path, allow_unfinished: bool, name: str | None = None):
    """A run's cytosae SAE (or SAE `name` of its sweep: an unknown one is a one-line error listing the sweep's),
    checked like `evaluate` checks it, handed on to the explorer so that it is read once; None where there is none
    to check (the explorer reports missing ones itself)."""
    import json

    from cytosae.run import Run

    try:
        run = Run.open(run_dir)
    except (OSError, ValueError):
        return None  # not a run: create_app says so
    try:
        run = run.for_sae(name)
    except ValueError as exc:
        _fail(str(exc))
    try:
        sae_dir = run.sae_dir
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
    sae_name: Optional[str] = typer.Option(None, "--sae", help=SAE_NAME_HELP),
) -> None:
    """Write the explorer's pages as a static site that opens without a server (index.html)."""
    from cytosae.explorer import build_report

    sae = _check_run_sae(run_dir, allow_unfinished, sae_name)
    try:
        res = build_report(run_dir, out, n_latents=latents, n_images=images, data_roots=data_root, sae=sae,
                           sae_name=sae_name)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"static report of {run_dir} ({res['sae']['title']}): {res['latent_pages']} latent pages, "
               f"{res['image_pages']} image pages, {res['files']} files -> {out / 'index.html'}")
    if res["sae"]["note"]:
        _warn(res["sae"]["note"])


@annotations_app.command("export")
def annotations_export(
    run_dir: Path = typer.Argument(..., help="Run directory holding annotations.sqlite."),
    format: str = typer.Option("csv", "--format", help="csv | json"),
    out: Path = typer.Option(..., "--out", help="File to write."),
) -> None:
    """Export every latent annotation (name, tags, note, status, author, time), its automatic description (when
    `cytosae describe` ran) and the experts' validation answers (JSON: a `validation` list; CSV: a second file,
    OUT's name + .validation.csv)."""
    from cytosae.explorer.annotations import AnnotationStore, DamagedAnnotations, export
    from cytosae.explorer.validation import ValidationStore, answers_csv_path, export_answers_csv, read_descriptions

    db = _annotations_db(run_dir)
    if format not in ("csv", "json"):
        _fail(f"--format must be csv or json, got {format!r}")
    try:
        answers = ValidationStore(db).all_answers()
        table = read_descriptions(run_dir)
        described = None if table is None else {int(j): str(t) for j, t in table["text"].items()}
        n = export(AnnotationStore(db), out, format, validation=answers, descriptions=described)
        if format == "csv" and answers:
            export_answers_csv(answers, answers_csv_path(out))
    except (DamagedAnnotations, ValueError) as exc:  # ValueError: a damaged descriptions table, named
        _fail(str(exc))
    typer.echo(f"{n} annotations from {db} -> {out} ({format})"
               + (f", with the descriptions of {len(described)} latents" if described is not None else ""))
    if answers:
        typer.echo(f"{len(answers)} validation answers -> "
                   f"{answers_csv_path(out) if format == 'csv' else str(out) + ' (validation)'}")


def _annotations_db(run_dir: Path) -> Path:
    from cytosae.run import ANNOTATIONS

    db = run_dir / ANNOTATIONS
    if not db.is_file():
        _fail(f"{db} does not exist: no annotations have been made in this run yet")
    return db


@annotations_app.command("agreement")
def annotations_agreement(
    run_dir: Path = typer.Argument(..., help="Run directory holding annotations.sqlite."),
    as_json: bool = typer.Option(False, "--json", help="Print the full summary (with per-latent agreement) as JSON."),
) -> None:
    """How far the experts who validated latents in the explorer agree: per-latent agreement, Cohen's kappa (two
    experts) or Fleiss' kappa (three or more), share judged coherent, names vs the description's best class."""
    import json

    from cytosae.analysis.agreement import agreement, lines
    from cytosae.explorer.annotations import DamagedAnnotations
    from cytosae.explorer.validation import ValidationStore, read_descriptions

    db = _annotations_db(run_dir)
    try:
        answers = ValidationStore(db).all_answers()
        descriptions = read_descriptions(run_dir)
    except (DamagedAnnotations, ValueError) as exc:
        _fail(str(exc))
    if not answers:
        _fail(f"{db} holds no validation answers: experts give them on the explorer's Expert validation page")
    summary = agreement(answers, descriptions)
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
    else:
        for line in lines(summary):
            typer.echo(line)


def main() -> None:  # pragma: no cover - entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
