"""`cytosae run study.toml`: a whole study from one file, composed of the CLI's own commands.

A study file names the datasets, the backbone, the SAE and the analyses. Each becomes
one step, a `cytosae` command writing into the run (`--run RUN`), so a study can do
exactly what the commands do, with the same options (docs/run-layout.md lists them).
A step runs when it has not finished yet; a killed step resumes (extract and train
checkpoint themselves); a finished step is skipped while its settings and those of
every step it depends on are unchanged. A changed setting reruns that step, after
removing its stale outputs, and every step after it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cytosae.run import Run, check_name

SECTIONS = {"run", "backbone", "datasets", "sae", "evaluate", "stats", "patients", "classify"}
# study keys that the study itself uses and does not pass on as command options
_OWN = {"sae": {"dataset"}, "patients": {"dataset", "external"}, "classify": {"external"},
        "evaluate": {"enabled"}, "stats": {"enabled"}}
_BACKBONE_ALIASES = {"name": "backbone"}


class StudyError(ValueError):
    """The study file is wrong; the message names the file and the field."""


@dataclass
class Step:
    name: str
    argv: list[str]
    needs: list[str] = field(default_factory=list)
    key: str = ""

    @property
    def command(self) -> str:
        return "cytosae " + " ".join(_quote(a) for a in self.argv)


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
    run_dir = (study.get("run") or {}).get("dir")
    if not isinstance(run_dir, str) or not run_dir:
        raise StudyError(f"{path}: [run] dir = \"FOLDER\" is required (the run directory, relative to the study file)")
    study["run"]["dir"] = str(base / run_dir)
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
            if key in ds:
                ds[key] = str(base / ds[key])
    weights = (study.get("backbone") or {}).get("weights")
    if isinstance(weights, str):
        study["backbone"]["weights"] = str(base / weights)
    study["_file"] = str(path.resolve())
    study["_base"] = str(base)
    return study


# ---------------------------------------------------------------- planning


def _options(section: dict, command: str, where: str, skip: set[str] = frozenset()) -> list[str]:
    """A study section as command-line options of `cytosae COMMAND`, checked against the command's own options."""
    known = _command_options(command)
    argv: list[str] = []
    for key, value in section.items():
        if key in skip:
            continue
        opt = "--" + key.replace("_", "-")
        if opt not in known:
            raise StudyError(f"{where}: unknown setting {key!r}: `cytosae {command}` has no {opt} "
                             f"(see `cytosae {command} --help`)")
        flag, multiple = known[opt]
        if flag:
            if not isinstance(value, bool):
                raise StudyError(f"{where}: {key} must be true or false")
            if value:
                argv.append(opt)
        elif isinstance(value, list):
            if not multiple:
                argv += [opt, ",".join(str(v) for v in value)]
            else:
                for v in value:
                    argv += [opt, str(v)]
        elif isinstance(value, dict):
            raise StudyError(f"{where}: {key} must be a value, not a table")
        else:
            argv += [opt, str(value)]
    return argv


@functools.lru_cache(maxsize=None)
def _command_options(command: str) -> dict[str, tuple[bool, bool]]:
    import typer.main

    from cytosae.cli import app

    cmd = typer.main.get_command(app).commands[command]
    out = {}
    for p in cmd.params:
        for o in getattr(p, "opts", []):
            if o.startswith("--"):
                out[o] = (bool(getattr(p, "is_flag", False)), bool(getattr(p, "multiple", False)))
    return out


def plan(study: dict) -> list[Step]:
    """The study's steps in order, each keyed by its own settings and those of the steps it needs."""
    f = study["_file"]
    run = study["run"]["dir"]
    datasets = study["datasets"]
    names = list(datasets)
    backbone = dict(study.get("backbone") or {})
    for alias, opt in _BACKBONE_ALIASES.items():
        if alias in backbone:
            backbone[opt] = backbone.pop(alias)
    steps: list[Step] = []
    for name, ds in datasets.items():
        opts = {**backbone, **{k: v for k, v in ds.items() if k != "data"}}
        steps.append(Step(f"extract:{name}", ["extract", ds["data"], "--run", run, "--name", name]
                          + _options(opts, "extract", f"{f} [backbone]/[datasets.{name}]")))
    sae = dict(study.get("sae") or {})
    train_on = sae.get("dataset", names[0])
    if train_on not in datasets:
        raise StudyError(f"{f}: [sae] dataset = {train_on!r} is not one of the datasets {names}")
    steps.append(Step("train", ["train", "--run", run, "--dataset", train_on]
                      + _options(sae, "train", f"{f} [sae]", _OWN["sae"]), needs=[f"extract:{train_on}"]))
    extracts = [f"extract:{n}" for n in names]
    ev = dict(study.get("evaluate") or {})
    if ev.get("enabled", True):
        steps.append(Step("evaluate", ["evaluate", "--run", run, "--dataset", train_on]
                          + _options(ev, "evaluate", f"{f} [evaluate]", _OWN["evaluate"]), needs=["train"]))
    st = dict(study.get("stats") or {})
    if st.get("enabled", True):
        steps.append(Step("stats", ["stats", "--run", run] + _options(st, "stats", f"{f} [stats]", _OWN["stats"]),
                          needs=["train", *extracts]))
    if "patients" in study:
        steps += _patient_steps(study, run, f)
    return _keyed(steps, study["_base"])


def _patient_steps(study: dict, run: str, f: str) -> list[Step]:
    pt = dict(study["patients"])
    names = list(study["datasets"])
    on = pt.get("dataset", names[0])
    external = pt.get("external") or []
    external = [external] if isinstance(external, str) else list(external)
    for n in [on, *external]:
        if n not in study["datasets"]:
            raise StudyError(f"{f}: [patients] dataset {n!r} is not one of the datasets {names}")
    opts = _options(pt, "patients", f"{f} [patients]", _OWN["patients"])
    steps = [Step("patients", ["patients", "--run", run, "--dataset", on] + opts, needs=["train", f"extract:{on}"])]
    for n in external:
        steps.append(Step(f"patients:{n}", ["patients", "--run", run, "--dataset", n, "--external"] + opts,
                          needs=["train", f"extract:{n}"]))
    if "classify" in study:
        cl = dict(study["classify"])
        argv = ["classify", "--run", run] + _options(cl, "classify", f"{f} [classify]", _OWN["classify"])
        ext = cl.get("external")
        needs = ["patients"]
        if ext is not None:
            if ext not in external:
                raise StudyError(f"{f}: [classify] external = {ext!r} must also be listed in [patients] external")
            argv += ["--external", str(Run(run, {}).external_patients_dir(ext))]
            needs.append(f"patients:{ext}")
        steps.append(Step("classify", argv, needs=needs))
    return steps


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
            "classify": lambda: [run.classify_dir]}[kind]()


def _complete(run: Run, step: str) -> bool:
    return step in run.steps and all(p.exists() for p in outputs(run, step))


def run_study(path: str | Path, say: Callable[[str], None] = print, dry_run: bool = False) -> dict:
    """Run every step of the study that is not done; returns {step: "done"|"skipped"|"planned"}."""
    from cytosae.cli import app

    study = load_study(path)
    steps = plan(study)
    run = Run.open(study["run"]["dir"], create=True)
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
        try:
            code = app(step.argv, standalone_mode=False, prog_name="cytosae")
        except Exception as exc:
            if not hasattr(exc, "format_message"):  # a bug, not a usage error: keep its traceback
                raise
            raise StudyError(f"step {step.name}: {exc.format_message()}") from None
        if code not in (None, 0):
            raise StudyError(f"step {step.name} failed (exit {code}); fix the cause above and run the study again: "
                             f"finished steps are kept")
        status[step.name] = "done"
        run = Run.open(run.path)
    return status


def _remove(run: Run, step: str) -> None:
    for p in outputs(run, step):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    run.forget_steps([step])
