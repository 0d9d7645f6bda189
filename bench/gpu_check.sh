#!/usr/bin/env bash
# One call on the GPU machine: build in place, run the GPU test suite, the
# sanitizers on a small subset, and the kernel benchmark. Results go under
# $OUT (default ./out/gpu). Usage: bash scripts/gpu_check.sh [tests|sanitize|bench]...
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} PYTHONPATH="$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}"
steps=${*:-tests sanitize bench}
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$OUT/gpu.txt"
# Build with /usr/bin's gcc where the image's default is /opt/gcc: a C++
# exception thrown from an extension built by /opt/gcc's wrapper segfaulted
# the process there, while the same build by /usr/bin/g++ (13.3) raised a
# Python RuntimeError as it should. MLA_SYSTEM_GCC=0 keeps the default.
if [ "${MLA_SYSTEM_GCC:-1}" = 1 ] && [ -x /usr/bin/g++ ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
${CXX:-g++} --version | head -1 | tee -a "$OUT/gpu.txt"
start=$(date +%s)
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
for step in $steps; do
  case $step in
    throw)  # does a C++ error from our ops reach Python as an exception?
      python3 -c "
import torch, mla_cuda
try: mla_cuda.partial_rope(torch.randn(3,4,4), torch.randn(3,2,4), torch.arange(3), torch.tensor([[0,9],[1,2]]), torch.ones(4))
except RuntimeError as e: print('C++ error reached Python:', str(e).splitlines()[0][:90])" 2>&1 | grep -v "^  File" | tail -3 ;;
    tests)  # the GPU suite (the CPU suite is CI's)
      python3 -m pytest tests -q -rs -p no:cacheprovider -m gpu 2>&1 | tee "$OUT/pytest.log" | tail -25 || status=1 ;;
    sanitize)
      for tool in memcheck racecheck; do  # bounded: a sanitizer run that outlasts its share says so
        MLA_GPU_QUICK=1 timeout $([ $tool = memcheck ] && echo 230 || echo 150) compute-sanitizer --tool $tool --target-processes all \
          python3 -m pytest tests/test_gpu_ops.py -q -p no:cacheprovider -k "$([ $tool = memcheck ] && echo 'not compile and not graph' || echo 'forced_splits or append_gpu')" \
          > "$OUT/sanitize_$tool.log" 2>&1 || { rc=$?; status=1; echo "$tool exit $rc (124: time limit)"; }
        echo "== $tool"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$OUT/sanitize_$tool.log" | tail -4
      done ;;
    profile)  # ncu on the first decode kernel launched at each benchmark shape
      for shape in smollm llama; do
        ncu -k regex:mla_decode -c 1 --section SpeedOfLight --section Occupancy --section WarpStateStats \
          --section LaunchStats python3 scripts/profile_decode.py $shape > "$OUT/ncu_decode_$shape.txt" 2>&1 || status=1
        echo "== ncu $shape"
        grep -E "mla_decode|Duration|Throughput|Achieved Occupancy|Registers|Issued Warp|Block Limit Reg|Warp Cycles Per Issued" "$OUT/ncu_decode_$shape.txt" | head -14
      done ;;
    bench)
      python3 python/benchmark.py kernels --out "$OUT" 2>&1 | tail -30 || status=1 ;;
  esac
done
exit $status
