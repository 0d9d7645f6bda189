#!/usr/bin/env bash
# The model-dependent GPU runs, in back-to-back calls on one warm machine
# (the 98 MB GGUF travels in two halves; /tmp survives between calls only
# while the machine stays warm, 30 s):
#   a  carry [.carry/a]: first GGUF half + ../shared/data/mc + wiki.test.raw; build; GPU suite and sanitizers
#   b  carry [.carry/b, .whl]: second half + 3 corpus files (calibration); export the GGUF as a plain HF folder
#      (loads in 1 s, not 35), convert d_kv=32/16, evaluate original and d_kv=32 on the full sets
#   c32, c16  carry [.carry/c, .whl]: corpus tokens (scripts/pretokenize.py); fine-tune d_kv=32 (c32) or 16
#      (c16) with and without distillation; c32 adds training throughput, c16 the WikiText-2 evaluation of
#      every checkpoint and the fine-tuning report
#   f  (after c32/c16) the six tasks and WikiText-2 of every fine-tuned checkpoint
#   abl  carry [.carry/c, .whl]: recipe ablations at d_kv=32 (lr of the new projections, attention-only
#      training, a higher lr), same tokens as c32
#   e  carry [.whl]: generate() benchmark (scripts/e2e_bench.py)
# Ignored paths to carry: .carry/a (gg_00 + data/), .carry/b (gg_01 + data/corpus), .carry/c
# (corpus24m.npy), .whl (the gguf wheel: the GPU machine has no gguf package).
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT" /tmp/m /tmp/data /tmp/site
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MHA2MLA_DATA=/tmp/data PYTHONPATH="/tmp/site:$PWD/python:$PWD"
G=/tmp/m/smollm2.gguf
S=/tmp/SmolLM2-135M-Instruct  # the GGUF exported as a Hugging Face folder (step b)
FT_STEPS=${FT_STEPS:-720}  # 720 x 16 x 1024 = 11.8M tokens, the issue's reference budget (12M)
FT_MINUTES=${FT_MINUTES:-2.5}
case ${1:-} in
  a)
    cp .carry/a/gg_00 /tmp/m/ && cp -r .carry/a/data/* /tmp/data/
    bash scripts/gpu_check.sh throw tests sanitize ;;
  b)
    cat /tmp/m/gg_00 .carry/b/gg_01 > $G && cp -r .carry/b/data/corpus /tmp/data/
    pip install --no-index --no-deps --target /tmp/site .whl/*.whl -q 2>&1 | tail -1
    /usr/bin/time -f "export GGUF: %e s" python3 -m mha2mla.source $S --model $G 2>&1 | grep -v Warn | tail -2
    for d in 32 16; do
      /usr/bin/time -f "convert d_kv=$d: %e s" python3 python/convert.py --model $S --output /tmp/ck/dkv$d \
        --d-kv $d --rope 2norm --r 4 --ppl-windows 0 --quiet > /tmp/convert_dkv$d.log 2>&1 || tail -5 /tmp/convert_dkv$d.log
      tail -1 /tmp/convert_dkv$d.log
    done
    /usr/bin/time -f "evaluate: %e s" timeout 400 python3 python/evaluate.py original /tmp/ck/dkv32 --source $S \
      --batch-size 256 --out "$OUT" --resume --quiet 2>&1 | grep -v Warn | tail -22 ;;
  b2)  # the evaluation again, keeping what b finished (needs b's $OUT JSON carried back in .carry/eval)
    mkdir -p "$OUT" && cp .carry/eval/evaluation_*.json "$OUT"/ 2>/dev/null
    timeout 500 python3 python/evaluate.py original /tmp/ck/dkv32 --source $S --batch-size 256 --out "$OUT" \
      --resume --quiet 2>&1 | grep -v Warn | tail -22 ;;
  c32|c16)
    pip install --no-index --no-deps --target /tmp/site .whl/*.whl -q 2>&1 | tail -1
    d=${1#c}
    for kd in 0 1; do
      name=dkv${d}_kd$kd
      extra=$([ $kd = 1 ] && echo "--distill-weight 1.0 --teacher $S")
      timeout 280 python3 python/finetune.py /tmp/ck/dkv$d --output /tmp/ft/$name --data .carry/c/corpus24m.npy \
        --max-steps $FT_STEPS --max-minutes $FT_MINUTES --batch-size 16 --seq-len 1024 --eval-every 120 \
        --save-every 100000 --quiet $extra > /tmp/ft_$name.log 2>&1 || tail -3 /tmp/ft_$name.log
      tail -1 /tmp/ft/$name/log.jsonl
      cp /tmp/ft/$name/log.jsonl "$OUT/ft_$name.jsonl"
    done
    if [ $d = 32 ]; then
      python3 scripts/train_throughput.py "$OUT/train_throughput.json" $S /tmp/ck/dkv32 2>&1 | tail -14
      cp "$OUT/train_throughput.json" /tmp/
    else
      python3 python/evaluate.py original /tmp/ck/dkv32 /tmp/ck/dkv16 /tmp/ft/*/last --source $S --tasks wikitext \
        --batch-size 64 --out /tmp/ft_eval --quiet 2>&1 | grep -v Warn | tail -10
      python3 -m mha2mla.finetune_report /tmp/ft/dkv* --eval /tmp/ft_eval/evaluation_*.json --original $S \
        $([ -f /tmp/train_throughput.json ] && echo --throughput /tmp/train_throughput.json) --out "$OUT" 2>&1 | grep -v Warn | tail -20
      cp /tmp/ft_eval/evaluation_*.md "$OUT"/ft_wikitext.md
    fi ;;
  f)
    timeout 560 python3 python/evaluate.py /tmp/ft/*/last --batch-size 256 --out "$OUT" --resume --quiet 2>&1 \
      | grep -v Warn | tail -12 ;;
  abl)
    for spec in "newx3:--new-proj-lr-mult 3" "attn:--train attention" "lr3e-4:--lr 3e-4"; do
      name=dkv32_${spec%%:*}
      timeout 170 python3 python/finetune.py /tmp/ck/dkv32 --output /tmp/ft/$name --data .carry/c/corpus24m.npy \
        --max-steps $FT_STEPS --max-minutes $FT_MINUTES --batch-size 16 --seq-len 1024 --eval-every 120 \
        --save-every 100000 --quiet ${spec#*:} > /tmp/ft_$name.log 2>&1 || tail -3 /tmp/ft_$name.log
      tail -1 /tmp/ft/$name/log.jsonl
      cp /tmp/ft/$name/log.jsonl "$OUT/ft_$name.jsonl"
    done ;;
  e)
    pip install --no-index --no-deps --target /tmp/site .whl/*.whl -q 2>&1 | tail -1
    timeout 500 python3 scripts/e2e_bench.py "$OUT" $S /tmp/ck/dkv32 /tmp/ck/dkv16 bench/results/generate_NVIDIA_H200.json 2>&1 | grep -v Warning | tail -30 ;;
esac
