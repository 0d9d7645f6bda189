#!/usr/bin/env bash
# The model-dependent GPU runs, in back-to-back calls on one warm machine
# (the 98 MB GGUF travels in two halves; /tmp survives between calls only
# while the machine stays warm, 30 s). Fine-tuning recipe of issue #7:
# attention transfer (stage 1), then KL to the original (stage 2), both on
# 2048-token sequences: a model whose attention was retrained on 1024-token
# sequences only fell apart past 1024 positions (WikiText-2 at a 2048-token
# window: 117 ppl; at 1024: 24), see bench/results/finetune_NVIDIA_H200.md.
#   a  carry [.carry/a2]: first GGUF half, 6.5M corpus tokens, WikiText-2 test (raw) and valid; build; GPU suite
#   b  carry [.carry/b, .whl]: second half + 3 corpus files (calibration); export the GGUF as a plain HF folder,
#      convert d_kv=32/16; attention transfer for both (3.9M tokens each)
#   c  carry [.carry/c2]: 24M corpus tokens + the multiple-choice data; stage 2 (KL) at d_kv=32 for 6 minutes;
#      WikiText-2 test and the six tasks
#   d  (after c) stage 2 at d_kv=16 (KL) and d_kv=32 (cross-entropy), their evaluation, the report
#   e  carry [.whl]: generate() benchmark (scripts/e2e_bench.py)
# Each finetune.py process costs about 30 s beyond its training (start, loading, step-0 evaluation,
# checkpoint): few, long runs. Ignored paths to carry: .carry/a2 (gg_00, corpus6m.npy, data/wikitext2),
# .carry/b (gg_01 + data/corpus), .carry/c2 (corpus24m.npy from scripts/pretokenize.py, data/mc), .whl (the
# gguf wheel). Logs come back as one archive per call ($OUT returns at most 8 files).
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT" /tmp/m /tmp/data /tmp/site /tmp/ft
cd "$(dirname "$0")/.."
# everything printed also lands under $OUT, which comes back even when the call hits its time limit
exec > >(tee -a "$OUT/session_${1:-none}.log") 2>&1
export PYTHONUNBUFFERED=1 MHA2MLA_DATA=/tmp/data PYTHONPATH="/tmp/site:$PWD/python:$PWD"
G=/tmp/m/smollm2.gguf
S=/tmp/SmolLM2-135M-Instruct  # the GGUF exported as a Hugging Face folder (step b)
VALID=/tmp/data/wikitext2/wikitext-2-tokenized.valid.txt
AT_LR=${AT_LR:-2e-3}
STEP_TOKENS=16384  # 8 x 2048
KL_RATE=73000  # tokens/s of the KL loop at 8 x 2048 on an H200 (this session: 71-74k)

ft() {  # NAME CHECKPOINT MINUTES STEPS [finetune.py flags]: one run, one summary line
  local name=$1 ck=$2 min=$3 steps=$4; shift 4
  timeout "$(python3 -c "print(int($min * 60 + 150))")" python3 python/finetune.py "$ck" --output /tmp/ft/$name \
    --eval-text $VALID --batch-size 8 --seq-len 2048 --save-every 100000 --max-steps "$steps" \
    --max-minutes "$min" --quiet "$@" > /tmp/ft/$name.log 2>&1 || tail -4 /tmp/ft/$name.log
  python3 - /tmp/ft/$name <<'EOF'
import json, os, sys
recs = [json.loads(l) for l in open(os.path.join(sys.argv[1], "log.jsonl"))]
ev = [r for r in recs if "eval_text_ppl" in r]
last = [r for r in recs if "loss" in r][-1]
print(f"{os.path.basename(sys.argv[1])}: step {last['step']} tokens {last['tokens']:,} {last['seconds']:.0f} s "
      f"{last['tokens_per_s']:,.0f} tok/s loss {last['loss']:.4f} valid ppl {ev[0]['eval_text_ppl']:.2f} -> "
      f"{ev[-1]['eval_text_ppl']:.2f} held-out {ev[0]['heldout_loss']:.3f} -> {ev[-1]['heldout_loss']:.3f}"
      + (" STOPPED" if "stopped" in last else ""))
EOF
}

steps_for() {  # MINUTES TOKENS_PER_S: steps that end the schedule inside the time, with 10% to spare
  python3 -c "print(max(50, int($1 * 60 * $2 * 0.9 / $STEP_TOKENS)))"
}

case ${1:-} in
  a)
    cp .carry/a2/gg_00 .carry/a2/corpus6m.npy /tmp/m/ && cp -r .carry/a2/data/* /tmp/data/
    bash scripts/gpu_check.sh throw tests ;;
  b)
    cat /tmp/m/gg_00 .carry/b/gg_01 > $G && cp -r .carry/b/data/corpus /tmp/data/
    pip install --no-index --no-deps --target /tmp/site .whl/*.whl -q 2>&1 | tail -1
    /usr/bin/time -f "export GGUF: %e s" python3 -m mha2mla.source $S --model $G 2>&1 | grep -v Warn | tail -2
    for d in 32 16; do
      python3 python/convert.py --model $S --output /tmp/ck/dkv$d --d-kv $d --rope 2norm --r 4 --ppl-windows 0 \
        --quiet > /tmp/convert_dkv$d.log 2>&1 &
    done
    wait
    tail -qn1 /tmp/convert_dkv*.log
    for d in 32 16; do  # stage 1: 240 x 8 x 2048 = 3.9M tokens
      ft at_dkv$d /tmp/ck/dkv$d 1.5 240 --data /tmp/m/corpus6m.npy --objective attention --teacher $S --lr $AT_LR \
        --eval-every 60
    done
    tar czf "$OUT/logs_b.tgz" -C /tmp/ft --exclude=last --exclude=token_cache . ;;
  c|d)
    [ "$1" = c ] && cp .carry/c2/corpus24m.npy /tmp/m/ && cp -r .carry/c2/data/mc /tmp/data/
    FULL="--data /tmp/m/corpus24m.npy --eval-every 100 --lr 1e-4"  # lr: this session's 3M-token ablation
    if [ "$1" = c ]; then
      ft dkv32_at_kl /tmp/ft/at_dkv32/last 6.0 "$(steps_for 6.0 $KL_RATE)" $FULL --distill-weight 1.0 --teacher $S
      timeout 120 python3 python/evaluate.py /tmp/ck/dkv16 /tmp/ft/at_dkv32/last /tmp/ft/dkv32_at_kl/last \
        --batch-size 256 --out /tmp/ev_c --quiet 2>&1 | grep -v Warn | tail -6
      tar czf "$OUT/logs_c.tgz" -C /tmp/ft --exclude=last --exclude=token_cache . -C /tmp ev_c
    else
      ft dkv16_at_kl /tmp/ft/at_dkv16/last 3.0 "$(steps_for 3.0 $KL_RATE)" $FULL --distill-weight 1.0 --teacher $S
      # cross-entropy needs no teacher forward: about 1.3x the KL loop's tokens/s
      ft dkv32_at_ce /tmp/ft/at_dkv32/last 2.0 "$(steps_for 2.0 $((KL_RATE * 13 / 10)))" $FULL
      timeout 150 python3 python/evaluate.py /tmp/ft/at_dkv16/last /tmp/ft/dkv16_at_kl/last /tmp/ft/dkv32_at_ce/last \
        --batch-size 256 --out /tmp/ev_d --quiet 2>&1 | grep -v Warn | tail -6
      python3 -m mha2mla.finetune_report /tmp/ft/at_dkv32 /tmp/ft/dkv32_* /tmp/ft/at_dkv16 /tmp/ft/dkv16_* \
        --eval bench/results/evaluation_NVIDIA_H200.json /tmp/ev_c/evaluation_*.json /tmp/ev_d/evaluation_*.json \
        --original $S --out "$OUT" 2>&1 | grep -v Warn | tail -5
      tar czf "$OUT/logs_d.tgz" -C /tmp/ft --exclude=last --exclude=token_cache . -C /tmp ev_c ev_d
    fi ;;
  e)
    pip install --no-index --no-deps --target /tmp/site .whl/*.whl -q 2>&1 | tail -1
    timeout 500 python3 scripts/e2e_bench.py "$OUT" $S /tmp/ck/dkv32 /tmp/ck/dkv16 bench/results/generate_NVIDIA_H200.json 2>&1 | grep -v Warning | tail -30 ;;
  *)
    echo "usage: bash scripts/gpu_session.sh a|b|c|d|e" >&2; exit 2 ;;
esac
