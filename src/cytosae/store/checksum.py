"""The self-checksum of a JSON file: what a store's manifest.json (manifest_sha256) and an SAE's config.json
(config_sha256) record to detect edits to themselves. Its own module, importing nothing of the package, so
that the schemas and the writers can both use it without importing each other."""
from __future__ import annotations

import hashlib
import json


def canonical_json(obj: dict, without: str) -> bytes:
    """The bytes a self-checksum is taken over: `obj` less its `without` key, keys sorted, no spaces, ASCII.
    Never change this form: every sealed manifest.json and config.json would then read as edited."""
    return json.dumps({k: v for k, v in obj.items() if k != without}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode()


def self_checksum(obj: dict, key: str) -> str:
    """sha256 of `obj`'s canonical JSON without `key`: what a file records under `key` to detect edits to itself
    (a store's manifest_sha256, an SAE config's config_sha256)."""
    return hashlib.sha256(canonical_json(obj, key)).hexdigest()
