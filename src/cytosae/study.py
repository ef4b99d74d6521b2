"""`cytosae run study.toml`: a whole study from one file, run through the steps of cytosae.steps.

A study file names the datasets, the backbone, the SAE and the analyses. Each section is the
settings of one step (cytosae.steps: the same classes the CLI's flags fill), checked key by key
before anything runs; its inputs and outputs are the run's. A step runs when it has not finished
yet; a killed step resumes (extract and train checkpoint themselves); a finished step is skipped
while its settings and those of every step it depends on are unchanged. A changed setting reruns
that step, after removing its stale outputs, and every step after it. One `cytosae run` at a time
per run directory: a second one is refused while the first holds the run's lock.

Lists in [sae] (k, expansion, l1_coeff) or [backbone] (layer) are a sweep: one SAE per combination, each with
its own train/evaluate/align steps, the primary one at RUN/sae and the others at RUN/saes/NAME, compared by a
last `sweep` step (cytosae.steps.sweep; docs/concepts.md "Choosing an SAE: sweeps").
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from cytosae.run import STATS, Run, check_name
from cytosae.steps import (AlignSettings, ClassifySettings, DescribeSettings, EvaluateSettings, ExtractSettings,
                           PatientsSettings, StatsSettings, StepError, StepSettings, TrainSettings, build, run_align,
                           run_classify, run_describe, run_evaluate, run_extract, run_patients, run_stats, run_train)
from cytosae.steps.config import SweepSettings
from cytosae.steps.evaluate import EVAL
from cytosae.steps.sweep import SWEEP_FILES, SWEPT, run_sweep

SECTIONS = {"run", "backbone", "datasets", "sae", "evaluate", "align", "stats", "patients", "classify", "describe"}
STUDY_LOCK = ".study.lock"


class StudyError(ValueError):
    """The study file is wrong; the message names the file and the field."""


@dataclass
class Step:
    name: str
    argv: list[str]  # the equivalent command line: what is shown, and what the step's key digests
    settings: StepSettings | None = None
    needs: list[str] = field(default_factory=list)
    key: str = ""

    @property
    def command(self) -> str:
        return "cytosae " + " ".join(_quote(a) for a in self.argv)

    @property
    def kind(self) -> str:
        return self.name.partition(":")[0]


def _quote(a: str) -> str:
    return a if a and all(c.isalnum() or c in "-_./=:," for c in a) else json.dumps(a)


# ---------------------------------------------------------------- reading the file


def load_study(path: str | Path) -> dict:
    """The study as a dict, with every relative path made absolute against the study file's folder."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file {path} not found; see docs/run-layout.md for its format")
    try:
        study = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise StudyError(f"{path} is not valid TOML: {exc}") from None
    unknown = sorted(set(study) - SECTIONS)
    if unknown:
        raise StudyError(f"{path}: unknown section(s) {unknown}; known: {sorted(SECTIONS)}")
    base = path.parent.resolve()
    _resolve_run_dir(study, path, base)
    _resolve_datasets(study, path, base)
    weights = (study.get("backbone") or {}).get("weights")
    if isinstance(weights, str):
        study["backbone"]["weights"] = str(base / weights)
    study["_file"] = str(path.resolve())
    study["_base"] = str(base)
    return study


def _resolve_run_dir(study: dict, path: Path, base: Path) -> None:
    run_dir = (study.get("run") or {}).get("dir")
    if not isinstance(run_dir, str) or not run_dir:
        raise StudyError(f"{path}: [run] dir = \"FOLDER\" is required (the run directory, relative to the study file)")
    unknown = sorted(set(study["run"]) - {"dir"})
    if unknown:
        raise StudyError(f"{path} [run]: unknown key {unknown[0]!r}; known: dir")
    study["run"]["dir"] = str(base / run_dir)
    if Path(study["run"]["dir"]).exists() and not Path(study["run"]["dir"]).is_dir():
        raise StudyError(f"{path} [run]: dir {study['run']['dir']} is a file, not a folder: name a run directory")


def _resolve_datasets(study: dict, path: Path, base: Path) -> None:
    datasets = study.get("datasets") or {}
    if not isinstance(datasets, dict) or not datasets:
        raise StudyError(f"{path}: at least one [datasets.NAME] section with data = \"FOLDER or CSV\" is required")
    for name, ds in datasets.items():
        try:
            check_name(name)
        except ValueError as exc:
            raise StudyError(f"{path}: [datasets.{name}]: {exc}") from None
        if not isinstance(ds, dict) or not isinstance(ds.get("data"), str):
            raise StudyError(f"{path}: [datasets.{name}] needs data = \"FOLDER or CSV\"")
        for key in ("data", "patients"):
            if isinstance(ds.get(key), str):
                ds[key] = str(base / ds[key])


# ---------------------------------------------------------------- sections as step settings

# Settings a study does not take: a study step's inputs and outputs are the run's.
_PLACED = {ExtractSettings: {"out", "name"}, TrainSettings: {"store", "out"},
           EvaluateSettings: {"sae_dir", "store", "out", "sae_name"},
           AlignSettings: {"sae_dir", "store", "out", "sae_name"},
           StatsSettings: {"sae_dir", "stores", "out", "sae_name"},
           PatientsSettings: {"sae_dir", "store", "out", "external", "sae_name"},
           ClassifySettings: {"barcodes", "out", "store", "sae", "external", "external_store"},
           DescribeSettings: {"sae_dir", "stores", "out", "stats", "patients", "sae_name"}}
# Keys of the study's own (not step settings): which steps run and on which datasets.
_OWN = {"sae": {"primary"}, "evaluate": {"enabled"}, "align": {"enabled"}, "stats": {"enabled", "every_sae"},
        "patients": {"external"}, "classify": {"external"},
        "describe": {"enabled"}}


def _settings(cls: type[StepSettings], section: dict, where: str, own: set[str] = frozenset(),
              fixed: dict | None = None) -> StepSettings:
    """A study section as `cls`, every key checked: unknown ones and the run's own places are refused."""
    known = [k for k in cls.model_fields if k not in _PLACED[cls]] + sorted(own)
    for key in section:
        if key in _PLACED[cls] and key not in own:
            raise StudyError(f"{where}: {key} cannot be set in a study: a study step's inputs and outputs "
                             f"are in its run ([run] dir)")
        if key not in known:
            raise StudyError(f"{where}: unknown key {key!r}; known: {', '.join(known)}")
    values = {k: v for k, v in section.items() if k not in own}
    try:
        return build(cls, {**values, **(fixed or {})}, where)
    except StepError as exc:
        raise StudyError(str(exc)) from None


def _argv(section: dict, skip: set[str] = frozenset()) -> list[str]:
    """A section as the options of the command doing the same step (what the step's key has digested since
    studies were first run as commands: keep it, or every finished study reruns)."""
    argv: list[str] = []
    for key, value in section.items():
        if key in skip:
            continue
        opt = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv += [opt] if value else []
        elif isinstance(value, list):
            argv += [opt, ",".join(str(v) for v in value)]
        else:
            argv += [opt, str(value)]
    return argv


def _flag(section: dict, key: str, where: str) -> bool:
    value = section.get(key, True)
    if not isinstance(value, bool):
        raise StudyError(f"{where}: {key} should be true or false, got {value!r}")
    return value


def _dataset(study: dict, name, label: str) -> str:
    names = list(study["datasets"])
    if name not in names:
        raise StudyError(f"{study['_file']}: {label} {name!r} is not one of the datasets {names}")
    return name


# ---------------------------------------------------------------- planning


def plan(study: dict) -> list[Step]:
    """The study's steps in order, their settings checked, each keyed by its own settings and those of the steps
    it needs. Everything a real run checks before its first step is checked here (a dry run is this)."""
    f, run = study["_file"], study["run"]["dir"]
    names = list(study["datasets"])
    sae = dict(study.get("sae") or {})
    train_on = _dataset(study, sae.get("dataset", names[0]), "[sae] dataset =")
    combos = sweep_combinations(sae, f"{f} [sae]", train_on, _layers(study, train_on))
    own_layer = combos[0][2] if combos else None  # the primary SAE's: the layer of the run's stores
    steps = [_extract_step(study, name, own_layer) for name in names]
    steps += _sae_steps(study, run, f, train_on, None, combos[0][1] if combos else sae)
    for layer in dict.fromkeys(c[2] for c in combos if c[2] != own_layer):
        steps.append(_layer_extract_step(study, train_on, layer))
    for name, section, layer in combos[1:]:
        store = None if layer == own_layer else f"extract-layer:{train_on}:{layer}"
        steps += _sae_steps(study, run, f, train_on, name, section, store)
    if combos:
        steps.append(_sweep_step(run, combos, [s.name for s in steps if s.kind in ("train", "evaluate", "align")]))
    steps += _stats_steps(study, run, f, [n for n, *_ in combos[1:]])
    if "patients" in study:
        steps += _patient_steps(study, run, f)
    elif "classify" in study:
        raise StudyError(f"{f}: [classify] needs a [patients] section (it classifies the patients' barcodes)")
    if "describe" in study:
        steps += _describe_step(study, run, f, steps)
    return _keyed(steps, study["_base"])


def _stats_steps(study: dict, run: str, f: str, sweep_saes: list[str]) -> list[Step]:
    """[stats] for the run's SAE and, with `every_sae = true` (the default), for every other SAE of a sweep into
    its own folder (`stats:NAME`, after the sweep has recorded where each SAE lives), so that the explorer can
    show any of them."""
    st, where = dict(study.get("stats") or {}), f"{f} [stats]"
    if not _flag(st, "enabled", where):
        return []
    own, datasets = _OWN["stats"], [f"extract:{n}" for n in study["datasets"]]
    steps = [Step("stats", ["stats", "--run", run] + _argv(st, own), _settings(StatsSettings, st, where, own),
                  needs=["train", *datasets])]
    if _flag(st, "every_sae", where):
        steps += [Step(f"stats:{name}", ["stats", "--run", run, "--sae", name] + _argv(st, own),
                       _settings(StatsSettings, st, where, own, fixed={"sae_name": name}),
                       needs=["sweep", f"train:{name}", *datasets]) for name in sweep_saes]
    return steps


def _describe_step(study: dict, run: str, f: str, planned: list[Step]) -> list[Step]:
    """[describe]: after stats and patients (it reads their tables when they are made), on every dataset."""
    ds = dict(study["describe"])
    if not _flag(ds, "enabled", f"{f} [describe]"):
        return []
    before = {s.name for s in planned}
    needs = ["train", *[f"extract:{n}" for n in study["datasets"]], *[s for s in ("stats", "patients") if s in before]]
    return [Step("describe", ["describe", "--run", run] + _argv(ds, _OWN["describe"]),
                 _settings(DescribeSettings, ds, f"{f} [describe]", _OWN["describe"]), needs=needs)]


def _check_list(where: str, key: str, values: list) -> None:
    if not values or len(set(map(repr, values))) != len(values):
        raise StudyError(f"{where}: {key} = {values!r}: a sweep list needs at least one value, each once")


def _layers(study: dict, dataset: str) -> list | None:
    """[backbone] layer = [-2, -4]: the layers of a layer sweep (None without one)."""
    layers = (study.get("backbone") or {}).get("layer")
    if not isinstance(layers, list):
        return None
    where = f"{study['_file']} [backbone]"
    _check_list(where, "layer", layers)
    for v in layers:  # each becomes a folder name before ExtractSettings sees it
        if not isinstance(v, int) or isinstance(v, bool):
            raise StudyError(f"{where}: layer should be a valid integer, got {v!r}")
    if "layer" in study["datasets"][dataset]:
        raise StudyError(f"{where}: layer is a list (a layer sweep), but [datasets.{dataset}] sets its own layer; "
                         f"remove one")
    return layers


def sweep_combinations(sae: dict, where: str, dataset: str, layers: list | None = None) -> list[tuple[str, dict, int]]:
    """[sae] lists (`k = [16, 32]`) and a [backbone] layer list as one (name, [sae] section, layer or None) per
    combination, named by its values (`k16-x64`, `L-4-k16-x64`), in the file's order with the primary one
    (`primary = NAME`, default the first) first; [] when no key is a list."""
    import itertools

    lists = {k: v for k, v in sae.items() if isinstance(v, list)}
    for key, values in lists.items():
        if key not in SWEPT:
            raise StudyError(f"{where}: {key} is a list, but only {', '.join(SWEPT)} (and [backbone] layer) can "
                             f"sweep (one SAE per combination); give {key} one value")
        _check_list(where, key, values)
    primary = sae.get("primary")
    if not lists and layers is None:
        if primary is not None:
            raise StudyError(f"{where}: primary names one SAE of a sweep, but no key is a list; remove it")
        return []
    base = {k: v for k, v in sae.items() if k != "primary"}
    combos = []
    for layer, *values in itertools.product(*([layers] if layers is not None else [[None]]), *lists.values()):
        section = {**base, **dict(zip(lists, values))}
        cfg = _settings(TrainSettings, section, where, _OWN["sae"], fixed={"dataset": dataset})
        prefix = f"L{layer}-" if layers is not None else ""
        combos.append((prefix + sae_name(cfg, set(lists)), section, layer))
    names = [n for n, *_ in combos]
    if len(set(names)) != len(names):
        raise StudyError(f"{where}: two combinations are both named {next(n for n in names if names.count(n) > 1)!r} "
                         f"(their values print alike); give values that differ more")
    if primary is not None and primary not in names:
        raise StudyError(f"{where}: primary = {primary!r} is not one of the sweep's SAEs {names}")
    return sorted(combos, key=lambda c: c[0] != (primary or names[0]))


def sae_name(cfg: TrainSettings, swept: set[str]) -> str:
    """A sweep SAE's name from its values: k (when its architecture takes k), expansion, and l1 when swept."""
    parts = [f"k{cfg.k}"] if "k" in swept or "k" in cfg.arch_options() else []
    parts.append(f"x{cfg.expansion}")
    if "l1_coeff" in swept:
        parts.append(f"l1-{cfg.l1_coeff:g}")
    return "-".join(parts)


def _sae_steps(study: dict, run: str, f: str, train_on: str, name: str | None, sae: dict,
               store_step: str | None = None) -> list[Step]:
    """Train, evaluate and (with [align]) align one SAE: the run's own (name None, at sae/, the steps named as
    they always were) or sweep SAE `name` (at saes/NAME, steps `train:NAME`, ...); `store_step`: the
    extract-layer step whose store (another layer's) it is trained, evaluated and aligned on."""
    sae = {k: v for k, v in sae.items() if k != "primary"}
    out = Run(run, {}).sweep_sae_dir(name) if name else None
    tag, placed = (f":{name}", {"out": out}) if name else ("", {})
    store = _layer_store(run, store_step) if store_step else None
    at = {"store": store} if store else {}
    extract = store_step or f"extract:{train_on}"
    steps = [Step(f"train{tag}", ["train", *([str(store)] if store else []), "--run", run, "--dataset", train_on]
                  + _argv(sae, {"dataset"}) + (["--out", str(out)] if out else []),
                  _settings(TrainSettings, sae, f"{f} [sae]", _OWN["sae"],
                            fixed={"dataset": train_on, **placed, **at}), needs=[extract])]
    given = [str(out)] + ([str(store)] if store else []) if out else []  # SAE_DIR [STORE] of evaluate and align
    ev = dict(study.get("evaluate") or {})
    if _flag(ev, "enabled", f"{f} [evaluate]"):
        fixed = {"sae_dir": out, "out": out / EVAL, **at} if out else {}
        steps.append(Step(f"evaluate{tag}", ["evaluate", *given, "--run", run, "--dataset", train_on]
                          + _argv(ev, {"enabled"}) + (["--out", str(out / EVAL)] if out else []),
                          _settings(EvaluateSettings, {"dataset": train_on, **ev}, f"{f} [evaluate]", {"enabled"},
                                    fixed=fixed), needs=[f"train{tag}"]))
    elif name:
        raise StudyError(f"{f} [evaluate]: enabled = false, but a sweep ([sae] lists) compares its SAEs by what "
                         f"evaluate measures; enable it")
    al = dict(study.get("align") or {})
    if "align" in study and _flag(al, "enabled", f"{f} [align]"):
        on = _dataset(study, al.get("dataset", train_on), "[align] dataset =")
        if store and on != train_on:
            raise StudyError(f"{f} [align]: dataset = {on!r}, but a layer sweep's SAEs are aligned on the dataset "
                             f"they are trained on ({train_on!r}), the only one extracted at every layer")
        quality = Run(run, {}).sae_quality_dir(name) if name else None
        fixed = {"dataset": on, **({"sae_dir": out, "out": quality, **at} if out else {})}
        steps.append(Step(f"align{tag}", ["align", *given, "--run", run, "--dataset", on]
                          + _argv(al, {"enabled", "dataset"}) + (["--out", str(quality)] if out else []),
                          _settings(AlignSettings, al, f"{f} [align]", _OWN["align"], fixed=fixed),
                          needs=[f"train{tag}", store_step or f"extract:{on}"]))
    return steps


def _layer_store(run: str, step: str) -> Path:
    """The store an `extract-layer:DATASET:LAYER` step writes."""
    return Run(run, {}).layer_store_dir(*_dataset_layer(step.partition(":")[2]))


def _sweep_step(run: str, combos: list[tuple[str, dict, int]], needs: list[str]) -> Step:
    names = [n for n, *_ in combos]
    return Step("sweep", ["sweep", "--run", run, "--primary", names[0], "--saes", ",".join(names[1:])],
                SweepSettings(primary=names[0], saes=names[1:]), needs=needs)


def _extract_step(study: dict, name: str, layer: int | None = None) -> Step:
    """Extract dataset `name` into the run (at `layer`, the primary SAE's, when [backbone] layer is a list)."""
    backbone = _backbone_options(study, layer)
    ds = study["datasets"][name]
    opts = {**backbone, **{k: v for k, v in ds.items() if k != "data"}}
    where = f"{study['_file']} [backbone]/[datasets.{name}]"
    cfg = _settings(ExtractSettings, {**opts, "data": ds["data"]}, where, fixed={"name": name})
    return Step(f"extract:{name}", ["extract", ds["data"], "--run", study["run"]["dir"], "--name", name] + _argv(opts),
                cfg)


def _layer_extract_step(study: dict, name: str, layer: int) -> Step:
    """Dataset `name` at another `layer` of a layer sweep, into RUN/layers/LAYER/NAME: a store for that layer's
    SAEs, not a dataset of the run (run.json's datasets and backbone keep the run's own layer)."""
    ds = study["datasets"][name]
    opts = {**_backbone_options(study, layer), **{k: v for k, v in ds.items() if k != "data"}}
    out = Run(study["run"]["dir"], {}).layer_store_dir(name, layer)
    cfg = _settings(ExtractSettings, {**opts, "data": ds["data"]}, f"{study['_file']} [backbone]",
                    fixed={"name": name, "out": out})
    return Step(f"extract-layer:{name}:{layer}", ["extract", ds["data"], "--out", str(out)] + _argv(opts), cfg)


def _backbone_options(study: dict, layer: int | None) -> dict:
    backbone = dict(study.get("backbone") or {})
    if "backbone" in backbone:
        raise StudyError(f"{study['_file']} [backbone]: unknown key 'backbone'; the backbone is name = \"...\"")
    if "name" in backbone:
        backbone["backbone"] = backbone.pop("name")  # moved to the end, as the key has always digested it
    for key in ("data", "patients"):
        if key in backbone:
            raise StudyError(f"{study['_file']} [backbone]: {key} belongs in each [datasets.NAME]")
    for key, value in backbone.items():
        if isinstance(value, list) and key != "layer":
            raise StudyError(f"{study['_file']} [backbone]: {key} is a list, but only layer (and [sae] k, expansion, "
                             f"l1_coeff) can sweep; give {key} one value")
    if layer is not None:
        backbone["layer"] = layer  # in its place: a study that turns layer = -2 into [-2, -4] keeps its stores
    return backbone


def _patient_steps(study: dict, run: str, f: str) -> list[Step]:
    pt = dict(study["patients"])
    on = _dataset(study, pt.get("dataset", list(study["datasets"])[0]), "[patients] dataset")
    external = pt.get("external") or []
    external = [external] if isinstance(external, str) else list(external)
    for n in external:
        _dataset(study, n, "[patients] external dataset")
    opts = _argv(pt, {"dataset", "external"})
    where = f"{f} [patients]"
    steps = [Step("patients", ["patients", "--run", run, "--dataset", on] + opts,
                  _settings(PatientsSettings, {**pt, "dataset": on}, where, _OWN["patients"]),
                  needs=["train", f"extract:{on}"])]
    for n in external:
        steps.append(Step(f"patients:{n}", ["patients", "--run", run, "--dataset", n, "--external"] + opts,
                          _settings(PatientsSettings, {**pt, "dataset": n}, where, _OWN["patients"],
                                    fixed={"external": True}),
                          needs=["train", f"extract:{n}"]))
    if "classify" in study:
        steps.append(_classify_step(study, run, f, external))
    return steps


def _classify_step(study: dict, run: str, f: str, external: list[str]) -> Step:
    cl = dict(study["classify"])
    argv = ["classify", "--run", run] + _argv(cl, _OWN["classify"])
    ext, needs, fixed = cl.get("external"), ["patients"], {}
    if ext is not None:
        if ext not in external:
            raise StudyError(f"{f}: [classify] external = {ext!r} must also be listed in [patients] external")
        fixed["external"] = Run(run, {}).external_patients_dir(ext)
        argv += ["--external", str(fixed["external"])]
        needs.append(f"patients:{ext}")
    cfg = _settings(ClassifySettings, cl, f"{f} [classify]", _OWN["classify"], fixed=fixed)
    return Step("classify", argv, cfg, needs=needs)


def _keyed(steps: list[Step], base: str) -> list[Step]:
    """Keys from the settings with the study's folder written as $STUDY: a study moved with its run is still done."""
    keys: dict[str, str] = {}
    for s in steps:
        argv = [a.replace(base, "$STUDY") for a in s.argv]
        payload = json.dumps({"argv": argv, "needs": {n: keys[n] for n in s.needs}}, sort_keys=True)
        s.key = keys[s.name] = hashlib.sha256(payload.encode()).hexdigest()[:16]
    return steps


# ---------------------------------------------------------------- running


def outputs(run: Run, step: str) -> list[Path]:
    """What a step writes, removed when its settings changed (a stale output must never pass for a new one)."""
    kind, _, name = step.partition(":")
    sae = lambda: run.sweep_sae_dir(name) if name else run.sae_dir  # noqa: E731
    return {"extract": lambda: [run.store_dir(name)],
            "extract-layer": lambda: [run.layer_store_dir(*_dataset_layer(name))], "train": lambda: [sae()],
            "evaluate": lambda: [sae() / EVAL],
            "align": lambda: [run.sae_quality_dir(name or None) / f for f in _align_files()],
            "sweep": lambda: [run.quality_dir / f for f in SWEEP_FILES], "stats": lambda: [run.sweep_sae_dir(name) / STATS if name else run.stats_dir],
            "patients": lambda: [run.external_patients_dir(name) if name else run.patients_dir],
            "classify": lambda: [run.classify_dir], "describe": lambda: [run.concepts_dir]}[kind]()


def _dataset_layer(name: str) -> tuple[str, int]:
    dataset, _, layer = name.rpartition(":")
    return dataset, int(layer)


def _extract_layer(cfg: ExtractSettings, run: Path, warn, step: str):
    """A layer sweep's store of another layer: extracted outside the run's datasets (so its own backbone record
    and stores are untouched), recorded as its own step once complete."""
    started = time.time()
    result = run_extract(cfg, run=None, warn=warn)
    if result.complete:
        Run.open(run).record_step(step, "cytosae extract", cfg.model_dump(mode="json"),
                                  inputs={"weights": cfg.weights}, seconds=time.time() - started)
    return result


def _align_files() -> tuple[str, ...]:
    from cytosae.analysis.alignment import FILES  # imported here: the analysis modules load torch

    return FILES


def _complete(run: Run, step: str) -> bool:
    return step in run.steps and all(p.exists() for p in outputs(run, step))


_RUNNERS = {"extract": run_extract, "extract-layer": _extract_layer, "train": lambda cfg, run, warn, step: run_train(cfg, run=run, step=step),
            "evaluate": run_evaluate, "align": run_align, "sweep": run_sweep, "stats": run_stats,
            "patients": run_patients, "classify": run_classify,
            "describe": run_describe}
_NAMED = {"extract-layer", "train", "evaluate", "align", "sweep"}  # steps told their name: a sweep has one of each per SAE


@contextlib.contextmanager
def study_lock(run_dir: Path) -> Iterator[None]:
    """The run to this `cytosae run` alone: a second one at once would run every step into the same folders."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / STUDY_LOCK, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise StudyError(f"run {run_dir} is being run by another `cytosae run` (pid {holder}); wait for it to "
                             f"finish, or stop it first") from None
        try:
            lock.truncate(0)
            lock.write(str(os.getpid()))
            lock.flush()
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def run_study(path: str | Path, say: Callable[[str], None] = print, dry_run: bool = False) -> dict:
    """Run every step of the study that is not done; returns {step: "done"|"skipped"|"planned"}."""
    study = load_study(path)
    steps = plan(study)
    run_dir = Path(study["run"]["dir"])
    if dry_run:
        run = Run.open(run_dir) if run_dir.is_dir() and _is_run(run_dir) else Run(run_dir, {})
        return _walk(study, steps, run, say, dry_run=True)
    with study_lock(run_dir):
        return _walk(study, steps, Run.open(run_dir, create=True), say, dry_run=False)


def _is_run(path: Path) -> bool:
    try:
        Run.open(path)
        return True
    except FileNotFoundError:
        return False


def _walk(study: dict, steps: list[Step], run: Run, say: Callable[[str], None], dry_run: bool) -> dict:
    keys = dict((run.meta.get("study") or {}).get("keys") or {})
    sweep = next((s.settings for s in steps if s.kind == "sweep"), None)
    if sweep is not None:
        say(f"sweep of {1 + len(sweep.saes)} SAEs: {sweep.primary} (primary, at sae/: the one every later step "
            f"uses)" + "".join(f", {n} (saes/{n})" for n in sweep.saes))
    status: dict[str, str] = {}
    changed: set[str] = set()
    for i, step in enumerate(steps, 1):
        head = f"[{i}/{len(steps)}] {step.name}"
        fresh = keys.get(step.name) == step.key and not changed.intersection(step.needs)
        if fresh and _complete(run, step.name):
            status[step.name] = "skipped"
            say(f"{head}: done earlier with the same settings, skipped")
            continue
        changed.add(step.name)
        if dry_run:
            status[step.name] = "planned"
            say(f"{head}: would run {step.command}")
            continue
        if step.name in keys and keys[step.name] != step.key:
            say(f"{head}: settings changed since the last run: removing its outputs and rerunning")
            _remove(run, step.name)
        keys[step.name] = step.key
        run.set_study_keys(study["_file"], keys)
        say(f"{head}: {step.command}")
        _execute(step, run, say)
        status[step.name] = "done"
        run = Run.open(run.path)
    return status


def _execute(step: Step, run: Run, say: Callable[[str], None]) -> None:
    try:
        named = {"step": step.name} if step.kind in _NAMED else {}
        result = _RUNNERS[step.kind](step.settings, run=run.path, warn=say, **named)
    except StepError as exc:
        raise StudyError(f"step {step.name}: {exc}; fix it and run the study again: finished steps are kept") from None
    for line in result.lines():
        say(line)


def _remove(run: Run, step: str) -> None:
    for p in outputs(run, step):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    run.forget_steps([step])
