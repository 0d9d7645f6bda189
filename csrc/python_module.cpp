// The Python extension module mla_cuda._C. Importing it loads this library,
// whose static initialisers register the ops (csrc/torch_bindings.cpp and the
// backend files). It also tells what the library was built with, so that
// mla_cuda can explain a mismatch in one line instead of crashing, and, in a
// CUDA build, selects the decode kernel by name (tests, benchmarks).
#include <torch/extension.h>

#include "ops.h"

#ifndef MLA_TORCH_VERSION
#define MLA_TORCH_VERSION "unknown"
#endif
#ifndef MLA_CUDA_ARCHS
#define MLA_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "mla_cuda compiled ops (see torch.ops.mla_cuda)";
  m.def("build_info", [] {
    pybind11::dict info;
    info["torch_version"] = MLA_TORCH_VERSION;
#ifdef MLA_WITH_CUDA
    info["with_cuda"] = true;
    info["cuda_archs"] = MLA_CUDA_ARCHS;
#else
    info["with_cuda"] = false;
    info["cuda_archs"] = "";
#endif
    return info;
  });
#ifdef MLA_WITH_CUDA
  m.def("decode_kernel_names", &mla_cuda::decode_kernel_names,
        "names set_decode_kernel and MLA_DECODE_KERNEL take");
  m.def("decode_kernel", &mla_cuda::decode_kernel, "the decode kernel CUDA attention runs on");
  m.def("set_decode_kernel", &mla_cuda::set_decode_kernel, pybind11::arg("name"),
        "run the CUDA attention calls that follow on this decode kernel");
#endif
}
