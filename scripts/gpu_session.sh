#!/usr/bin/env bash
# The model-dependent GPU runs, in back-to-back calls on one warm machine
# (the 98 MB GGUF travels in two halves, see DEVELOPERS notes in README):
#   bash scripts/gpu_session.sh a   carry .carry/a: first half + eval data; build; kernel benchmark
#   bash scripts/gpu_session.sh b   carry .carry/b: second half + calibration text; convert d_kv=32/16,
#                                   evaluate original and d_kv=32 on the full sets, generate() benchmark
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT" /tmp/m /tmp/data /tmp/site
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MHA2MLA_DATA=/tmp/data PYTHONPATH="/tmp/site:$PWD/python:$PWD"
G=/tmp/m/smollm2.gguf
case ${1:-} in
  a)
    cp .carry/a/gg_00 /tmp/m/ && cp -r .carry/a/data/* /tmp/data/
    bash scripts/gpu_check.sh bench ;;
  b)
    cat /tmp/m/gg_00 .carry/b/gg_01 > $G && cp -r .carry/b/data/corpus /tmp/data/
    pip install --no-index --no-deps --target /tmp/site .whl/*.whl -q 2>&1 | tail -1
    ls /tmp/data
    for d in 32 16; do
      /usr/bin/time -f "convert d_kv=$d: %e s" python3 python/convert.py --model $G --output /tmp/ck/dkv$d \
        --d-kv $d --rope 2norm --r 4 --ppl-windows 0 --quiet > /tmp/convert_dkv$d.log 2>&1 || tail -5 /tmp/convert_dkv$d.log
    done
    /usr/bin/time -f "evaluate: %e s" python3 python/evaluate.py original /tmp/ck/dkv32 --source $G \
      --batch-size 64 --out "$OUT" --quiet 2>&1 | tail -20
    timeout 200 python3 scripts/e2e_bench.py "$OUT" $G /tmp/ck/dkv32 /tmp/ck/dkv16 2>&1 | tail -30 ;;
esac
