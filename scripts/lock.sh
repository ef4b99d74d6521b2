#!/usr/bin/env bash
# `make lock`: writes requirements-lock.txt, every package of the project venv (transitive included) at an exact
# version with its sha256 hashes. pip-compile (pip-tools) runs in its own throwaway venv and resolves through this
# machine's pip configuration (indexes, find-links, global constraints), which uv would not read. The lock names no
# index: each machine's own pip configuration says where packages come from, the hashes say what they must be.
# Versions already in the lock are kept; `make lock UPGRADE=1` moves every package to the newest allowed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PIP_TOOLS=pip-tools==7.6.2
LOCK=requirements-lock.txt
DINOV2=dinov2==0.0.1.dev2   # Meta's reference code, test-only: pins torch 2.0 and CUDA-only packages, so no deps
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m venv "$tmp/tools"
"$tmp/tools/bin/pip" install --quiet "$PIP_TOOLS"
upgrade=()
[ "${UPGRADE:-0}" = 1 ] && upgrade=(--upgrade)
# pip-compile keeps the pins of the file it writes; it is given the lock without the dinov2 section.
[ -f "$LOCK" ] && sed '/^# ---- installed with --no-deps/,$d' "$LOCK" > "$tmp/lock.txt"
CUSTOM_COMPILE_COMMAND="make lock" "$tmp/tools/bin/pip-compile" --quiet --strip-extras --allow-unsafe \
  --generate-hashes --no-emit-index-url --no-emit-find-links --extra dev --output-file "$tmp/lock.txt" "${upgrade[@]}" pyproject.toml scripts/lock.in
"$tmp/tools/bin/pip" download --quiet --no-deps --dest "$tmp/dl" "$DINOV2"
{
  cat <<'HEAD'
# The exact versions, with hashes, that `make` and CI install (pip install --require-hashes --no-deps). Do not edit:
# `make lock` writes it (scripts/lock.sh). pyproject.toml keeps the compatible ranges for users' own environments.
HEAD
  cat "$tmp/lock.txt"
  echo "# ---- installed with --no-deps like every line above; its own requirements (torch 2.0, CUDA) are not wanted"
  echo "# ---- dinov2: Meta's DINOv2 reference code, used only by tests (tests/test_backbones.py)"
  printf '%s' "$DINOV2"
  for f in "$tmp"/dl/*; do printf ' \\\n    --hash=sha256:%s' "$(sha256sum "$f" | cut -d' ' -f1)"; done
  echo
} > "$tmp/out.txt"
mv "$tmp/out.txt" "$LOCK"
echo "$LOCK: $(grep -c '^[A-Za-z0-9]' "$LOCK") packages"
