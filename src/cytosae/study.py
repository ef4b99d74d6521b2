"""`cytosae run study.toml`: a whole study from one file, run through the steps of cytosae.steps.

A study file names the datasets, the backbone, the SAE and the analyses. Each section is the
settings of one step (cytosae.steps: the same classes the CLI's flags fill), checked key by key
before anything runs; its inputs and outputs are the run's. A step runs when it has not finished
yet; a killed step resumes (extract and train checkpoint themselves); a finished step is skipped
while its settings and those of every step it depends on are unchanged. A changed setting reruns
that step, after removing its stale outputs, and every step after it. One `cytosae run` at a time
per run directory: a second one is refused while the first holds the run's lock.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from cytosae.run import Run, check_name
from cytosae.steps import (ClassifySettings, DescribeSettings, EvaluateSettings, ExtractSettings, PatientsSettings,
                           StatsSettings, StepError, StepSettings, TrainSettings, build, run_classify, run_describe,
                           run_evaluate, run_extract, run_patients, run_stats, run_train)

SECTIONS = {"run", "backbone", "datasets", "sae", "evaluate", "stats", "patients", "classify", "describe"}
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
           EvaluateSettings: {"sae_dir", "store", "out"}, StatsSettings: {"sae_dir", "stores", "out"},
           PatientsSettings: {"sae_dir", "store", "out", "external"},
           ClassifySettings: {"barcodes", "out", "store", "sae", "external", "external_store"},
           DescribeSettings: {"sae_dir", "stores", "out", "stats", "patients"}}
# Keys of the study's own (not step settings): which steps run and on which datasets.
_OWN = {"evaluate": {"enabled"}, "stats": {"enabled"}, "patients": {"external"}, "classify": {"external"},
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
    steps = [_extract_step(study, name) for name in names]
    sae = dict(study.get("sae") or {})
    train_on = _dataset(study, sae.get("dataset", names[0]), "[sae] dataset =")
    steps.append(Step("train", ["train", "--run", run, "--dataset", train_on] + _argv(sae, {"dataset"}),
                      _settings(TrainSettings, sae, f"{f} [sae]", fixed={"dataset": train_on}),
                      needs=[f"extract:{train_on}"]))
    ev = dict(study.get("evaluate") or {})
    if _flag(ev, "enabled", f"{f} [evaluate]"):
        steps.append(Step("evaluate", ["evaluate", "--run", run, "--dataset", train_on] + _argv(ev, {"enabled"}),
                          _settings(EvaluateSettings, {"dataset": train_on, **ev}, f"{f} [evaluate]", {"enabled"}),
                          needs=["train"]))
    st = dict(study.get("stats") or {})
    if _flag(st, "enabled", f"{f} [stats]"):
        steps.append(Step("stats", ["stats", "--run", run] + _argv(st, {"enabled"}),
                          _settings(StatsSettings, st, f"{f} [stats]", {"enabled"}),
                          needs=["train", *[f"extract:{n}" for n in names]]))
    if "patients" in study:
        steps += _patient_steps(study, run, f)
    elif "classify" in study:
        raise StudyError(f"{f}: [classify] needs a [patients] section (it classifies the patients' barcodes)")
    if "describe" in study:
        steps += _describe_step(study, run, f, steps)
    return _keyed(steps, study["_base"])


def _describe_step(study: dict, run: str, f: str, planned: list[Step]) -> list[Step]:
    """[describe]: after stats and patients (it reads their tables when they are made), on every dataset."""
    ds = dict(study["describe"])
    if not _flag(ds, "enabled", f"{f} [describe]"):
        return []
    before = {s.name for s in planned}
    needs = ["train", *[f"extract:{n}" for n in study["datasets"]], *[s for s in ("stats", "patients") if s in before]]
    return [Step("describe", ["describe", "--run", run] + _argv(ds, _OWN["describe"]),
                 _settings(DescribeSettings, ds, f"{f} [describe]", _OWN["describe"]), needs=needs)]


def _extract_step(study: dict, name: str) -> Step:
    backbone = dict(study.get("backbone") or {})
    if "backbone" in backbone:
        raise StudyError(f"{study['_file']} [backbone]: unknown key 'backbone'; the backbone is name = \"...\"")
    if "name" in backbone:
        backbone["backbone"] = backbone.pop("name")  # moved to the end, as the key has always digested it
    for key in ("data", "patients"):
        if key in backbone:
            raise StudyError(f"{study['_file']} [backbone]: {key} belongs in each [datasets.NAME]")
    ds = study["datasets"][name]
    opts = {**backbone, **{k: v for k, v in ds.items() if k != "data"}}
    where = f"{study['_file']} [backbone]/[datasets.{name}]"
    cfg = _settings(ExtractSettings, {**opts, "data": ds["data"]}, where, fixed={"name": name})
    return Step(f"extract:{name}", ["extract", ds["data"], "--run", study["run"]["dir"], "--name", name] + _argv(opts),
                cfg)


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
    return {"extract": lambda: [run.store_dir(name)], "train": lambda: [run.sae_dir],
            "evaluate": lambda: [run.sae_dir / "eval.json"], "stats": lambda: [run.stats_dir],
            "patients": lambda: [run.external_patients_dir(name) if name else run.patients_dir],
            "classify": lambda: [run.classify_dir], "describe": lambda: [run.concepts_dir]}[kind]()


def _complete(run: Run, step: str) -> bool:
    return step in run.steps and all(p.exists() for p in outputs(run, step))


_RUNNERS = {"extract": run_extract, "train": lambda cfg, run, warn: run_train(cfg, run=run),
            "evaluate": run_evaluate, "stats": run_stats, "patients": run_patients, "classify": run_classify,
            "describe": run_describe}


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
        result = _RUNNERS[step.kind](step.settings, run=run.path, warn=say)
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
