"""The run directory: the unit of work. This module alone knows its layout and `run.json`.

    RUN/run.json          what the run holds and how each step made it (docs/run-layout.md)
    RUN/stores/NAME/      activation store of dataset NAME            `cytosae extract --run RUN`
    RUN/sae/              the SAE (+ eval.json, eval.spliced.json)    `cytosae train|evaluate [--spliced] --run RUN`
    RUN/saes/NAME/        the other SAEs of a sweep (+ eval.json, quality/)   `cytosae run study.toml` ([sae] lists)
                          and their own analyses (stats/, ...: `Run.for_sae(NAME)` says where)
    RUN/layers/LAYER/NAME/   a layer sweep's stores of the other layers     `cytosae run study.toml` ([backbone] layer list)
    RUN/stats/            per-latent statistics                       `cytosae stats --run RUN`
    RUN/patients/         barcodes, disease comparison                `cytosae patients --run RUN`
    RUN/classify/         patient-level diagnosis                     `cytosae classify --run RUN`
    RUN/concepts/         one description per latent                  `cytosae describe --run RUN`
    RUN/annotations.sqlite   names given in the explorer

Every command that writes into a run records a step in run.json (command, settings,
versions, cheap input digests, time), so a run says how it was made. A run copied to
another machine keeps working: every path in run.json is relative to the run, and
images are found again through data roots (`image_path`).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import platform
import re
from pathlib import Path
from typing import Annotated, Any, Iterable, Iterator, Literal, Optional

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from cytosae.store.format import InvalidFile

RUN_JSON = "run.json"
RUN_FORMAT = "cytosae-run"
RUN_FORMAT_VERSION = 1
STORES, SAE_DIR, STATS, PATIENTS, CLASSIFY = "stores", "sae", "stats", "patients", "classify"
CONCEPTS = "concepts"  # descriptions of the latents (`cytosae describe`)
QUALITY = "quality"  # measurements of how good the SAE is (`cytosae align`)
SAES = "saes"  # saes/NAME: the SAEs of a sweep other than the primary one (which stays at sae/)
LAYERS = "layers"  # layers/LAYER/NAME: a layer sweep's stores of dataset NAME at its other layers (not datasets)
SWEEP = "sweep"  # run.json key of a sweep: {"primary": NAME, "saes": {NAME: {"dir", "settings"}}}; absent without one
ANNOTATIONS = "annotations.sqlite"
EXTERNAL = "external"  # external/NAME: barcodes of a second cohort
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_CHEAP_DIGEST_BYTES = 256 * 1024 * 1024  # inputs larger than this are recorded by size only


class NotARun(FileNotFoundError):
    """The folder is neither a run (run.json) nor laid out like one (sae/ + stores/*)."""


class InvalidRunJson(InvalidFile):
    """run.json holds what no cytosae writes: one line naming the file and the field (`steps.train.finished:
    must be a string timestamp`). A ValueError, so every command prints it as its one-line error."""


RUN_JSON_FIX = "restore it, or delete it and rerun the study"


# ---------------------------------------------------------------------- run.json's schema
def _timestamp(value):
    if not isinstance(value, str):
        raise ValueError(f"must be a string timestamp (ISO 8601), got {value!r}")
    try:
        _dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"must be a string timestamp (ISO 8601), got {value!r}") from None
    return value


def _inside_run(value: str) -> str:
    if Path(value).is_absolute() or ".." in Path(value).parts:
        raise ValueError(f"{value!r} must be a path inside the run (relative, without '..')")
    return value


def _plain_names(value: dict) -> dict:
    for name in value:
        if not _NAME.match(name):
            raise ValueError(f"dataset name {name!r} must start with a letter or digit and use only letters, "
                             f"digits, '_', '.' and '-'")
    return value


Timestamp = Annotated[str, BeforeValidator(_timestamp)]
InsideRun = Annotated[str, AfterValidator(_inside_run)]


class _Record(BaseModel):
    # strict: "layer": "-2" or "size": "3" is refused, never coerced; extra keys: no writer makes them
    model_config = ConfigDict(strict=True, extra="forbid")


class DatasetEntry(_Record):
    store: InsideRun
    data: Optional[str] = None       # the data source as given (a folder or CSV), relative when inside the run
    data_root: Optional[str] = None  # where the images are now (`Run.add_dataset(data_root=...)`)


class BackboneSpec(_Record):
    name: str
    weights: Optional[str] = None
    layer: Optional[int] = None
    seed: Optional[int] = None
    options: dict[str, Any] = {}


class InputDigest(_Record):
    path: str
    size: Annotated[int, Field(ge=0)]
    sha256: Optional[Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]] = None  # absent above 256 MiB


class StepRecord(_Record):
    command: str
    settings: dict[str, Any]
    versions: dict[str, str]
    inputs: dict[str, InputDigest] = {}
    finished: Timestamp
    seconds: Optional[Annotated[float, Field(ge=0)]] = None
    key: Optional[str] = None


class StudyRecord(_Record):
    file: str
    keys: dict[str, str]


class SweepSae(_Record):
    dir: str                      # the SAE folder, relative to the run (sae or saes/NAME)
    store: Optional[str] = None   # the store it was trained and evaluated on
    settings: dict[str, Any] = {}  # the swept values (k, expansion, l1_coeff, layer)


class SweepRecord(_Record):
    primary: str
    saes: dict[str, SweepSae]


class RunJson(_Record):
    """run.json as `Run` writes it (docs/run-layout.md). Every top-level key is one a writer of this module makes
    (`inferred` is kept when a command records a step into a folder that was opened by its layout)."""
    format: Literal["cytosae-run"] = RUN_FORMAT
    format_version: Literal[1] = RUN_FORMAT_VERSION
    created: Optional[Timestamp] = None
    updated: Optional[Timestamp] = None
    cytosae_version: Optional[str] = None
    datasets: Annotated[dict[str, DatasetEntry], AfterValidator(_plain_names)] = {}
    sae: Optional[InsideRun] = SAE_DIR
    backbone: Optional[BackboneSpec] = None
    steps: dict[str, StepRecord] = {}
    study: Optional[StudyRecord] = None
    inferred: Optional[bool] = None
    sweep: Optional[SweepRecord] = None  # only in runs whose study swept SAE settings (`Run.set_sweep`)


def check_name(name: str, what: str = "dataset name") -> str:
    """Dataset names become folder names and URL parts: letters, digits, '_', '.', '-'."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{what} {name!r} must start with a letter or digit and use only letters, digits, "
                         f"'_', '.' and '-' (at most 100 characters)")
    return name


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    """Versions that decide a result's bytes, recorded with every step."""
    from importlib import metadata

    from cytosae import __version__

    out = {"cytosae": __version__, "python": platform.python_version()}
    for pkg in ("torch", "timm", "numpy", "safetensors", "scikit-learn", "torchstain"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def file_digest(path: str | Path) -> dict[str, Any]:
    """sha256 and size of an input file (size only above 256 MiB: a digest there costs more than it says)."""
    p = Path(path)
    size = p.stat().st_size
    if size > _CHEAP_DIGEST_BYTES:
        return {"size": size}
    h = hashlib.sha256()
    with p.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def _json_safe(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


class Run:
    """A run directory. Open with `Run.open(path)` (existing) or `Run.open(path, create=True)`."""

    def __init__(self, path: str | Path, meta: dict, sae: str | None = None) -> None:
        self.path = Path(path).absolute()
        self.meta = meta  # inferred from the layout (not written) until a command records a step
        self.sae_name = sae  # a sweep SAE this Run shows instead of the run's own (`for_sae`); None: the run's SAE

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | Path, create: bool = False) -> "Run":
        path = Path(path)
        file = path / RUN_JSON
        if file.is_file():
            return cls(path, _read_run_json(file))
        if path.is_dir():
            inferred = _infer_meta(path)
            if inferred is not None:
                return cls(path, inferred)
        if create:
            path.mkdir(parents=True, exist_ok=True)
            return cls(path, _new_meta())
        raise NotARun(f"{path} is not a cytosae run: it has no run.json and no sae/ + stores/NAME/ folders; "
                      f"make one with `cytosae run study.toml` or commands given `--run {path}`")

    def for_sae(self, name: str | None) -> "Run":
        """The run as SAE `name` of its sweep sees it: its sae_dir, analysis folders (stats/, patients/, classify/,
        concepts/, quality/), annotations and, for another layer of a layer sweep, stores are that SAE's (under
        saes/NAME, layers/LAYER). None or the primary's name: this run. Another name: a one-line ValueError that
        lists the sweep's SAEs."""
        self.named_sae_dir(name)
        if name is None or name == self.sweep.get("primary"):
            return self
        return Run(self.path, self.meta, sae=name)

    # ------------------------------------------------------------------ layout
    @property
    def sae_dir(self) -> Path:
        if self.sae_name is not None:
            return self.named_sae_dir(self.sae_name)
        return self.path / (self.meta.get("sae") or SAE_DIR)

    @property
    def _analyses_root(self) -> Path:
        """Where the analyses of the SAE this Run shows live: the run itself, or a sweep SAE's own folder."""
        return self.path if self.sae_name is None else self.sae_dir

    @property
    def stats_dir(self) -> Path:
        return self._analyses_root / STATS

    @property
    def patients_dir(self) -> Path:
        return self._analyses_root / PATIENTS

    @property
    def classify_dir(self) -> Path:
        return self._analyses_root / CLASSIFY

    @property
    def concepts_dir(self) -> Path:
        return self._analyses_root / CONCEPTS

    @property
    def quality_dir(self) -> Path:
        return self._analyses_root / QUALITY

    def analysis_dir(self, part: str) -> Path:
        """The folder of analysis `part` (stats, patients, classify, concepts, quality) of the SAE this Run shows."""
        dirs = {STATS: self.stats_dir, PATIENTS: self.patients_dir, CLASSIFY: self.classify_dir,
                CONCEPTS: self.concepts_dir, QUALITY: self.quality_dir}
        if part not in dirs:
            raise KeyError(f"{part!r} is not an analysis folder of a run (they are {sorted(dirs)})")
        return dirs[part]

    @property
    def sae_layer(self) -> int | None:
        """The block a sweep SAE was trained at when it is not the run's (a layer sweep); None otherwise."""
        if self.sae_name is None:
            return None
        layer = ((self.sweep["saes"][self.sae_name].get("settings")) or {}).get("layer")
        own = (self.meta.get("backbone") or {}).get("layer")
        return layer if isinstance(layer, int) and layer != own else None

    def sweep_sae_dir(self, name: str) -> Path:
        """Where sweep SAE `name` (not the primary one) lives: saes/NAME, with its eval.json and quality/."""
        return self.path / SAES / check_name(name, "SAE name")

    def layer_store_dir(self, dataset: str, layer: int) -> Path:
        """The store of `dataset` at block `layer` for a layer sweep's SAEs (not a dataset of the run: its
        analyses stay on the store at the run's own layer)."""
        return self.path / LAYERS / f"L{int(layer)}" / check_name(dataset)

    @property
    def sweep(self) -> dict:
        """The run's sweep as run.json records it ({} for a run without one)."""
        return dict(self.meta.get(SWEEP) or {})

    def named_sae_dir(self, name: str | None = None) -> Path:
        """The folder of SAE `name` of the sweep (None or the primary's name: the run's SAE at sae/)."""
        saes = self.sweep.get("saes") or {}
        if name is None or name == self.sweep.get("primary"):
            return self.sae_dir
        if name not in saes:
            raise ValueError(f"{self.path}: no SAE named {name!r} in this run (its sweep has "
                             f"{sorted(saes) or 'none'}); omit --sae for the run's SAE")
        return self.resolve(saes[name]["dir"])

    def sae_quality_dir(self, name: str | None = None) -> Path:
        """Where `cytosae align` of SAE `name` writes: quality/ for the run's SAE, saes/NAME/quality/ for another."""
        return self.quality_dir if name is None else self.sweep_sae_dir(name) / QUALITY

    @property
    def annotations(self) -> Path:
        """The names given to the latents of the SAE this Run shows (a sweep SAE's latents are other latents)."""
        return self._analyses_root / ANNOTATIONS

    def external_patients_dir(self, dataset: str) -> Path:
        """Barcodes of a second cohort, used as the external test set of `classify`."""
        return self._analyses_root / EXTERNAL / check_name(dataset)

    @property
    def datasets(self) -> dict[str, dict]:
        return dict(self.meta.get("datasets") or {})

    def store_dir(self, dataset: str) -> Path:
        if self.sae_layer is not None:  # a layer sweep's SAE reads the tokens of its own block
            return self.layer_store_dir(dataset, self.sae_layer)
        entry = self.datasets.get(dataset)
        if entry is None:
            return self.path / STORES / check_name(dataset)
        return self.path / entry.get("store", f"{STORES}/{dataset}")

    def sae_stores(self) -> list[Path]:
        """The stores the SAE this Run shows can be analysed on: every dataset's; for another layer of a layer
        sweep, those extracted at its layer (only the dataset it was trained on)."""
        stores = [self.store_dir(n) for n in self.datasets]
        return stores if self.sae_layer is None else [p for p in stores if p.is_dir()]

    def dataset(self, name: str | None) -> str:
        """`name`, checked; or the run's only dataset when `name` is None."""
        names = list(self.datasets)
        if name is not None:
            if name not in names:
                raise ValueError(f"{self.path}: no dataset {name!r} in this run (it has {names or 'none'}); "
                                 f"extract it with `cytosae extract DATA --run {self.path} --name {name}`")
            return name
        if len(names) == 1:
            return names[0]
        if not names:
            raise ValueError(f"{self.path} has no dataset yet: run `cytosae extract DATA --run {self.path}` first")
        raise ValueError(f"{self.path} has datasets {names}: say which with --dataset")

    def has_sae(self) -> bool:
        return (self.sae_dir / "config.json").is_file()

    def has_store(self, dataset: str) -> bool:
        return (self.store_dir(dataset) / "manifest.json").is_file()

    # ------------------------------------------------------------------ writing run.json
    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict]:
        """Read-modify-write of run.json under a lock: two commands writing into one run lose nothing."""
        from cytosae.store.format import atomic_write_json

        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".run.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                file = self.path / RUN_JSON
                meta = _read_run_json(file) if file.is_file() else {**_new_meta(), **self.meta}
                yield meta
                meta["updated"] = now()
                atomic_write_json(file, meta)
                self.meta = meta
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def add_dataset(self, name: str, data: str | Path | None = None, data_root: str | Path | None = None) -> None:
        """Register dataset `name` (store under stores/NAME) with the data it came from."""
        check_name(name)
        with self._locked() as meta:
            entry = dict(meta.setdefault("datasets", {}).get(name) or {})
            entry["store"] = f"{STORES}/{name}"
            if data is not None:
                entry["data"] = str(data)
            if data_root is not None:
                entry["data_root"] = self.portable(Path(data_root))
            meta["datasets"][name] = entry

    def set_backbone(self, spec: dict) -> None:
        with self._locked() as meta:
            meta["backbone"] = _json_safe(spec)

    def record_step(self, step: str, command: str, settings: dict, inputs: dict[str, str | Path] | None = None,
                    seconds: float | None = None, key: str | None = None) -> dict:
        """Say in run.json that `step` was done now, by `command` with `settings` (all JSON-safe)."""
        record = {"command": command, "settings": _json_safe(settings), "versions": versions(),
                  "inputs": {name: {"path": self.portable(Path(p)), **file_digest(p)}
                             for name, p in (inputs or {}).items() if p is not None and Path(p).is_file()},
                  "finished": now()}
        if seconds is not None:
            record["seconds"] = round(float(seconds), 3)
        if key is not None:
            record["key"] = key
        with self._locked() as meta:
            meta.setdefault("steps", {})[step] = record
        return record

    def set_study_keys(self, study_file: str, keys: dict[str, str]) -> None:
        """The study that drives this run, and the settings key of each of its steps (cytosae.study)."""
        with self._locked() as meta:
            meta["study"] = {"file": study_file, "keys": dict(keys)}

    def set_sweep(self, primary: str, saes: dict[str, dict]) -> None:
        """Record the sweep's SAEs: name -> {"dir" (relative to the run), "settings" (the swept values)}."""
        with self._locked() as meta:
            meta[SWEEP] = {"primary": check_name(primary, "SAE name"), "saes": _json_safe(saes)}

    def forget_steps(self, steps: Iterable[str]) -> None:
        with self._locked() as meta:
            for s in steps:
                meta.get("steps", {}).pop(s, None)

    def training_settings(self) -> dict:
        """The settings the SAE this Run shows was trained with (its `train` or `train:NAME` step; {} if none)."""
        step = "train" if self.sae_name is None else f"train:{self.sae_name}"
        return dict((self.steps.get(step) or {}).get("settings") or {})

    @property
    def steps(self) -> dict[str, dict]:
        return dict(self.meta.get("steps") or {})

    def portable(self, p: Path) -> str:
        """A path inside the run as relative to it (the run can move); others absolute."""
        p = p.absolute()
        try:
            return p.relative_to(self.path).as_posix()
        except ValueError:
            return str(p)

    def resolve(self, recorded: str | None) -> Path | None:
        """A path as written by `portable`, back to an absolute path."""
        if not recorded:
            return None
        p = Path(recorded)
        return p if p.is_absolute() else self.path / p

    # ------------------------------------------------------------------ images
    def data_roots(self, dataset: str, extra: Iterable[str | Path] = ()) -> list[Path]:
        """Folders that may hold the dataset's images, most specific first: those given now (`--data-root`,
        as PATH or NAME=PATH), the run's mapping, the data folder inside the run, the store's recorded root."""
        roots: list[Path] = []
        for r in extra:
            name, sep, folder = str(r).partition("=")
            if sep and name == dataset:
                roots.append(Path(folder))
            elif not sep:
                roots.append(Path(r))
        entry = self.datasets.get(dataset, {})
        for recorded in (entry.get("data_root"),):
            p = self.resolve(recorded)
            if p is not None:
                roots.append(p)
        data = entry.get("data")
        if data:
            p = Path(data)
            for cand in ([p] if p.is_absolute() else [self.path / p, Path.cwd() / p]):
                roots.append(cand if cand.suffix.lower() != ".csv" else cand.parent)
        store_root = _store_data_root(self.store_dir(dataset))
        if store_root:
            roots.append(Path(store_root))
        seen, out = set(), []
        for r in roots:
            key = str(r.absolute())
            if key not in seen:
                seen.add(key)
                out.append(r.absolute())
        return out

    def image_path(self, dataset: str, image_id: str, recorded: str | None = None,
                   extra_roots: Iterable[str | Path] = ()) -> Path | None:
        """Where image `image_id` of `dataset` is now, or None when no root holds it."""
        from cytosae.store.reader import find_image

        return find_image(image_id, recorded, self.data_roots(dataset, extra_roots))

    def summary(self) -> dict:
        """What the run holds, for `cytosae run` and the explorer (no absolute paths)."""
        from cytosae.analysis import patients, stats  # the writers name their files
        from cytosae.analysis.classify_results import RESULTS

        return {"datasets": {n: {"store": self.has_store(n)} for n in self.datasets}, "sae": self.has_sae(),
                "stats": (self.stats_dir / stats.SUMMARY).is_file(),
                "patients": (self.patients_dir / patients.SUMMARY).is_file(),
                "classify": (self.classify_dir / RESULTS).is_file(),
                "steps": sorted(self.steps)}


def _new_meta() -> dict:
    from cytosae import __version__

    return {"format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION, "datasets": {}, "sae": SAE_DIR,
            "created": now(), "cytosae_version": __version__, "steps": {}}


def _read_run_json(file: Path) -> dict:
    """run.json checked against RunJson (an InvalidRunJson naming the field otherwise), as the plain dict it holds."""
    from pydantic import ValidationError

    from cytosae.store.format import read_json_object, validation_problem

    try:
        meta = read_json_object(file, RUN_JSON_FIX)
    except InvalidFile as exc:
        raise InvalidRunJson(exc.file, exc.field, exc.problem, exc.fix) from None
    version = meta.get("format_version", RUN_FORMAT_VERSION)
    if type(version) is int and version > RUN_FORMAT_VERSION:
        raise InvalidRunJson(file, "format_version", f"{version} is newer than this cytosae understands "
                             f"({RUN_FORMAT_VERSION})", "upgrade cytosae")
    try:
        RunJson.model_validate(meta)
    except ValidationError as exc:
        raise InvalidRunJson(file, *validation_problem(exc), RUN_JSON_FIX) from None
    return meta


def _infer_meta(path: Path) -> dict | None:
    """The run.json a folder laid out as a run would have (the README's commands with --out into it)."""
    stores = sorted(p.parent.name for p in (path / STORES).glob("*/manifest.json")) if (path / STORES).is_dir() else []
    stores = [s for s in stores if _NAME.match(s)]
    if not stores or not (path / SAE_DIR / "config.json").is_file():
        return None
    meta = _new_meta()
    meta["datasets"] = {s: {"store": f"{STORES}/{s}"} for s in stores}
    meta["inferred"] = True
    return meta


def _store_data_root(store_dir: Path) -> str | None:
    p = store_dir / "manifest.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text()).get("data_root")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
