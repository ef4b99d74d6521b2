#!/usr/bin/env bash
# Every GPU check of cytosae in one command on a machine with one CUDA GPU whose python3 already has torch,
# timm, safetensors, pandas, pyarrow, scikit-learn, scipy, typer and tqdm (as the workplace's H200 image does).
#
#   bench/gpu_session.sh fetch          # here, with the package registry: wheels of what that image lacks -> .whl/,
#                                       # 256 real Acevedo cells -> .gpu-data/ (both git-ignored)
#   OUT=/some/folder bench/gpu_session.sh checks   # there: pytest -m gpu, SAE/extract/precision benches (~6 min)
#   OUT=/some/folder bench/gpu_session.sh study    # there: the MLL23-scale study, one slice of at most 8 min after drawing the cells
#                                                  # (the machine is bare at each call: the study must fit one)
# Figures land in $OUT as JSON (and logs); copy them to bench/results/ and into docs/gpu.md.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# What the image lacks, at the versions of requirements-lock.txt (the lock owns every version; none is repeated here)
LACKING="fastapi starlette pydantic pydantic-core annotated-types annotated-doc typing-inspection python-multipart
uvicorn h11 anyio torchstain"
WHEELS=$(for n in $LACKING; do grep -m1 -o "^$n==[^ ]*" requirements-lock.txt || echo "MISSING-FROM-LOCK:$n"; done)

setup() {
    export PYTHONPATH=src PYTHONUNBUFFERED=1
    if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            && export PYTHONPATH=src:/tmp/site || exit 1
    fi
    if [ -d .gpu-data ]; then export CYTOSAE_SHARED_DATA="$PWD/.gpu-data"; fi
    : "${OUT:?set OUT to the folder for results}"
    mkdir -p "$OUT"
}

case "${1:-}" in
fetch)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; printf '/.whl/\n/.gpu-data/\n/.gpu-study/\n' >> .git/info/exclude; }
    for w in $WHEELS; do
        $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$w" || exit 1
    done
    src=../shared/data/acevedo
    [ -f $src/manifest.csv ] || { echo "no $src: the extraction benches will say so on the GPU"; exit 0; }
    mkdir -p .gpu-data/acevedo
    head -1 $src/manifest.csv > .gpu-data/acevedo/manifest.csv
    tail -n +2 $src/manifest.csv | shuf -n 256 --random-source=<(yes) >> .gpu-data/acevedo/manifest.csv
    tail -n +2 .gpu-data/acevedo/manifest.csv | cut -d, -f1 | while read -r p; do
        mkdir -p ".gpu-data/acevedo/$(dirname "$p")" && cp "$src/$p" ".gpu-data/acevedo/$p"; done
    du -sh .whl .gpu-data
    ;;
checks)
    setup
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
    $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_devices.py tests/test_sae_trainer.py \
        tests/test_explorer_units.py tests/test_sae_sync.py 2>&1 | tee "$OUT/pytest-gpu.log" | tail -25
    $PY -m pytest -q -p no:cacheprovider tests/test_sae_sync.py tests/test_sae_model.py 2>&1 | tail -3 >> "$OUT/pytest-gpu.log"
    $PY bench/sae.py --device cuda --out "$OUT/sae-cuda.json" > "$OUT/sae.log" 2>&1
    $PY bench/extract.py --device cuda --n-images 256 --out "$OUT/extract-cuda.json" > "$OUT/extract.log" 2>&1
    $PY bench/extract.py --device cuda --n-images 256 --precision bf16 --out "$OUT/extract-cuda-bf16.json" >> "$OUT/extract.log" 2>&1
    $PY bench/precision.py --device cuda --out "$OUT/precision-cuda.json" > "$OUT/precision.log" 2>&1
    tail -3 "$OUT"/*.log
    ;;
study)
    setup
    $PY bench/study.py --work .gpu-study --device cuda --max-minutes 8 --out "$OUT/study-cuda.json" 2>&1 | tail -40
    ;;
*)
    sed -n 2,12p "$0"; exit 2 ;;
esac
