#!/usr/bin/env bash
# The GPU check of issue 15 (benchmarks/gpu_check.py), one command on a CUDA machine that has
# torch (CUDA), Triton, numba, transformers, accelerate, peft, safetensors and pyarrow, but no
# package registry and no diffusers, Prefect, Dask or PyAV. Only quant/, runtime/, store/ and
# the testing/ fixtures are imported; the wheels it needs and the machine lacks (diffusers,
# and pytest with its two dependencies for the Triton tests; click for the runtime benchmark's
# module) are in benchmarks/wheels/ (6.9 MB, pure Python), unpacked with no dependencies into
# a temporary folder put first on PYTHONPATH. The repository plus the wheels stay far under
# the 64 MiB a device run may take. It runs in under 10 minutes (timeout 570 s inside).
#
# With the device tool (the machine lent to a session; what is written under $OUT comes back):
#     run  command: bash benchmarks/gpu_check.sh     timeout_s: 600
# then copy the returned gpu-check.json to benchmarks/results/gpu-check.json and commit it.
#
#   bash benchmarks/gpu_check.sh [--out-dir DIR]  # CUDA: JSON to DIR, else $OUT, else
#                                                 # benchmarks/results/, as gpu-check.json
#   bash benchmarks/gpu_check.sh --dry-run        # CPU, tiny widths: the wiring only, with
#                                                 # prefect, dask, distributed and av made
#                                                 # unimportable, as on the GPU machine
#   bash benchmarks/gpu_check.sh --prepare        # (with PyPI) fetch the wheels again
#
# Targets (issue 15), recorded with the results as meets_targets: packed step latency at most
# 1.15x BF16, weights resident at most 0.35x BF16 (4 real-width blocks, 6,144 video tokens).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=benchmarks/wheels
PREPARE=(diffusers==0.42.1 click==8.5.1 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1)
HIDDEN=(prefect dask distributed av)    # what the GPU machine lacks (besides diffusers)

if [[ "${1:-}" == "--prepare" ]]; then
    python -m pip download --no-deps --only-binary=:all: --dest "$WHEELS" "${PREPARE[@]}"
    du -sh "$WHEELS"
    exit 0
fi

SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
# hlwq.* without an install: a package whose subfolders link the repo's top-level folders
mkdir "$SITE/hlwq"
ln -s "$PWD/hlwq/__init__.py" "$SITE/hlwq/__init__.py"
ln -s "$PWD/hlwq/lazy.py" "$SITE/hlwq/lazy.py"
for layer in quant store runtime testing benchmarks; do
    ln -s "$PWD/$layer" "$SITE/hlwq/$layer"
done
# the wheels, installed without dependencies: a wheel of pure Python is a zip to unpack
python - "$SITE" "$WHEELS"/*.whl <<'PY'
import sys, zipfile
for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])
PY
ARGS=()
OUT_DIR="${OUT:-benchmarks/results}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out-dir) OUT_DIR="$2"; shift 2 ;;
        --dry-run)
            # as on the GPU machine: these cannot be imported (an import raises ImportError)
            for name in "${HIDDEN[@]}"; do
                mkdir -p "$SITE/$name"
                echo "raise ImportError('$name is not on the GPU machine')" > "$SITE/$name/__init__.py"
            done
            ARGS+=("$1"); shift ;;
        *) ARGS+=("$1"); shift ;;
    esac
done
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export GPU_CHECK_SITE="$SITE"       # gpu_check.py records that diffusers came from here
mkdir -p "$OUT_DIR"
timeout 570 python -m hlwq.benchmarks.gpu_check "${ARGS[@]}" --out "$OUT_DIR/gpu-check.json"
