"""The self-checksum of manifest.json (manifest_sha256) and an SAE's config.json (config_sha256): one helper
(store/format.py) whose canonical form must never change, or every sealed store and SAE would read as edited.
The expected digests below were computed by the two separate implementations this helper replaced."""
import copy

from cytosae.sae.model import seal as seal_config
from cytosae.store.format import self_checksum
from cytosae.store.schema import seal as seal_manifest

MANIFEST = {"format": "cytosae-activation-store", "complete": True, "created": "2026-01-01T00:00:00+00:00",
            "settings": {"backbone": "dinobloom-s", "ü": "é", "pi": 3.14159, "n": [1, 2, None]},
            "n_tokens": 5, "d_model": 8, "shards": [], "manifest_sha256": "0" * 64}
CONFIG = {"format_version": 2, "arch": "topk", "d_in": 8, "n_latents": 16, "k": 4, "lr": 0.0004,
          "adam_betas": [0.9, 0.999], "name": "Zé",
          "checksums": {"sae.safetensors": {"size": 10, "sha256": "a" * 64}}, "config_sha256": "stale"}
MANIFEST_SEALED = "ea9f969db554bb56dcc3a2e7279d0c85d28ff1e819c3664f7af85ba87d21db7c"  # with format_version 2 set
MANIFEST_AS_IS = "226c7f0b85e1c4d37a20fc09184c89aa2bff02234f7888a3a86f6ae76309f0c2"
CONFIG_SEALED = "4e9dfba41203c2e16d91f4d2e819baf62afa8e6010e0aa428f992b957b8aad91"


def test_seals_keep_their_pinned_digests():
    m, c = copy.deepcopy(MANIFEST), copy.deepcopy(CONFIG)
    assert seal_manifest(m)["manifest_sha256"] == MANIFEST_SEALED
    assert seal_config(c)["config_sha256"] == CONFIG_SEALED
    assert m == MANIFEST and c == CONFIG  # sealing copies, never edits the caller's dict


def test_one_helper_gives_both_digests_and_ignores_only_its_own_key():
    assert self_checksum(MANIFEST, "manifest_sha256") == MANIFEST_AS_IS
    assert self_checksum(CONFIG, "config_sha256") == CONFIG_SEALED
    # the recorded value never enters the digest; every other key does
    assert self_checksum({**CONFIG, "config_sha256": "x"}, "config_sha256") == CONFIG_SEALED
    assert self_checksum({**CONFIG, "k": 5}, "config_sha256") != CONFIG_SEALED
    # key order is not content
    assert self_checksum(dict(reversed(list(CONFIG.items()))), "config_sha256") == CONFIG_SEALED
