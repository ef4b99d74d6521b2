"""SAE architectures as registered classes, and config.json read through typed schemas (issues #17, #20 item 2).

Every checkpoint here is written by the project's writers (SAE.save, train_sae's checkpoints), then config.json is
edited the way a user might; each edit must be refused with one line naming the file and the field.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

from cytosae.sae import SAE, SAEConfig, train_sae
from cytosae.sae.archs import ARCHS, arch_class, arch_options
from cytosae.sae.model import UnfinishedSAE, check_finished, training_progress

D, N = 8, 32


@pytest.fixture(scope="module")
def unfinished(tmp_path_factory) -> Path:
    """A topk SAE saved by train_sae at an intermediate checkpoint: config.json holds a `training` block."""
    d = tmp_path_factory.mktemp("unfinished") / "sae"
    torch.manual_seed(0)
    data = [torch.randn(100, D) for _ in range(8)]
    train_sae(data, D, "topk", N, total_tokens=800, batch_size=50, k=4, progress=False, checkpoint_dir=d,
              checkpoint_every=100, max_tokens_this_run=200)
    assert training_progress(d)["finished"] is False
    return d


def _saved(tmp_path: Path, arch: str = "topk", **kw) -> Path:
    d = tmp_path / arch
    SAE(SAEConfig(arch=arch, d_in=D, n_latents=N, k=4, **kw)).save(d)
    return d


def _copy(src: Path, tmp_path: Path) -> Path:
    d = tmp_path / "copy"
    shutil.copytree(src, d)
    return d


def _edit(d: Path, change) -> Path:
    cfg = json.loads((d / "config.json").read_text())
    change(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _as_format_1(cfg: dict) -> None:
    """config.json as cytosae wrote it before config_sha256 (format_version 1)."""
    del cfg["config_sha256"]
    cfg["format_version"] = 1


def _refused(d: Path, *needles: str) -> str:
    with pytest.raises(ValueError) as exc:
        SAE.load(d)
    msg = str(exc.value)
    assert "\n" not in msg and (str(d / "config.json") in msg or str(d / "sae.safetensors") in msg), msg
    for n in needles:
        assert n in msg, msg
    return msg


# ---------------------------------------------------------------- one class per architecture


@pytest.mark.parametrize("arch", ["relu-l1", "topk", "batchtopk", "jumprelu", "matryoshka"])
def test_each_arch_is_its_own_registered_class(arch, tmp_path):
    cls = arch_class(arch)
    assert cls is not SAE and issubclass(cls, SAE) and cls.arch == arch
    s = SAE(SAEConfig(arch=arch, d_in=D, n_latents=N, k=4))
    assert type(s) is cls
    s.save(tmp_path)
    assert type(SAE.load(tmp_path)) is cls and type(cls.load(tmp_path)) is cls
    other = next(a for a in ARCHS if a != arch)
    with pytest.raises(ValueError, match=f"holds a '{arch}' SAE"):
        arch_class(other).load(tmp_path)
    with pytest.raises(ValueError, match=f"is the '{arch}' SAE"):
        cls(SAEConfig(arch=other, d_in=D, n_latents=N, k=4))


def test_options_are_typed_per_architecture():
    assert arch_options("topk")["k"] == 32 and "l1_coeff" not in arch_options("topk")
    assert arch_options("relu-l1")["l1_coeff"] == 8e-5 and "k" not in arch_options("relu-l1")
    assert arch_options("relu-l1")["normalize_inputs"] is False and arch_options("topk")["normalize_inputs"] is True
    assert "matryoshka_prefixes" in arch_options("matryoshka") and "threshold_momentum" in arch_options("batchtopk")
    assert SAEConfig(arch="jumprelu", d_in=D, n_latents=N).lr == 7e-5  # the arch's own default
    assert SAEConfig(arch="matryoshka", d_in=D, n_latents=64, k=4).matryoshka_prefixes == [1, 4, 16, 64]
    with pytest.raises(ValueError, match="k must be in 1..n_latents=32, got 33"):
        SAEConfig(arch="topk", d_in=D, n_latents=N, k=33)
    with pytest.raises(ValueError, match="k must be a valid integer, got '16'"):
        SAEConfig(arch="topk", d_in=D, n_latents=N, k="16")
    with pytest.raises(ValueError, match="matryoshka_prefixes is an option of matryoshka SAEs"):
        SAEConfig(arch="topk", d_in=D, n_latents=N, k=4, matryoshka_prefixes=[4, 32])


def test_train_settings_take_the_registry_options():
    from cytosae.steps.config import ARCHS as SETTINGS_ARCHS, TrainSettings

    assert SETTINGS_ARCHS == ARCHS

    assert TrainSettings(arch="topk", k=8).arch_options() == {"k": 8}
    assert TrainSettings(arch="matryoshka", k=8).arch_options() == {"k": 8}
    assert TrainSettings(arch="relu-l1", l1_coeff=1e-3).arch_options() == {"l1_coeff": 1e-3}
    assert TrainSettings(arch="jumprelu", k=8, l1_coeff=1e-3).arch_options() == {}


# ---------------------------------------------------------------- edited config.json


def test_arch_changed_is_refused(tmp_path, unfinished):
    # topk -> relu-l1: the same five tensors, so only the file's own checksum tells
    d = _edit(_copy(unfinished, tmp_path), lambda c: c.update(arch="relu-l1"))
    _refused(d, "differs from the config_sha256", "edited")
    # an old file has no checksum: an arch whose tensors differ is still refused, from the weights' header
    d2 = _edit(_saved(tmp_path, "batchtopk"), lambda c: (_as_format_1(c), c.update(arch="jumprelu")))
    _refused(d2, "tensor threshold has shape () but", "implies (32,)")
    d3 = _edit(_saved(tmp_path, "topk"), lambda c: (_as_format_1(c), c.update(arch="batchtopk")))
    _refused(d3, "tensors", "do not match")


def test_removed_checksums_are_refused(tmp_path, unfinished):
    d = _edit(_copy(unfinished, tmp_path), lambda c: c.pop("checksums"))
    _refused(d, "field 'checksums' is missing", "format_version 2")
    d2 = _edit(_saved(tmp_path), lambda c: c.pop("config_sha256"))
    _refused(d2, "field 'config_sha256' is missing")


def test_removed_training_block_is_not_taken_for_finished(tmp_path, unfinished):
    d = _edit(_copy(unfinished, tmp_path), lambda c: c.pop("training"))
    _refused(d, "differs from the config_sha256")
    with pytest.raises(ValueError, match="differs from the config_sha256"):
        check_finished(d)
    with pytest.raises(UnfinishedSAE, match="step 4 of 16"):
        check_finished(unfinished)


@pytest.mark.parametrize("change, needle", [
    (lambda c: c["training"].update(finished="false"), "field 'training.finished' must be a valid boolean, got 'false'"),
    (lambda c: c["training"].update(step=c["training"]["total_steps"] + 1), "field 'training.step' 17 is more than"),
    (lambda c: c["training"].update(step=-1), "field 'training.step' must be greater than or equal to 0, got -1"),
    (lambda c: c["training"].update(tokens_seen=-5), "field 'training.tokens_seen' must be greater than or equal"),
    (lambda c: c.update(normalize_inputs="no"), "field 'normalize_inputs' must be a valid boolean, got 'no'"),
    (lambda c: c.update(matryoshka_prefixes=[5000, -1]), "field 'matryoshka_prefixes[1]' must be greater than"),
    (lambda c: c.update(matryoshka_prefixes=[8, 32]), "field 'matryoshka_prefixes' is an option of matryoshka"),
    (lambda c: c.update(k="16"), "field 'k' must be a valid integer, got '16'"),
    (lambda c: c.update(k=33), "field 'k' must be in 1..n_latents=32, got 33"),
    (lambda c: c.update(format_version="2"), "expected format_version 2, got '2'"),
], ids=["finished-string", "step-past-total", "negative-step", "negative-tokens", "normalize-no",
        "negative-prefix", "prefixes-on-topk", "k-string", "k-too-big", "version-string"])
def test_a_bad_field_is_one_line_naming_it(change, needle, tmp_path, unfinished):
    # the same on a current file and on an old one (format 1, no own checksum): the schema, not the seal, speaks
    for fmt1 in (False, True):
        d = _copy(unfinished, tmp_path / str(fmt1))
        if fmt1:
            _edit(d, _as_format_1)
        msg = _refused(_edit(d, change), needle)
        assert "not supported" not in msg


# ---------------------------------------------------------------- what still loads


def test_old_checkpoints_still_load_with_identical_weights(tmp_path, unfinished):
    d = _edit(_copy(unfinished, tmp_path), _as_format_1)
    old, new = SAE.load(d), SAE.load(unfinished)
    assert old.training_progress == new.training_progress and old.training_progress["step"] == 4
    for name, t in new.tensors().items():
        assert torch.equal(old.tensors()[name], t), name
    with pytest.raises(UnfinishedSAE):
        SAE.load(d, require_finished=True)
    # format 1 before checksums were recorded: loads, with a warning that damage cannot be detected
    _edit(d, lambda c: c.pop("checksums"))
    with pytest.warns(UserWarning, match="records no checksums"):
        SAE.load(d)
    # a current file keeps loading, and saving it again seals it again
    s = SAE.load(unfinished)
    s.save(tmp_path / "again", training=s.training_progress)
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["format_version"] == 2 and len(again["config_sha256"]) == 64
    assert SAE.load(tmp_path / "again").training_progress == s.training_progress
