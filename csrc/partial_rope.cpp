// Out-of-place partial RoPE, the same for every backend: clone, then rotate
// in place with the backend's kernel (csrc/cpu/partial_rope.cpp,
// csrc/cuda/partial_rope.cu), reached through the dispatcher's in-place op.
// It is registered for the CPU and CUDA keys, as the kernels are; its fake
// kernel and autograd formula are in mla_cuda/_ops.py.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "ops.h"

namespace mla_cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> partial_rope_out_of_place(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
    const at::Tensor& rope_freq_idx, const at::Tensor& inv_freq,
    bool inverse) {
  check_rope_args(q, k, positions, rope_freq_idx, inv_freq);
  at::Tensor q_out = q.clone(at::MemoryFormat::Contiguous);
  at::Tensor k_out = k.clone(at::MemoryFormat::Contiguous);
  static auto inplace =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mla_cuda::partial_rope_", "")
          .typed<void(at::Tensor&, at::Tensor&, const at::Tensor&,
                      const at::Tensor&, const at::Tensor&, bool)>();
  inplace.call(q_out, k_out, positions, rope_freq_idx, inv_freq, inverse);
  return {q_out, k_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(mla_cuda, CPU, m) {
  m.impl("partial_rope", &partial_rope_out_of_place);
}

#ifdef MLA_WITH_CUDA
TORCH_LIBRARY_IMPL(mla_cuda, CUDA, m) {
  m.impl("partial_rope", &partial_rope_out_of_place);
}
#endif

}  // namespace mla_cuda
