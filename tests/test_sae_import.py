"""CytoSAE checkpoint import: the exact published layout, read without executing foreign code."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from cytosae.cli import app
from cytosae.sae import SAE, import_cytosae_checkpoint

MAKER = textwrap.dedent('''
    import sys, types, dataclasses, torch
    for name in ("src", "src.sae_training", "src.sae_training.config"):
        sys.modules[name] = types.ModuleType(name)
    @dataclasses.dataclass
    class ViTSAERunnerConfig:
        d_in: int = 16
        expansion_factor: int = 4
        l1_coefficient: float = 3e-4
        lr: float = 1e-3
        lr_warm_up_steps: int = 200
        dead_feature_window: int = 777
        use_ghost_grads: bool = True
        dtype: torch.dtype = torch.float32
        device: str = "cpu"
        hook_point: str = "blocks.10"
    ViTSAERunnerConfig.__module__ = "src.sae_training.config"
    sys.modules["src.sae_training.config"].ViTSAERunnerConfig = ViTSAERunnerConfig
    g = torch.Generator().manual_seed(0)
    sd = {"W_enc": torch.randn(16, 64, generator=g), "b_enc": torch.randn(64, generator=g),
          "W_dec": torch.randn(64, 16, generator=g), "b_dec": torch.randn(16, generator=g)}
    torch.save({KEY: ViTSAERunnerConfig(), "state_dict": sd}, sys.argv[1])
    torch.save(sd, sys.argv[1] + ".sd")
''')


def _make(tmp_path, key="cfg"):
    pt = tmp_path / "cytosae.pt"
    # a separate interpreter owns the fake module: this process never has it in sys.modules
    subprocess.run([sys.executable, "-c", MAKER.replace("KEY", repr(key)), str(pt)], check=True)
    return pt


@pytest.mark.parametrize("key", ["cfg", "config"])
def test_import_published_layout(tmp_path, key):
    pt = _make(tmp_path, key)
    assert "src.sae_training.config" not in sys.modules
    sae = import_cytosae_checkpoint(pt, tmp_path / "out")
    assert "src.sae_training.config" not in sys.modules and "src" not in sys.modules
    sd = torch.load(str(pt) + ".sd", weights_only=True)
    assert sae.cfg.arch == "relu-l1" and (sae.cfg.d_in, sae.cfg.n_latents) == (16, 64)
    assert sae.cfg.l1_coeff == 3e-4 and sae.cfg.lr == 1e-3 and sae.cfg.dead_feature_window == 777
    loaded = SAE.load(tmp_path / "out")
    for k in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(loaded, k).detach(), sd[k]), k
    x = torch.randn(10, 16)
    expected = torch.relu((x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"])  # CytoSAE's encoder
    assert torch.allclose(loaded.encode(x), expected, atol=1e-5)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_MARKER",))


def test_malicious_pickle_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "evil.pt"
    torch.save({"cfg": _Evil(), "state_dict": {}}, bad)
    with pytest.raises(ValueError, match="refused to load"):
        import_cytosae_checkpoint(bad, tmp_path / "out")
    assert not (tmp_path / "PWNED_MARKER").exists()
    assert not (tmp_path / "out").exists()


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        import_cytosae_checkpoint(tmp_path / "missing.pt", tmp_path / "o")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        import_cytosae_checkpoint(junk, tmp_path / "o")
    partial = tmp_path / "partial.pt"
    torch.save({"cfg": {"d_in": 16}, "state_dict": {"W_enc": torch.zeros(16, 8)}}, partial)
    with pytest.raises(ValueError, match=r"lacks \['b_enc', 'W_dec', 'b_dec'\]"):
        import_cytosae_checkpoint(partial, tmp_path / "o")


def test_cli_import(tmp_path):
    pt = _make(tmp_path)
    r = CliRunner().invoke(app, ["import-cytosae", str(pt), str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "64 latents on d=16" in r.output and (tmp_path / "o" / "sae.safetensors").is_file()
