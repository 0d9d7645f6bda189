// Parsing of a quantized cache format name into its row layout
// (csrc/quantized_format.h, docs/ops.md).
#include "quantized_format.h"

#include <c10/util/Exception.h>

namespace mla_cuda {
namespace {

int64_t align_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

}  // namespace

QuantLayout quant_layout(const std::string& cache_format, int64_t R,
                         int64_t rope_bytes) {
  const std::string accepted =
      "\"fp8\", \"int4\", \"fp8-g<N>\" or \"int4-g<N>\" (N channels per scale)";
  QuantLayout l{};
  std::string kind = cache_format, group;
  const auto dash = cache_format.find("-g");
  if (dash != std::string::npos) {
    kind = cache_format.substr(0, dash);
    group = cache_format.substr(dash + 2);
  }
  if (kind == "fp8") l.kind = QuantKind::kFp8;
  else if (kind == "int4") l.kind = QuantKind::kInt4;
  else TORCH_CHECK(false, "mla_cuda: unknown cache_format \"", cache_format,
                   "\"; use ", accepted);
  l.R = R;
  l.group = R;
  if (dash != std::string::npos) {
    TORCH_CHECK(!group.empty() && group.size() < 10 &&
                    group.find_first_not_of("0123456789") == std::string::npos,
                "mla_cuda: cache_format \"", cache_format,
                "\" has no group size after -g; use ", accepted);
    l.group = std::stoll(group);
  }
  TORCH_CHECK(R > 0 && l.group > 0 && R % l.group == 0, "mla_cuda: cache_format \"",
              cache_format, "\" needs groups that divide the latent width R=",
              R, ", got a group of ", l.group);
  TORCH_CHECK(l.kind != QuantKind::kInt4 || l.group % 2 == 0,
              "mla_cuda: int4 packs two channels a byte, so its groups (R=", R,
              " or -g<N>) must be even, got ", l.group);
  l.num_scales = R / l.group;
  l.code_bytes = l.kind == QuantKind::kFp8 ? R : R / 2;
  l.scale_offset = align_up(l.code_bytes, 4);
  l.rope_offset = l.scale_offset + 4 * l.num_scales;
  l.rope_bytes = rope_bytes;
  l.row_bytes = align_up(l.rope_offset + rope_bytes, 16);
  return l;
}

}  // namespace mla_cuda
