#!/usr/bin/env bash
# The GPU check of issue 15 (benchmarks/gpu_check.py) on a CUDA machine without a package
# registry, Prefect, Dask or PyAV: only quant/, runtime/, store/ and testing/ are imported.
#
#   benchmarks/gpu_check.sh --prepare    # here (PyPI): wheels into benchmarks/wheels/ (~6 MB)
#   benchmarks/gpu_check.sh [--dry-run]  # there: carry benchmarks/wheels; JSON goes to
#                                        # benchmarks/results/gpu-check.json (or $OUT)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=benchmarks/wheels
# diffusers for the LTX-2 classes; click for benchmarks/runtime_bench.py; pytest for the tests
PREPARE=(diffusers==0.42.1 click pytest pluggy iniconfig)

if [[ "${1:-}" == "--prepare" ]]; then
    python -m pip download --no-deps --only-binary=:all: --dest "$WHEELS" "${PREPARE[@]}"
    du -sh "$WHEELS"
    exit 0
fi

# hlwq.* without an install: a folder whose hlwq/ links the repo's top-level folders.
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
mkdir "$SITE/hlwq"
ln -s "$PWD/hlwq/__init__.py" "$SITE/hlwq/__init__.py"
for layer in quant store runtime testing benchmarks; do
    ln -s "$PWD/$layer" "$SITE/hlwq/$layer"
done
WHEEL_PATH=$(find "$WHEELS" -name '*.whl' 2>/dev/null | tr '\n' ':')
export PYTHONPATH="$SITE:$WHEEL_PATH${PYTHONPATH:-}"
OUT_FILE="${OUT:+$OUT/gpu-check.json}"
exec timeout 570 python -m hlwq.benchmarks.gpu_check "$@" ${OUT_FILE:+--out "$OUT_FILE"}
