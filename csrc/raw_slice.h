// The bytes one block of the Hopper decode kernel copies from each quantized
// cache row (csrc/quantized_format.h's layout): host and device work it out
// the same way (cuda/mla_decode_wgmma.cuh stages them, cuda/mla_attention.cu
// sizes the raw stage by the widest slice), and tests/cpp/test_ops.cpp
// checks it against layouts worked out by hand.
#pragma once

#include <c10/macros/Macros.h>

namespace mla_cuda {

// Block `slice` of a cluster of C takes latent columns [slice rc, (slice+1) rc)
// and rope columns [slice pc, (slice+1) pc) of each row. It copies up to
// three runs of whole 16-byte chunks of the row (its codes, the scales of
// the groups they touch, its rope keys; the whole row when C == 1), laid
// end to end in the raw stage, and finds its first code, the scale of its
// first group and its first rope key at code_at, scale_at and rope_at there.
struct RawSlice {
  int first[3], count[3];  // per run: its first chunk in the cache row, and its chunks
  int chunks;              // the runs' chunks together
  int code_at, scale_at, rope_at, first_group;
};

// fp8: codes are bytes (else two channels a byte); rc is even where C > 1.
// Rope keys are 2 bytes each.
C10_HOST_DEVICE inline RawSlice raw_slice(int row_bytes, int scale_offset, int rope_offset, int group, int rc,
                                          int pc, bool fp8, int C, int slice) {
  RawSlice r{};
  if (C == 1) {
    r.count[0] = row_bytes / 16;
    r.chunks = r.count[0];
    r.scale_at = scale_offset;
    r.rope_at = rope_offset;
    return r;
  }
  const int d0 = slice * rc;  // the slice's first latent channel
  const int code_begin = fp8 ? d0 : d0 / 2;
  const int code_bytes = fp8 ? rc : (rc + 1) / 2;
  r.first_group = d0 / group;
  const int last_group = (d0 + rc - 1) / group;
  const int begin[3] = {code_begin, scale_offset + 4 * r.first_group, rope_offset + 2 * slice * pc};
  const int end[3] = {code_begin + code_bytes, scale_offset + 4 * (last_group + 1), begin[2] + 2 * pc};
  int at[3];
  for (int i = 0; i < 3; ++i) {
    r.first[i] = begin[i] / 16;
    r.count[i] = end[i] > begin[i] ? (end[i] + 15) / 16 - r.first[i] : 0;
    at[i] = 16 * r.chunks + begin[i] - 16 * r.first[i];
    r.chunks += r.count[i];
  }
  r.code_at = at[0];
  r.scale_at = at[1];
  r.rope_at = at[2];
  return r;
}

}  // namespace mla_cuda
