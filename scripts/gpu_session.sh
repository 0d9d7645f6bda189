#!/usr/bin/env bash
# The model-dependent GPU runs, in back-to-back calls on one warm machine
# (the 98 MB GGUF travels in two halves; /tmp survives between calls only
# while the machine stays warm, 30 s). Fine-tuning recipe of issue #7:
# attention transfer (stage 1), then cross-entropy and/or KL to the original
# (stage 2), both on 2048-token sequences: a model whose attention was retrained on 1024-token
# sequences only fell apart past 1024 positions (WikiText-2 at a 2048-token
# window: 117 ppl; at 1024: 24), see bench/results/finetune_NVIDIA_H200.md.
# Made for the 4-GPU kind (independent runs side by side, one per GPU; fewer GPUs take them in turn). The
# seventh session of 2026-11-28 (bench/results/gpu_runs_NVIDIA_H200.md) ran a, b, f, g, h, r, i on the 4-GPU kind:
#   a  carry [.carry/a3]: first GGUF half, 6.5M corpus tokens (gzipped); build; GPU suite
#   b  carry [.carry/b, .whl]: second half, WikiText-2 test (raw) and valid, 3 corpus files (calibration); export the
#      GGUF as a plain HF folder, convert d_kv=32 (DKVS="32 16" for both), stage 1 (attention transfer, 6.6M tokens)
#      over GPUs 0 and 1 through torchrun; samples of the original (mha2mla.teacher_corpus) on the others meanwhile,
#      then on all, until SAMPLE_SECONDS (240) after the export. A repeated b reuses the export and the conversions.
#   t  (after b) more samples, on every GPU
#   f  carry [.carry/c4]: 24M corpus tokens (gzipped) + the multiple-choice data; stage 2 on the samples: four runs (their
#      soup is the session's model), then the mix again over two GPUs (DDP) and two corpus-only controls
#   g  (after f) every model and the original evaluated with per-item hits; differences to the original with
#      paired standard errors against #7's target (mha2mla.compare_evaluations)
#   h  (after g) stage 1 and a cross-entropy run over two GPUs (DDP); two more corpus runs beside them; the soup of
#      the five corpus runs; evaluations
#   i  (after h) the corpus soup repeated from four new data orders; evaluations
#   r  (after d or g) the report: every run, every evaluation, the original measured as each run's loop measures
#      (seconds on a GPU; finetune_report --original-from takes them from an earlier report instead)
#   e  carry [.whl]: generate() benchmark (scripts/e2e_bench.py)
#   c, d  the sixth session's stage-2 candidates on the corpus (c: four runs, two per GPU) and their soups and
#      evaluation (d), as run on the 2-GPU kind; the fifth session's c and d ran KL, cross-entropy and the mix
# DRY=1 prints what a step would train, sample and evaluate (DRY_GPUS=4 of them), and runs none of it.
# Each finetune.py process costs about 30 s beyond its training (start, loading, step-0 evaluation,
# checkpoint): few, long runs. Ignored paths to carry (64 MiB with the tree; a2 + the tree was 66.7 of 67.1 MB on
# 2026-11-28, hence a3): .carry/a3 (gg_00, corpus6m.npy.gz; or .carry/a2 with corpus6m.npy),
# .carry/b (gg_01, data/corpus, data/wikitext2), .carry/c4 (corpus24m.npy.gz from scripts/pretokenize.py, data/mc; or
# .carry/c3 with corpus24m.npy, as the sixth session's c carried it), .whl (the
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
[ -n "${DRY:-}" ] && NGPU=${DRY_GPUS:-4}  # DRY=1: print what a step would run (for planning device time), run nothing
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
  [ -n "${DRY:-}" ] && { echo "GPU ${CUDA_VISIBLE_DEVICES:-all}: $RUN finetune.py $ck -> $name, $steps steps, $min min: $*"; return; }
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

DDP="python3 -m torch.distributed.run --standalone --nproc-per-node"  # RUN="$DDP 2": one run over two GPUs

sample() {  # GPU DEADLINE: samples of the original on that GPU until the deadline (epoch seconds), if a minute is left
  local minutes; minutes=$(python3 -c "print(round(($2 - $(date +%s) - 25) / 60, 2))")  # 25 s: loading the model
  python3 -c "import sys; sys.exit($minutes < 1)" || return 0
  [ -n "${DRY:-}" ] && { echo "GPU $1: samples for $minutes min"; return; }
  CUDA_VISIBLE_DEVICES=$1 timeout $(( $2 - $(date +%s) + 120 )) python3 -m mha2mla.teacher_corpus $S \
    --output /tmp/m/teacher_g$1.npy --tokens 100000000 --batch-size ${SAMPLE_BATCH:-1024} --length 512 --seed $1 \
    --max-minutes "$minutes" --quiet > /tmp/teacher_g$1.log 2>&1
}

KL="--distill-weight 1.0 --teacher $S" MIX="--distill-weight 0.5 --teacher $S" CORPUS=/tmp/m/corpus24m.npy
stage2() {  # NAME MINUTES [flags]: 625 steps (10.2M tokens) from stage 1, as dkv32_at_NAME
  local name=$1 min=$2; shift 2
  ft dkv32_at_$name /tmp/ft/at_dkv32/last "$min" 625 --eval-every 200 --lr 1e-4 "$@"
}

soup() {  # NAME RUN...: the weight average of /tmp/ft/dkv32_at_RUN/last, as /tmp/ft/NAME/last
  local name=$1 r; shift
  [ -n "${DRY:-}" ] && { echo "soup $name of $*"; return; }
  python3 -m mha2mla.average_checkpoints $(for r in "$@"; do echo /tmp/ft/dkv32_at_$r/last; done) \
    --output /tmp/ft/$name/last 2>&1 | grep -v Warn | tail -1
}

evaluate_spread() {  # NAME_OF_OUT MODEL...: the models evaluated side by side, GPU i taking models i, i+NGPU, ...
  local out=$1 i k; shift
  local models=("$@") mine
  for i in $(seq 0 $((NGPU - 1))); do
    mine=()
    for k in "${!models[@]}"; do  # a run that failed has no checkpoint to evaluate
      [ $((k % NGPU)) -eq "$i" ] && { [ -e "${models[k]}" ] || [ "${models[k]}" = original ]; } && mine+=("${models[k]}")
    done
    [ ${#mine[@]} -gt 0 ] && on_gpu $i evaluate /tmp/ev_${out}$i "${mine[@]}" --source $S
  done
  wait_runs
}

compare() {  # the differences to the original of every evaluation so far, against #7's target
  [ -n "${DRY:-}" ] && return
  python3 -m mha2mla.compare_evaluations /tmp/ev_*/evaluation_*.json --baseline Instruct --target 1.10 -1.0 \
    --out /tmp/ev_cmp | tail -20
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
  [ -n "${DRY:-}" ] && { echo "GPU ${CUDA_VISIBLE_DEVICES:-all}: evaluate -> $out: $*"; return; }
  timeout $(( 40 + 75 * $# )) python3 python/evaluate.py "$@" --batch-size 256 --out "$out" --quiet 2>&1 | grep -v Warn | tail -4
}

case ${1:-} in
  a)
    # .carry/a3 holds the stage-1 tokens gzipped (8.4 of 13 MB), leaving the tree room beside the GGUF half
    for A in .carry/a3 .carry/a2; do [ -d $A ] && break; done
    cp $A/gg_00 /tmp/m/ && { [ -f $A/corpus6m.npy ] && cp $A/corpus6m.npy /tmp/m/ || gunzip -c $A/corpus6m.npy.gz > /tmp/m/corpus6m.npy; }
    bash scripts/gpu_check.sh throw tests ;;
  b)
    # export; conversion; stage 1 (400 x 8 x 2048 = 6.6M tokens). Where there are 2+ GPUs, stage 1 runs over GPUs 0
    # and 1 through torchrun (4 sequences per process: the same global batches as one GPU's 8), and samples of the
    # original (the data of step f) are drawn on the other GPUs meanwhile, on 0 and 1 too once stage 1 is done,
    # until SAMPLE_SECONDS after the export
    [ -d .carry/b ] && cat /tmp/m/gg_00 .carry/b/gg_01 > $G && cp -r .carry/b/data/corpus .carry/b/data/wikitext2 /tmp/data/
    pip install --no-index --no-deps --target /tmp/site .whl/*.whl -q 2>&1 | tail -1
    [ -f $S/config.json ] || /usr/bin/time -f "export GGUF: %e s" python3 -m mha2mla.source $S --model $G 2>&1 | grep -v Warn | tail -2
    DEADLINE=$(( $(date +%s) + ${SAMPLE_SECONDS:-240} )) CONVERTING=""
    for i in $(seq 2 $((NGPU - 1))); do sample $i $DEADLINE & done
    for d in $DKVS; do
      [ -f /tmp/ck/dkv$d/model.safetensors ] && continue  # made by an earlier try of this step
      # side by side with every core each, both took 286 s in convert_model (4 s on a 2-core CPU here);
      # half the cores each, in case that was thread oversubscription (alone with half the cores: about 40 s)
      OMP_NUM_THREADS=$(( $(nproc) / 2 )) CUDA_VISIBLE_DEVICES=$((d == 32 ? 0 : NGPU - 1)) python3 python/convert.py --model $S --output /tmp/ck/dkv$d \
        --d-kv $d --rope 2norm --r 4 --ppl-windows 0 --quiet > /tmp/convert_dkv$d.log 2>&1 &
      CONVERTING="$CONVERTING $!"
    done
    wait $CONVERTING  # by PID: the samplers run on
    tail -qn1 /tmp/convert_dkv*.log
    AT="--data /tmp/m/corpus6m.npy --objective attention --teacher $S --lr $AT_LR --eval-every 100"
    if [ "$NGPU" -ge 2 ] && [ "$DKVS" = 32 ]; then
      CUDA_VISIBLE_DEVICES=0,1 RUN="$DDP 2" ft at_dkv32 /tmp/ck/dkv32 2.0 400 $AT --batch-size 4
      [ -f /tmp/ft/at_dkv32/last/model.safetensors ] || { echo "stage 1 over two GPUs failed; on one"; rm -rf /tmp/ft/at_dkv32;
        CUDA_VISIBLE_DEVICES=0 ft at_dkv32 /tmp/ck/dkv32 2.0 400 $AT; }
      sample 0 $DEADLINE &
      sample 1 $DEADLINE &
    else
      for d in $DKVS; do on_gpu $((d == 32 ? 0 : 1)) ft at_dkv$d /tmp/ck/dkv$d 2.0 400 $AT; done
    fi
    wait_runs
    tail -qn1 /tmp/teacher_g*.log 2>/dev/null
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
    on_gpu 0 soup dkv32_soup_ce10_mix10 ce10 mix10
    on_gpu 1 soup dkv32_soup3 ce10 mix10 mix10_newlr3
    wait_runs
    soup dkv32_soup4 ce10 mix10 mix10_newlr3 mix10_attn
    on_gpu 0 evaluate /tmp/ev_d0 original $F/dkv32_at_mix10/last $F/dkv32_at_mix10_attn/last $F/dkv32_soup_ce10_mix10/last \
      $F/dkv32_soup4/last --source $S
    on_gpu 1 evaluate /tmp/ev_d1 $F/dkv32_at_ce10/last $F/dkv32_at_mix10_newlr3/last $F/at_dkv32/last $F/dkv32_soup3/last
    wait_runs
    python3 -m mha2mla.compare_evaluations /tmp/ev_d*/evaluation_*.json --baseline Instruct --out /tmp/ev_cmp
    pack d ;;
  t)
    # (after b) more samples of the original, on every GPU, for SAMPLE_SECONDS; a GPU whose stream exists already
    # writes a second one (teacher_gN_2.npy and so on)
    DEADLINE=$(( $(date +%s) + ${SAMPLE_SECONDS:-240} ))
    for i in $(seq 0 $((NGPU - 1))); do on_gpu $i sample $i $DEADLINE; done
    wait_runs
    tail -qn1 /tmp/teacher_g*.log ;;
  f)
    # stage 2 on samples of the original (step b), for HellaSwag and PIQA, where the converted models lose their points
    # (finetune_candidates_NVIDIA_H200.md), 625 steps (10.2M tokens) each from stage 1 (b). Round 1, one run per GPU
    # (on fewer GPUs, in turn): KL on the samples alone; the 0.5 CE + 0.5 KL mix, cross-entropy, and KL, each on the
    # corpus and the samples together (the samples are about a third). Their soup is the session's model, named
    # before any of them ran. Round 2: the mix again with another data order over GPUs 0 and 1 through torchrun (DDP
    # on NCCL; 4 sequences per process); the two corpus-only runs of the sixth session (cross-entropy, the mix) as
    # controls on the same stage 1. ROUNDS picks (default "1 2": about 9 minutes on four GPUs)
    # .carry/c4: the corpus tokens gzipped (about 31 of 48 MB), leaving the tree room; or .carry/c3 with them plain
    for C in .carry/c4 .carry/c3; do [ -d $C ] && break; done
    [ -f $C/corpus24m.npy ] && cp $C/corpus24m.npy /tmp/m/ || gunzip -c $C/corpus24m.npy.gz > /tmp/m/corpus24m.npy
    cp -r $C/data/mc /tmp/data/
    TEACHER=$(ls /tmp/m/teacher_g*.npy | tr '\n' ' ')
    echo "samples: $(python3 -c "import numpy as np, sys; print(f'{sum(len(np.load(p, mmap_mode=\"r\")) for p in sys.argv[1:]):,} tokens')" $TEACHER)"
    BOTH="/tmp/m/corpus24m.npy $TEACHER"
    lane() {  # I: round 1's runs I, I+NGPU, ... in turn
      local i=$1 k=0 spec
      while IFS= read -r spec; do
        [ $((k % NGPU)) -eq "$i" ] && eval "stage2 $spec" </dev/null
        k=$((k + 1))
      done <<RUNS
kl_teacher 3.0 --data $TEACHER $KL
mix_teacher 3.0 --data $BOTH $MIX
ce_teacher 2.5 --data $BOTH
kl_both 3.0 --data $BOTH $KL
RUNS
    }
    if [[ " ${ROUNDS:-1 2} " == *" 1 "* ]]; then
      for i in $(seq 0 $((NGPU - 1))); do on_gpu $i lane $i; done
      wait_runs
      soup dkv32_soup_teacher kl_teacher mix_teacher ce_teacher kl_both
    fi
    if [[ " ${ROUNDS:-1 2} " == *" 2 "* ]]; then
      if [ "$NGPU" -ge 2 ]; then
        (CUDA_VISIBLE_DEVICES=0,1 RUN="$DDP 2" stage2 mix_teacher_s1_ddp 3.0 --data $BOTH $MIX --seed 1 --batch-size 4) &
      fi
      on_gpu $((NGPU > 2 ? 2 : 0)) stage2 ce10 2.5 --data $CORPUS
      on_gpu $((NGPU > 3 ? 3 : 0)) stage2 mix10 3.0 --data $CORPUS $MIX
      wait_runs
    fi
    pack f ;;
  g)
    # after f: every model and the original evaluated with per-item hits, side by side; differences to the original
    # with paired standard errors, against #7's target. (The seventh session's g also averaged all seven runs; with
    # the DDP run missing, that failed: see h)
    F=/tmp/ft
    evaluate_spread g original $F/dkv32_soup_teacher/last $F/dkv32_at_{kl_teacher,mix_teacher,ce_teacher,kl_both}/last \
      $F/dkv32_at_{ce10,mix10}/last
    compare
    pack g ;;
  h)
    # after g. DDP over GPUs 0 and 1 (torchrun, NCCL; 4 sequences per process): stage 1 again (the same global batches
    # as b's one-GPU run), then cross-entropy with data order 1. Meanwhile, one GPU each: cross-entropy with order 2,
    # the mix with order 1. Then the soup of the five corpus-only runs (with f's ce10 and mix10) and the evaluations
    ( CUDA_VISIBLE_DEVICES=0,1 RUN="$DDP 2" ft at_dkv32_ddp /tmp/ck/dkv32 3.0 400 --data /tmp/m/corpus6m.npy \
        --objective attention --teacher $S --lr $AT_LR --eval-every 100 --batch-size 4
      CUDA_VISIBLE_DEVICES=0,1 RUN="$DDP 2" stage2 ce10_s1_ddp 3.5 --data $CORPUS --seed 1 --batch-size 4 ) &
    on_gpu $((NGPU > 2 ? 2 : 0)) stage2 ce10_s2 3.0 --data $CORPUS --seed 2
    on_gpu $((NGPU > 3 ? 3 : 0)) stage2 mix10_s1 3.5 --data $CORPUS $MIX --seed 1
    wait_runs
    soup dkv32_soup_corpus5 ce10 mix10 ce10_s2 mix10_s1 ce10_s1_ddp
    evaluate_spread h /tmp/ft/dkv32_soup_corpus5/last /tmp/ft/dkv32_at_{ce10_s2,mix10_s1,ce10_s1_ddp}/last
    compare
    pack h ;;
  i)
    # after h: the corpus soup again from four new data orders (cross-entropy 3 and 4, the mix 2 and 3), named before
    # it ran, to see whether h's soup was a lucky draw
    on_gpu 0 stage2 ce10_s3 3.0 --data $CORPUS --seed 3 --eval-every 625
    on_gpu $((NGPU > 1 ? 1 : 0)) stage2 ce10_s4 3.0 --data $CORPUS --seed 4 --eval-every 625
    on_gpu $((NGPU > 2 ? 2 : 0)) stage2 mix10_s2 3.5 --data $CORPUS $MIX --seed 2 --eval-every 625
    on_gpu $((NGPU > 3 ? 3 : 0)) stage2 mix10_s3 3.5 --data $CORPUS $MIX --seed 3 --eval-every 625
    wait_runs
    soup dkv32_soup_corpus4_rep ce10_s3 ce10_s4 mix10_s2 mix10_s3
    evaluate_spread i /tmp/ft/dkv32_soup_corpus4_rep/last /tmp/ft/dkv32_at_{ce10_s3,mix10_s2}/last
    compare
    pack i ;;
  r)
    python3 -m mha2mla.finetune_report /tmp/ft/at_dkv32*/ /tmp/ft/dkv32_at_*/ \
      --eval bench/results/evaluation_NVIDIA_H200.json /tmp/ev_*/evaluation_*.json --original $S \
      --throughput bench/results/train_throughput_NVIDIA_H200.json --out "$OUT" 2>&1 | grep -v Warn | tail -5 ;;
  e)
    pip install --no-index --no-deps --target /tmp/site .whl/*.whl -q 2>&1 | tail -1
    timeout 500 python3 scripts/e2e_bench.py "$OUT" $S /tmp/ck/dkv32 /tmp/ck/dkv16 bench/results/generate_NVIDIA_H200.json 2>&1 | grep -v Warning | tail -30 ;;
  *)
    echo "usage: bash scripts/gpu_session.sh a|b|c|d|r|e|t|f|g|h|i" >&2; exit 2 ;;
esac
