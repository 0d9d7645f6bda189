// How many flash-decoding splits a decode call takes when the caller leaves
// it to the op: host code only, shared by the CUDA kernels' launchers
// (cuda/split_combine.cuh) and tested by tests/cpp/test_ops.cpp.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

namespace mla_cuda {

// Most splits of one sequence: the combine kernel keeps one weight per split
// in shared memory.
constexpr int kMaxSplits = 128;

// A block's fixed cost in tiles of its work: start, q staging, the pipeline's
// fill and drain, its partial writes and their share of the merge. On an
// H100, Hopper's 64-token tiles at Llama-3-8B-like rows take about 3.3 us
// each and the fixed part of a call about 50 us.
constexpr int kFixedTiles = 8;

// The flash-decoding split when the caller leaves it to the op. A block
// costs its share of the sequence (ceil(tiles / s) tiles of `tile` tokens of
// the longest sequence the block table holds) plus kFixedTiles, and a call
// costs that times its waves of resident blocks; the split minimizes the
// product, the fewest splits among equal costs, at most kMaxSplits and no
// split shorter than one tile. With fewer blocks than the GPU holds that is
// the most splits that fit one wave; where one wave would leave many SMs
// idle or a last wave is nearly empty, more waves of shorter splits cost
// less (16 sequences of 32k in clusters of 4, 30 clusters resident: one split
// fills 16 of the 30 for a whole sequence, 9 splits run 5 waves of a ninth).
inline int choose_num_splits(int blocks_per_split, int resident_blocks, int max_len, int tile) {
  const int64_t tiles = std::max(1, (max_len + tile - 1) / tile);
  const int64_t blocks = std::max(blocks_per_split, 1), resident = std::max(resident_blocks, 1);
  int best = 1;
  int64_t best_cost = std::numeric_limits<int64_t>::max();
  for (int s = 1; s <= std::min<int64_t>(tiles, kMaxSplits); ++s) {
    const int64_t waves = (blocks * s + resident - 1) / resident;
    const int64_t cost = waves * ((tiles + s - 1) / s + kFixedTiles);
    if (cost < best_cost) best = s, best_cost = cost;
  }
  return best;
}

}  // namespace mla_cuda
