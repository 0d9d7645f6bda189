#!/usr/bin/env bash
# The model-dependent GPU runs, in back-to-back calls on one warm machine
# (the 98 MB GGUF travels in two halves; /tmp survives between calls only
# while the machine stays warm, 30 s). Fine-tuning recipe of issue #7:
# attention transfer (stage 1), then cross-entropy and/or KL to the original
# (stage 2), both on 2048-token sequences: a model whose attention was retrained on 1024-token
# sequences only fell apart past 1024 positions (WikiText-2 at a 2048-token
# window: 117 ppl; at 1024: 24), see bench/results/finetune_NVIDIA_H200.md.
# Made for the 2-GPU kind (independent runs side by side, one per GPU); on one GPU they go one after the
# other. As run on 2026-11-28 (bench/results/gpu_runs_NVIDIA_H200.md, sixth session of the day):
#   a  carry [.carry/a2]: first GGUF half, 6.5M corpus tokens; build; GPU suite
#   b  carry [.carry/b, .whl]: second half, WikiText-2 test (raw) and valid, 3 corpus files (calibration); export the GGUF as a plain HF folder,
#      convert d_kv=32/16 (about 5 minutes side by side: float64 SVDs on the CPU); attention transfer for both
#      (6.6M tokens each, side by side). A repeated b reuses the export and the conversions.
#   c  carry [.carry/c3]: 24M corpus tokens + the multiple-choice data; four stage-2 candidates at d_kv=32,
#      two per GPU (this session; the fifth session's c and d ran KL, cross-entropy and the mix, see the log)
#   d  (after c) three soups (weight averages) of them; every candidate, the stage-1 checkpoint and the original
#      evaluated with per-item hits; differences to the original with paired standard errors
#      (mha2mla.compare_evaluations). This session ran it in three calls (see the log); this is the one-call form
#   e  carry [.whl]: generate() benchmark (scripts/e2e_bench.py)
#   t  (after b) training text sampled from the original, TEACHER_TOKENS per GPU (not run yet)
#   f  (after b, t; c for a third cross-entropy run in the soup) stage 2 on the samples; cross-entropy, two more
#      data orders, and their soup (planned, not run)
#   g  (after f) their evaluation and comparison with the original (planned, not run)
#   r  (after d) the report: every run, every evaluation, the original measured as each run's loop measures
#      (seconds on a GPU; finetune_report --original-from takes them from an earlier report instead)
# Each finetune.py process costs about 30 s beyond its training (start, loading, step-0 evaluation,
# checkpoint): few, long runs. Ignored paths to carry (64 MiB with the tree; a2 + the tree was 66.7 of 67.1 MB on
# 2026-11-28): .carry/a2 (gg_00, corpus6m.npy),
# .carry/b (gg_01, data/corpus, data/wikitext2), .carry/c3 (corpus24m.npy from scripts/pretokenize.py, data/mc), .whl (the
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
DKVS=${DKVS:-32}  # the conversions step b makes (d_kv=16 too: DKVS="32 16")
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

evaluate() {  # OUT_DIR CHECKPOINT...: WikiText-2 test and the six tasks, full sets (about 45 s a model)
  local out=$1; shift
  timeout $(( 40 + 75 * $# )) python3 python/evaluate.py "$@" --batch-size 256 --out "$out" --quiet 2>&1 | grep -v Warn | tail -4
}

case ${1:-} in
  a)
    cp .carry/a2/gg_00 .carry/a2/corpus6m.npy /tmp/m/
    bash scripts/gpu_check.sh throw tests ;;
  b)
    [ -d .carry/b ] && cat /tmp/m/gg_00 .carry/b/gg_01 > $G && cp -r .carry/b/data/corpus .carry/b/data/wikitext2 /tmp/data/
    pip install --no-index --no-deps --target /tmp/site .whl/*.whl -q 2>&1 | tail -1
    [ -f $S/config.json ] || /usr/bin/time -f "export GGUF: %e s" python3 -m mha2mla.source $S --model $G 2>&1 | grep -v Warn | tail -2
    for d in $DKVS; do
      [ -f /tmp/ck/dkv$d/model.safetensors ] && continue  # made by an earlier try of this step
      # side by side with every core each, both took 286 s in convert_model (4 s on a 2-core CPU here);
      # half the cores each, in case that was thread oversubscription (not measured yet)
      OMP_NUM_THREADS=$(( $(nproc) / 2 )) CUDA_VISIBLE_DEVICES=$((d == 32 ? 0 : NGPU - 1)) python3 python/convert.py --model $S --output /tmp/ck/dkv$d \
        --d-kv $d --rope 2norm --r 4 --ppl-windows 0 --quiet > /tmp/convert_dkv$d.log 2>&1 &
    done
    wait_runs
    tail -qn1 /tmp/convert_dkv*.log
    for d in $DKVS; do  # stage 1: 400 x 8 x 2048 = 6.6M tokens
      on_gpu $((d == 32 ? 0 : 1)) ft at_dkv$d /tmp/ck/dkv$d 2.0 400 --data /tmp/m/corpus6m.npy --objective attention \
        --teacher $S --lr $AT_LR --eval-every 100
    done
    wait_runs
    pack b ;;
  c)
    # candidates for one model meeting both halves of #7's target, 625 steps (10.2M tokens) each from the
    # 6.6M-token attention transfer; side by side: GPU 0 the 0.5 CE + 0.5 KL mix over all parameters, then over
    # attention only (MLPs and embeddings stay the original's); GPU 1 cross-entropy (the run that met the
    # average last session, again), then the mix with 3x the lr on the new projections
    cp .carry/c3/corpus24m.npy /tmp/m/ && cp -r .carry/c3/data/mc /tmp/data/
    MIX="$STAGE2 --distill-weight 0.5 --teacher $S"
    g0() {
      ft dkv32_at_mix10 /tmp/ft/at_dkv32/last 2.6 625 $MIX
      ft dkv32_at_mix10_attn /tmp/ft/at_dkv32/last 2.6 625 $MIX --train attention
    }
    g1() {
      ft dkv32_at_ce10 /tmp/ft/at_dkv32/last 2.0 625 $STAGE2
      ft dkv32_at_mix10_newlr3 /tmp/ft/at_dkv32/last 2.6 625 $MIX --new-proj-lr-mult 3
    }
    on_gpu 0 g0
    on_gpu 1 g1
    wait_runs
    pack c ;;
  d)
    # after c: weight averages (soups) of the runs: cross-entropy + mix; the three all-parameter runs; all four.
    # Every candidate, the stage-1 checkpoint and the original evaluated with per-item hits, then each one's
    # six-task difference to the original with its paired standard error (mha2mla.compare_evaluations)
    F=/tmp/ft
    soup() { python3 -m mha2mla.average_checkpoints "${@:2}" --output $F/$1/last 2>&1 | grep -v Warn | tail -1; }
    on_gpu 0 soup dkv32_soup_ce10_mix10 $F/dkv32_at_ce10/last $F/dkv32_at_mix10/last
    on_gpu 1 soup dkv32_soup3 $F/dkv32_at_ce10/last $F/dkv32_at_mix10/last $F/dkv32_at_mix10_newlr3/last
    wait_runs
    soup dkv32_soup4 $F/dkv32_at_ce10/last $F/dkv32_at_mix10/last $F/dkv32_at_mix10_newlr3/last $F/dkv32_at_mix10_attn/last
    on_gpu 0 evaluate /tmp/ev_d0 original $F/dkv32_at_mix10/last $F/dkv32_at_mix10_attn/last $F/dkv32_soup_ce10_mix10/last \
      $F/dkv32_soup4/last --source $S
    on_gpu 1 evaluate /tmp/ev_d1 $F/dkv32_at_ce10/last $F/dkv32_at_mix10_newlr3/last $F/at_dkv32/last $F/dkv32_soup3/last
    wait_runs
    python3 -m mha2mla.compare_evaluations /tmp/ev_d*/evaluation_*.json --baseline Instruct --out /tmp/ev_cmp
    pack d ;;
  t)
    # not run yet: training text sampled from the original (mha2mla.teacher_corpus), one process per GPU with its own
    # seed (/tmp/m/teacher_gN.npy; give finetune.py --data all of them). The samples are saved batch by batch:
    # a t cut by its time limit continues where it stopped when called again
    for i in $(seq 0 $((NGPU > 1 ? NGPU - 1 : 0))); do
      CUDA_VISIBLE_DEVICES=$i timeout 400 python3 -m mha2mla.teacher_corpus $S --output /tmp/m/teacher_g$i.npy \
        --tokens "${TEACHER_TOKENS:-2000000}" --batch-size 512 --length 512 --seed $i --quiet \
        > /tmp/teacher_g$i.log 2>&1 &
    done
    wait_runs
    tail -qn1 /tmp/teacher_g*.log ;;
  f)
    # planned, not run (after b and t): stage 2 on samples of the original, for HellaSwag and PIQA, where the
    # converted models lose their points (finetune_candidates_NVIDIA_H200.md); and cross-entropy with two more
    # data orders, for a soup of cross-entropy runs (the best task profile; soups lowered perplexity).
    # GPU 0: KL on the samples, then cross-entropy --seed 1; GPU 1: the mix on corpus + samples, then --seed 2
    TEACHER=$(ls /tmp/m/teacher_g*.npy)
    g0() {
      ft dkv32_at_kl_teacher /tmp/ft/at_dkv32/last 2.6 625 --data $TEACHER --eval-every 200 --lr 1e-4 \
        --distill-weight 1.0 --teacher $S
      ft dkv32_at_ce10_s1 /tmp/ft/at_dkv32/last 2.0 625 $STAGE2 --seed 1
    }
    g1() {
      ft dkv32_at_mix_teacher /tmp/ft/at_dkv32/last 2.6 625 --data /tmp/m/corpus24m.npy $TEACHER --eval-every 200 \
        --lr 1e-4 --distill-weight 0.5 --teacher $S
      ft dkv32_at_ce10_s2 /tmp/ft/at_dkv32/last 2.0 625 $STAGE2 --seed 2
    }
    on_gpu 0 g0
    on_gpu 1 g1
    wait_runs
    python3 -m mha2mla.average_checkpoints /tmp/ft/dkv32_at_ce10*/last --output /tmp/ft/dkv32_soup_ce/last 2>&1 | tail -1
    pack f ;;
  g)
    # after f: its models and the original, with per-item hits; differences to the original
    on_gpu 0 evaluate /tmp/ev_g0 original /tmp/ft/dkv32_at_kl_teacher/last /tmp/ft/dkv32_soup_ce/last --source $S
    on_gpu 1 evaluate /tmp/ev_g1 /tmp/ft/dkv32_at_mix_teacher/last /tmp/ft/dkv32_at_ce10_s1/last \
      /tmp/ft/dkv32_at_ce10_s2/last
    wait_runs
    python3 -m mha2mla.compare_evaluations /tmp/ev_*/evaluation_*.json --baseline Instruct --target 1.10 -1.0 \
      --out /tmp/ev_cmp
    pack g ;;
  r)
    python3 -m mha2mla.finetune_report /tmp/ft/at_dkv32 /tmp/ft/dkv32_at_*/ \
      --eval bench/results/evaluation_NVIDIA_H200.json /tmp/ev_*/evaluation_*.json --original $S \
      --throughput bench/results/train_throughput_NVIDIA_H200.json --out "$OUT" 2>&1 | grep -v Warn | tail -5 ;;
  e)
    pip install --no-index --no-deps --target /tmp/site .whl/*.whl -q 2>&1 | tail -1
    timeout 500 python3 scripts/e2e_bench.py "$OUT" $S /tmp/ck/dkv32 /tmp/ck/dkv16 bench/results/generate_NVIDIA_H200.json 2>&1 | grep -v Warning | tail -30 ;;
  *)
    echo "usage: bash scripts/gpu_session.sh a|b|c|d|r|e|t|f|g" >&2; exit 2 ;;
esac
