#!/usr/bin/env bash
# The model-dependent GPU runs, in back-to-back calls on one warm machine
# (the 98 MB GGUF travels in two halves; /tmp survives between calls only
# while the machine stays warm, 30 s):
#   a  carry [.carry/a]: first GGUF half + ../shared/data/mc + wiki.test.raw; build; kernel benchmark
#   b  carry [.carry/b, .whl]: second half + 3 corpus files (calibration); convert d_kv=32/16,
#      evaluate original and d_kv=32 on the full sets
#   e  carry [.whl]: generate() benchmark (scripts/e2e_bench.py)
#   c  carry [.carry/c, .whl]: corpus tokens (scripts/pretokenize.py); fine-tune d_kv=32/16 with and
#      without distillation (FT_STEPS steps each), WikiText-2 of each, training throughput
# Ignored paths to carry: .carry/a (gg_00 + data/), .carry/b (gg_01 + data/corpus), .carry/c
# (corpus24m.npy), .whl (the gguf wheel: the GPU machine has no gguf package).
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
    /usr/bin/time -f "evaluate: %e s" timeout 420 python3 python/evaluate.py original /tmp/ck/dkv32 --source $G \
      --batch-size 64 --out "$OUT" --quiet 2>&1 | tail -20 ;;
  e)
    pip install --no-index --no-deps --target /tmp/site .whl/*.whl -q 2>&1 | tail -1
    timeout 500 python3 scripts/e2e_bench.py "$OUT" $G /tmp/ck/dkv32 /tmp/ck/dkv16 2>&1 | grep -v Warning | tail -30 ;;
  c)
    pip install --no-index --no-deps --target /tmp/site .whl/*.whl -q 2>&1 | tail -1
    steps=${FT_STEPS:-600}  # 600 x 16 x 1024 = 9.8M tokens
    for d in 32 16; do
      for kd in 0 1; do
        name=dkv${d}_kd$kd
        extra=$([ $kd = 1 ] && echo "--distill-weight 1.0 --teacher $G")
        timeout 280 python3 python/finetune.py /tmp/ck/dkv$d --output /tmp/ft/$name --data .carry/c/corpus24m.npy \
          --max-steps $steps --batch-size 16 --seq-len 1024 --eval-every 200 --save-every 100000 --quiet $extra \
          > /tmp/ft_$name.log 2>&1 || tail -3 /tmp/ft_$name.log
        tail -1 /tmp/ft/$name/log.jsonl
      done
    done
    python3 python/evaluate.py /tmp/ck/dkv32 /tmp/ck/dkv16 /tmp/ft/*/last --tasks wikitext --out "$OUT" --quiet 2>&1 | tail -8
    python3 scripts/train_throughput.py "$OUT/train_throughput.json" $G /tmp/ck/dkv32 2>&1 | tail -12 ;;
esac
