#!/usr/bin/env bash
# Builds the ops with CMake (find_package(Torch)) and runs the C++ test with
# ctest. Uses the active Python's torch. A CUDA torch's CMake config needs
# the CUDA toolkit (CUDA_HOME, else the one build_tools/find_cuda.py finds, as
# setup.py does) and, where the toolkit lacks it, the nvrtc that pip's nvidia
# packages ship. Usage: bash tests/cpp/cmake_test.sh [build-dir]
set -euo pipefail
build=${1:+$(realpath -m "$1")}  # a relative build-dir is taken from where the script was called
cd "$(dirname "$0")/../.."
build=${build:-build/cmake}
prefix=$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')
args=(-DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release)
if python -c 'import torch, sys; sys.exit(torch.version.cuda is None)'; then
  CUDA_HOME=${CUDA_HOME:-$(python build_tools/find_cuda.py "$(python -c 'import torch; print(torch.version.cuda)')")}
  args+=(-DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME" -DCUDAToolkit_ROOT="$CUDA_HOME"
         -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" -DTORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}")
  nvrtc=$(python - <<'PY'
import glob, os, torch
site = os.path.dirname(os.path.dirname(torch.__file__))
hits = sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so*")) + glob.glob(os.path.join(site, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*")))
print(next((h for h in hits if "builtins" not in h and ".alt." not in h), ""))
PY
)
  [ -n "$nvrtc" ] && args+=(-DCUDA_nvrtc_LIBRARY="$nvrtc")
fi
cmake -S . -B "$build" "${args[@]}"
cmake --build "$build" -j "${MAX_JOBS:-2}"
ctest --test-dir "$build" --output-on-failure
