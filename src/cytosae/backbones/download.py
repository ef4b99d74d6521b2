"""Weights by name for online users: download once into a cache, verify, rename atomically."""
from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

# DinoBloom's authors publish the weights on Zenodo (record 10908163). sha256 None = not pinned here:
# the digest of the downloaded file is computed and recorded in every store made with it.
OFFICIAL_BASE_URL = "https://zenodo.org/records/10908163/files"
WEIGHT_FILES = {
    "dinobloom-s": ("DinoBloom-S.pth", None),
    "dinobloom-b": ("DinoBloom-B.pth", None),
    "dinobloom-l": ("DinoBloom-L.pth", None),
    "dinobloom-g": ("DinoBloom-G.pth", None),
}


def cache_dir() -> Path:
    return Path(os.environ.get("CYTOSAE_CACHE", Path.home() / ".cache" / "cytosae"))


def download_weights(name: str, cache: str | Path | None = None, base_url: str | None = None,
                     timeout: float = 60.0) -> Path:
    """Path of `name`'s weights in the cache, downloading them first if needed."""
    if name not in WEIGHT_FILES:
        raise ValueError(f"no published weights known for {name!r}; known: {sorted(WEIGHT_FILES)}")
    filename, expected = WEIGHT_FILES[name]
    target = Path(cache or cache_dir()) / filename
    if target.is_file():
        return target
    base = base_url or os.environ.get("CYTOSAE_WEIGHTS_BASE_URL", OFFICIAL_BASE_URL)
    url = f"{base.rstrip('/')}/{filename}"
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{filename}.", suffix=".part", dir=target.parent)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as fh, urllib.request.urlopen(url, timeout=timeout) as resp:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                digest.update(chunk)
                fh.write(chunk)
        if expected and digest.hexdigest() != expected:
            raise ValueError(f"{url}: sha256 {digest.hexdigest()} does not match the published {expected}; "
                             "the download is corrupt or the file changed. Nothing was cached.")
        os.replace(tmp, target)
        return target
    except (urllib.error.URLError, OSError) as exc:
        raise ConnectionError(
            f"could not download {url} ({exc}). Offline? Download {filename} from {OFFICIAL_BASE_URL} "
            f"yourself and place it at {target}, or pass weights=PATH."
        ) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
