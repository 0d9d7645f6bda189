// C++ test of the op library built by CMakeLists.txt: the ops are found in the
// dispatcher by name and checked against small hand-computed answers.
#include <torch/torch.h>

#include <cmath>
#include <cstdio>

#include "../../csrc/raw_slice.h"
#include "../../csrc/split_choice.h"

namespace {

int checks = 0, failures = 0;

void expect(bool ok, const char* what) {
  std::printf("%s: %s\n", ok ? "ok" : "FAIL", what);
  ++checks;
  if (!ok) ++failures;
}

c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

}  // namespace

int main() {
  // One sequence of two tokens, latent R=2, one KV head with 2r=2 rope dims.
  // Query latent (1, 0) and rope (0, 0): scores are c[:,0] * scale.
  auto cache = torch::full({1, 4, 4}, NAN);
  auto c_kv = torch::tensor({{1.f, 2.f}, {3.f, 4.f}});
  auto k_rope = torch::zeros({2, 1, 2});
  auto slots = torch::tensor({0, 1}, torch::kLong);
  op("mla_cuda::latent_cache_append")
      .typed<void(const at::Tensor&, const at::Tensor&, at::Tensor&, const at::Tensor&,
                  const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                  const std::optional<at::Tensor>&)>()
      .call(c_kv, k_rope, cache, slots, std::nullopt, std::nullopt, std::nullopt);
  expect(cache[0][1][1].item<float>() == 4.f, "append writes the latent row");
  expect(std::isnan(cache[0][2][0].item<float>()), "append leaves other slots alone");

  auto q_latent = torch::tensor({1.f, 0.f}).view({1, 1, 1, 2});
  auto q_rope = torch::zeros({1, 1, 1, 2});
  auto table = torch::zeros({1, 1}, torch::kInt);
  auto lens = torch::tensor({2}, torch::kInt);
  auto [out, lse] = op("mla_cuda::mla_attention")
                        .typed<std::tuple<at::Tensor, at::Tensor>(
                            const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, double, int64_t)>()
                        .call(q_latent, q_rope, cache, table, lens, 1.0, 0);
  const double p1 = 1 / (1 + std::exp(-2.0));  // softmax of scores (1, 3)
  const double want = (1 - p1) * 1 + p1 * 3;
  expect(std::abs(out.flatten()[0].item<float>() - want) < 1e-5, "attention output");
  expect(std::abs(lse.item<float>() - std::log(std::exp(1.0) + std::exp(3.0))) < 1e-5, "attention lse");

  bool threw = false;
  try {
    op("mla_cuda::mla_attention")
        .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&, const at::Tensor&, double, int64_t)>()
        .call(q_latent, q_rope, cache, table, torch::tensor({9}, torch::kInt), 1.0, 0);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("capacity") != std::string::npos;
  }
  expect(threw, "seq_len over the block table raises a clear c10::Error");

  // Out-of-place partial RoPE: the pair (1, 0) turns by positions * inv_freq
  // = 1 radian into (cos 1, sin 1); the input stays as it was.
  auto q = torch::tensor({1.f, 0.f}).view({1, 1, 2});
  auto k = q.clone();
  auto [q_rot, k_rot] = op("mla_cuda::partial_rope")
                            .typed<std::tuple<at::Tensor, at::Tensor>(
                                const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, bool)>()
                            .call(q, k, torch::tensor({1}, torch::kLong),
                                  torch::zeros({1, 1}, torch::kLong), torch::ones({1}), false);
  expect(std::abs(q_rot[0][0][0].item<float>() - std::cos(1.f)) < 1e-6 &&
             std::abs(k_rot[0][0][1].item<float>() - std::sin(1.f)) < 1e-6,
         "partial_rope rotates a copy");
  expect(q[0][0][1].item<float>() == 0.f, "partial_rope leaves its input alone");

  // The flash-decoding split (blocks per split, resident blocks, longest
  // sequence, tokens a tile), against the counts worked out by hand.
  using mla_cuda::choose_num_splits;
  expect(choose_num_splits(64, 132, 4096, 64) == 2, "split: 64 sequences on 132 SMs fill one wave with 2");
  expect(choose_num_splits(1, 132, 32768, 64) == mla_cuda::kMaxSplits, "split: one long sequence takes the most");
  expect(choose_num_splits(1, 132, 100, 64) == 2, "split: no split shorter than a tile");
  expect(choose_num_splits(256, 132, 2048, 64) == 1, "split: two whole waves stay one split");
  // Clusters of 4 with 30 resident: 16 sequences (64 blocks) of 32k run 9
  // splits in 5 waves, not one split on 16 of the 30 clusters; 64 of 4k run 2.
  expect(choose_num_splits(64, 120, 32768, 64) == 9, "split: a half-empty wave takes more, shorter splits");
  expect(choose_num_splits(256, 120, 4096, 64) == 2, "split: a nearly empty last wave is filled");
  expect(choose_num_splits(0, 0, 0, 64) == 1, "split: an empty call takes one");

  // The bytes a Hopper block copies from a quantized row (row bytes, scale
  // and rope offsets, group, latent and rope columns of the slice, fp8,
  // cluster, slice), against layouts worked out by hand.
  using mla_cuda::raw_slice;
  auto same = [](const mla_cuda::RawSlice& r, int chunks, int code_at, int scale_at, int rope_at) {
    return r.chunks == chunks && r.code_at == code_at && r.scale_at == scale_at && r.rope_at == rope_at;
  };
  // Llama-3-8B-like fp8 rows in one block: 512 codes, a scale at 512, 128
  // rope keys at 516, 784 bytes: the whole row.
  expect(same(raw_slice(784, 512, 516, 512, 512, 128, true, 1, 0), 49, 0, 512, 516) &&
             raw_slice(784, 512, 516, 512, 512, 128, true, 1, 0).count[0] == 49,
         "raw slice: one block copies the whole row");
  // Llama-2-7B d_kv=64 fp8 rows (2048 codes, a scale at 2048, 512 rope keys
  // at 2052, 3088 bytes) in a cluster of 4, block 1: codes 512-1023 (chunks
  // 32-63), the scale's chunk 128, rope keys 128-255 at bytes 2308-2563
  // (chunks 144-160, the first key 4 bytes into chunk 144).
  {
    const mla_cuda::RawSlice r = raw_slice(3088, 2048, 2052, 2048, 512, 128, true, 4, 1);
    expect(same(r, 50, 0, 512, 532) && r.first[0] == 32 && r.count[0] == 32 && r.first[1] == 128 &&
               r.count[1] == 1 && r.first[2] == 144 && r.count[2] == 17,
           "raw slice: fp8 codes, scale and rope keys of block 1 of 4");
  }
  // int4 rows of R = 1024 (512 code bytes, a scale at 512, 12 rope keys at
  // 516, 544 bytes) in a cluster of 2, block 1: code bytes 256-511, the
  // scale's chunk 32, rope keys 6-11 at bytes 528-539 (chunk 33).
  {
    const mla_cuda::RawSlice r = raw_slice(544, 512, 516, 1024, 512, 6, false, 2, 1);
    expect(same(r, 18, 0, 256, 272) && r.first[0] == 16 && r.count[0] == 16 && r.first[2] == 33,
           "raw slice: int4 codes and a rope slice of 6 keys");
  }
  // Groups of 128 channels (8 scales at 1024) in a cluster of 2, block 1:
  // groups 4-7, scale bytes 1040-1055 (chunk 65), the first group 4.
  {
    const mla_cuda::RawSlice r = raw_slice(1088, 1024, 1056, 128, 512, 8, true, 2, 1);
    expect(same(r, 34, 0, 512, 528) && r.first_group == 4 && r.first[1] == 65 && r.count[1] == 1,
           "raw slice: the scales of the block's groups only");
  }
  std::printf("%d passed, %d failed\n", checks - failures, failures);
  return failures == 0 ? 0 : 1;
}
