// C++ test of the op library built by CMakeLists.txt: the ops are found in the
// dispatcher by name and checked against small hand-computed answers.
#include <torch/torch.h>

#include <cmath>
#include <cstdio>

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
  std::printf("%d passed, %d failed\n", checks - failures, failures);
  return failures == 0 ? 0 : 1;
}
