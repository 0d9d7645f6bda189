#!/usr/bin/env bash
# One call on a GPU machine: build the extension in place, then run the
# steps asked for (default: tests sanitize bench). Logs and results go under
# $OUT (default ./out/gpu).
#   throw     does a C++ error from an op reach Python as an exception?
#   tests     the GPU test suite (pytest -m gpu; the CPU suite is CI's)
#   sanitize  compute-sanitizer memcheck (16-bit and quantized ops) and
#             racecheck (split decode, append, the Hopper kernel over fp8
#             rows) on a small subset
#   profile   ncu on the decode kernel at three benchmark shapes, two fp8
#             caches (the warp-stream and the Hopper kernel) and one sequence
#             of 4k (with the split merge), with its stall reasons in cycles
#             per issued instruction
#   times     each kernel's GPU time per decode call (bench/profile_decode.py
#             --kernel-times): the decode kernel and the split merge apart,
#             16-bit and quantized caches
#   bench     the kernel benchmark (bench/kernel_bench.py), results under $OUT
# Usage: bash bench/gpu_check.sh [throw|tests|sanitize|profile|times|bench]...
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} PYTHONPATH="$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}"
steps=${*:-tests sanitize bench}
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$OUT/gpu.txt"
# Build with /usr/bin's gcc where one exists: an extension built by some
# images' /opt/gcc wrapper crashes the process on a C++ exception instead of
# raising a Python RuntimeError. MLA_SYSTEM_GCC=0 keeps the default compiler.
if [ "${MLA_SYSTEM_GCC:-1}" = 1 ] && [ -x /usr/bin/g++ ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
${CXX:-g++} --version | head -1 | tee -a "$OUT/gpu.txt"
start=$(date +%s)
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
for step in $steps; do
  case $step in
    throw)
      python3 -c "
import torch, mla_cuda
try: mla_cuda.partial_rope(torch.randn(3,4,4), torch.randn(3,2,4), torch.arange(3), torch.tensor([[0,9],[1,2]]), torch.ones(4))
except RuntimeError as e: print('C++ error reached Python:', str(e).splitlines()[0][:90])" 2>&1 | grep -v "^  File" | tail -3 ;;
    tests)
      python3 -m pytest tests -q -rs -p no:cacheprovider -m gpu 2>&1 | tee "$OUT/pytest.log" | tail -25 || status=1 ;;
    sanitize)  # bounded: a sanitizer run that outlasts its share says so (exit 124)
      for tool in memcheck racecheck; do
        MLA_GPU_QUICK=1 timeout $([ $tool = memcheck ] && echo 230 || echo 150) compute-sanitizer --tool $tool --target-processes all \
          python3 -m pytest tests/test_gpu_ops.py tests/test_gpu_quantized.py -q -p no:cacheprovider \
          -k "$([ $tool = memcheck ] && echo 'not compile and not graph' || echo 'forced_splits or (append_gpu and not reference_bytes) or (hopper_shapes and dtype1 and fp8 and (one-block-gqa or c2-wide))')" \
          > "$OUT/sanitize_$tool.log" 2>&1 || { rc=$?; status=1; echo "$tool exit $rc (124: time limit)"; }
        echo "== $tool"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$OUT/sanitize_$tool.log" | tail -4
      done ;;
    profile)  # the first decode kernel launched at each shape (smollm-fp8: over an fp8 latent cache;
              # llama3-fp8: the Hopper kernel over one; llama3-b1: one sequence of 4k, its decode
              # kernel and the split merge)
      for shape in smollm llama llama3 smollm-fp8 llama3-fp8 llama3-b1; do
        args="$shape"; kernels=regex:mla_decode; count=1
        [ "$shape" = smollm-fp8 ] && args="smollm --cache-format fp8 --context 16384"
        [ "$shape" = llama3-fp8 ] && args="llama3 --cache-format fp8"
        [ "$shape" = llama3-b1 ] && args="llama3 --batch 1 --context 4096" kernels="regex:mla_decode|mla_combine" count=2
        ncu -k "$kernels" -c $count --section SpeedOfLight --section Occupancy --section WarpStateStats \
          --section LaunchStats --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
          python3 bench/profile_decode.py $args > "$OUT/ncu_decode_$shape.txt" 2>&1 || status=1
        echo "== ncu $shape"
        grep -E "mla_decode|mla_combine|Duration|Throughput|Achieved Occupancy|Registers|Issued Warp|Block Limit Reg|Warp Cycles Per Issued" "$OUT/ncu_decode_$shape.txt" | head -24
        # the stall reasons that cost a warp more than 0.2 cycles per issued instruction, largest first
        grep -E "issue_stalled_" "$OUT/ncu_decode_$shape.txt" | sed -E 's/smsp__average_warps_issue_stalled_(.*)_per_issue_active\.ratio/\1/' \
          | awk '$NF + 0 > 0.2 {print "    stall", $1, $NF}' | sort -k3 -gr | head -8
      done ;;
    times)  # one long sequence, a few and many, a latent too wide for one block, a narrow one,
            # and the Hopper kernel over fp8 and int4 rows
      for args in "llama3 --batch 1 --context 32768" "llama3 --batch 16 --context 4096" \
                  "llama3 --batch 64 --context 4096" "llama --batch 64 --context 4096" "smollm --batch 64 --context 4096" \
                  "llama3 --batch 64 --context 4096 --cache-format fp8" "llama3 --batch 64 --context 4096 --cache-format int4" \
                  "llama --batch 64 --context 4096 --cache-format fp8"; do
        python3 bench/profile_decode.py $args --kernel-times 2>&1 | tee -a "$OUT/kernel_times.txt" | tail -8 || status=1
      done ;;
    bench)
      python3 bench/kernel_bench.py --out "$OUT" 2>&1 | tail -40 || status=1 ;;
    *)
      echo "gpu_check.sh: unknown step '$step' (throw, tests, sanitize, profile, times, bench)"; status=2 ;;
  esac
done
exit $status
