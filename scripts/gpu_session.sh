#!/usr/bin/env bash
# The model-dependent GPU runs, in back-to-back calls on one warm machine
# (the 98 MB GGUF travels in two halves; /tmp survives between calls only
# while the machine stays warm, 30 s). Fine-tuning recipe of issue #7:
# attention transfer (stage 1), then cross-entropy and/or KL to the original
# (stage 2), both on 2048-token sequences: a model whose attention was retrained on 1024-token
# sequences only fell apart past 1024 positions (WikiText-2 at a 2048-token
# window: 117 ppl; at 1024: 24), see bench/results/finetune_NVIDIA_H200.md.
# Made for the 2-GPU kind (independent runs side by side, one per GPU); on one GPU they go one after the
# other. As run on 2026-11-28 (bench/results/gpu_runs_NVIDIA_H200.md, about 23 device minutes):
#   a  carry [.carry/a2]: first GGUF half, 6.5M corpus tokens, WikiText-2 test (raw) and valid; build; GPU suite
#   b  carry [.carry/b, .whl]: second half + 3 corpus files (calibration); export the GGUF as a plain HF folder,
#      convert d_kv=32/16 (about 5 minutes side by side: float64 SVDs on the CPU); attention transfer for both
#      (6.6M tokens each, side by side). A repeated b reuses the export and the conversions.
#   c  carry [.carry/c2]: 24M corpus tokens + the multiple-choice data; stage 2 side by side: KL at d_kv=32 on
#      GPU 0; KL at d_kv=16, then cross-entropy at d_kv=32 on GPU 1; WikiText-2 test and the six tasks
#   d  (after c) longer cross-entropy and a 0.5 CE + 0.5 KL mix at d_kv=32, side by side; their evaluation
#   e  carry [.whl]: generate() benchmark (scripts/e2e_bench.py)
#   r  (after d) the report: every run, every evaluation, the original measured as each run's loop measures
#      (seconds on a GPU; on 2026-11-28 it ran on a CPU afterwards, from the logs that came back)
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
# NVLink multicast stays off on multi-GPU machines (KINDS.md): a program using it can take the host's GPUs down
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
echo "$(date +%T) step ${1:-none} on $NGPU GPU(s)"
G=/tmp/m/smollm2.gguf
S=/tmp/SmolLM2-135M-Instruct  # the GGUF exported as a Hugging Face folder (step b)
VALID=/tmp/data/wikitext2/wikitext-2-tokenized.valid.txt
AT_LR=${AT_LR:-2e-3}
STEP_TOKENS=16384  # 8 x 2048 per GPU
KL_RATE=73000  # tokens/s of the KL loop at 8 x 2048 on one H200 (last session: 71-74k)
RUN="python3"  # how ft starts finetune.py; "torchrun --standalone --nproc-per-node $NGPU" for one run over all
STAGE2="--data /tmp/m/corpus24m.npy --eval-every 200 --lr 1e-4"  # lr: the 3M-token ablation of 2026-11-28 (at1024)

ft() {  # NAME CHECKPOINT MINUTES STEPS [finetune.py flags]: one run ($RUN starts it), one summary line
  local name=$1 ck=$2 min=$3 steps=$4; shift 4
  timeout "$(python3 -c "print(int($min * 60 + 150))")" $RUN python/finetune.py "$ck" --output /tmp/ft/$name \
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

wait_runs() {  # the background runs; a bare wait also waits for the tee above, forever
  local p
  for p in $(jobs -p); do wait "$p"; done
}

on_gpu() {  # INDEX COMMAND...: in the background on that GPU where there are two or more, else here
  local i=$1; shift
  if [ "$NGPU" -ge 2 ]; then CUDA_VISIBLE_DEVICES=$i "$@" & else "$@"; fi
}

steps_for() {  # MINUTES TOKENS_PER_S: steps that end the schedule inside the time, with 10% to spare
  python3 -c "print(max(50, int($1 * 60 * $2 * 0.9 / $STEP_TOKENS)))"
}

pack() {  # STEP: the runs' logs (no checkpoints) and the evaluations so far, one archive back under $OUT
  local evals; evals=$(cd /tmp && ls -d ev_* 2>/dev/null)
  tar czf "$OUT/logs_$1.tgz" -C /tmp/ft --exclude=last --exclude=token_cache . ${evals:+-C /tmp $evals}
}

evaluate() {  # OUT_DIR CHECKPOINT...: WikiText-2 test and the six tasks, full sets
  local out=$1; shift
  timeout 170 python3 python/evaluate.py "$@" --batch-size 256 --out "$out" --quiet 2>&1 | grep -v Warn | tail -4
}

case ${1:-} in
  a)
    cp .carry/a2/gg_00 .carry/a2/corpus6m.npy /tmp/m/ && cp -r .carry/a2/data/* /tmp/data/
    bash scripts/gpu_check.sh throw tests ;;
  b)
    [ -d .carry/b ] && cat /tmp/m/gg_00 .carry/b/gg_01 > $G && cp -r .carry/b/data/corpus /tmp/data/
    pip install --no-index --no-deps --target /tmp/site .whl/*.whl -q 2>&1 | tail -1
    [ -f $S/config.json ] || /usr/bin/time -f "export GGUF: %e s" python3 -m mha2mla.source $S --model $G 2>&1 | grep -v Warn | tail -2
    for d in 32 16; do
      [ -f /tmp/ck/dkv$d/model.safetensors ] && continue  # made by an earlier try of this step
      # side by side with every core each, both took 286 s in convert_model (4 s on a 2-core CPU here);
      # half the cores each, in case that was thread oversubscription (not measured yet)
      OMP_NUM_THREADS=$(( $(nproc) / 2 )) CUDA_VISIBLE_DEVICES=$((d == 32 ? 0 : NGPU - 1)) python3 python/convert.py --model $S --output /tmp/ck/dkv$d \
        --d-kv $d --rope 2norm --r 4 --ppl-windows 0 --quiet > /tmp/convert_dkv$d.log 2>&1 &
    done
    wait_runs
    tail -qn1 /tmp/convert_dkv*.log
    for d in 32 16; do  # stage 1: 400 x 8 x 2048 = 6.6M tokens
      on_gpu $((d == 32 ? 0 : 1)) ft at_dkv$d /tmp/ck/dkv$d 2.0 400 --data /tmp/m/corpus6m.npy --objective attention \
        --teacher $S --lr $AT_LR --eval-every 100
    done
    wait_runs
    pack b ;;
  c)
    cp .carry/c2/corpus24m.npy /tmp/m/ && cp -r .carry/c2/data/mc /tmp/data/
    # stage 2, side by side: KL at d_kv=32 on one GPU; KL at d_kv=16, then cross-entropy at d_kv=32, on the other
    on_gpu 0 ft dkv32_at_kl /tmp/ft/at_dkv32/last 6.0 "$(steps_for 6.0 $KL_RATE)" $STAGE2 --distill-weight 1.0 --teacher $S
    other() {
      ft dkv16_at_kl /tmp/ft/at_dkv16/last 3.0 "$(steps_for 3.0 $KL_RATE)" $STAGE2 --distill-weight 1.0 --teacher $S
      # cross-entropy needs no teacher forward: about 1.3x the KL loop's tokens/s
      ft dkv32_at_ce /tmp/ft/at_dkv32/last 2.0 "$(steps_for 2.0 $((KL_RATE * 13 / 10)))" $STAGE2
    }
    on_gpu 1 other
    wait_runs
    on_gpu 0 evaluate /tmp/ev_c0 /tmp/ft/dkv32_at_kl/last
    on_gpu 1 evaluate /tmp/ev_c1 /tmp/ft/dkv16_at_kl/last /tmp/ft/dkv32_at_ce/last
    wait_runs
    pack c ;;
  d)
    # after c: cross-entropy beat KL on WikiText-2 (21.12 against 22.06 at d_kv=32); longer CE, and a CE+KL mix
    on_gpu 0 ft dkv32_at_ce_long /tmp/ft/at_dkv32/last 3.5 "$(steps_for 3.5 110000)" $STAGE2
    on_gpu 1 ft dkv32_at_mix /tmp/ft/at_dkv32/last 3.5 "$(steps_for 3.5 80000)" $STAGE2 --distill-weight 0.5 --teacher $S
    wait_runs
    on_gpu 0 evaluate /tmp/ev_d0 /tmp/ft/dkv32_at_ce_long/last
    on_gpu 1 evaluate /tmp/ev_d1 /tmp/ft/dkv32_at_mix/last
    wait_runs
    pack d ;;
  r)
    python3 -m mha2mla.finetune_report /tmp/ft/at_dkv32 /tmp/ft/dkv32_*/ /tmp/ft/at_dkv16 /tmp/ft/dkv16_*/ \
      --eval bench/results/evaluation_NVIDIA_H200.json /tmp/ev_*/evaluation_*.json --original $S \
      --throughput bench/results/train_throughput_NVIDIA_H200.json --out "$OUT" 2>&1 | grep -v Warn | tail -5 ;;
  e)
    pip install --no-index --no-deps --target /tmp/site .whl/*.whl -q 2>&1 | tail -1
    timeout 500 python3 scripts/e2e_bench.py "$OUT" $S /tmp/ck/dkv32 /tmp/ck/dkv16 bench/results/generate_NVIDIA_H200.json 2>&1 | grep -v Warning | tail -30 ;;
  *)
    echo "usage: bash scripts/gpu_session.sh a|b|c|d|r|e" >&2; exit 2 ;;
esac
