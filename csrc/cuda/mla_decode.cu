// Absorbed MLA attention over the paged latent cache (flash-decoding).
//
// Every cache row is [c_kv (R) | rope keys of n_kv heads (2r each)]. The score
// of query row m against a row is q_aug[m] . row, where q_aug[m] is q_latent
// followed by q_rope placed in the slot of m's KV head and zeros elsewhere, so
// one dot product over the whole row serves all heads and the row is read once
// for all of them (MHA2MLA.md 1.4). The output is sum_t p_t * row[0:R].
//
// Grid: x = (head chunk, output-column chunk), y = split of the sequence,
// z = sequence. Query rows are the Q*n_h (token, head) pairs of a sequence
// (FlashMLA's trick for several query tokens); a block takes up to kMaxRows of
// them. Each split keeps a running max and sum (online softmax) over tiles of
// TT rows staged in shared memory, then a combine kernel merges the splits by
// their log-sum-exp. All sizes come from shapes, never from tensor data, so
// the op never syncs with the host and can be captured in a CUDA graph.
//
// 16-bit caches whose rows are whole 16-byte chunks run on the tensor-core
// kernel of mla_decode_mma.cuh instead (sm_80+); this FMA kernel serves
// float32, other row widths and older GPUs. MLA_DECODE_KERNEL=fma forces it
// (tests and benchmarks compare the two).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "../ops.h"
#include "common.cuh"
#include "mla_decode_mma.cuh"

namespace mla_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxSplits = 128;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct DecodeShape {
  int B, Q, n_h, R, rope2, n_kv, D;
  int block_size, max_blocks, num_blocks;
  int M;            // query rows per sequence: Q * n_h
  int rows;         // query rows per block (<= kRows of the instantiation)
  int head_chunks;  // ceil(M / rows)
  int out_cols;     // output columns per block
  int row_stride;   // shared-memory row stride of the staged tile (elements)
  int q_stride;     // shared-memory row stride of q_aug (floats)
  int tile;         // tokens per tile (TT)
  int lanes;        // threads per token in the score phase (TT * lanes = 256)
  int num_splits;
  bool use_red;     // token groups share output columns: merge through smem
  float scale_log2;
};

template <typename T, int kRows, bool kVectorized>
__global__ void __launch_bounds__(kThreads)
mla_decode_kernel(const T* __restrict__ q_latent, const T* __restrict__ q_rope,
                  const T* __restrict__ cache, const int* __restrict__ block_table,
                  const int* __restrict__ seq_lens, T* __restrict__ out,
                  float* __restrict__ lse, float* __restrict__ part_out,
                  float* __restrict__ part_lse, const DecodeShape p) {
  constexpr int V = kVec<T>;
  constexpr int kRowsPad = (kRows + 3) / 4 * 4;
  extern __shared__ __align__(16) unsigned char smem[];
  float* q_s = reinterpret_cast<float*>(smem);                  // [rows][q_stride]
  // Scores/probabilities are [row][token] so the softmax warps (one row,
  // consecutive tokens) read consecutive words: no bank conflicts.
  float* s_s = q_s + kRows * p.q_stride;                         // [kRowsPad][tile]
  float* m_s = s_s + p.tile * kRowsPad;                          // [kRows]
  float* l_s = m_s + kRows;                                      // [kRows]
  float* alpha_s = l_s + kRows;                                  // [kRows]
  float* red_s = alpha_s + kRows;                                // [kRows][out_cols] if use_red
  int64_t* rowoff_s = reinterpret_cast<int64_t*>(red_s + (p.use_red ? kRows * p.out_cols : 0));  // [2][tile]
  T* tile_s = reinterpret_cast<T*>(rowoff_s + 2 * p.tile);  // [2][tile][row_stride]

  const int tid = threadIdx.x;
  const int head_chunk = blockIdx.x % p.head_chunks;
  const int col0 = (blockIdx.x / p.head_chunks) * p.out_cols;
  const int split = blockIdx.y, b = blockIdx.z;
  const int m0 = head_chunk * p.rows;
  const int rows = min(p.rows, p.M - m0);
  const int L = seq_lens[b];
  const int chunk = (L + p.num_splits - 1) / p.num_splits;
  const int t_begin = split * chunk, t_end = min(L, t_begin + chunk);
  const int group = p.n_h / p.n_kv;
  const int cols = min(p.out_cols, p.R - col0);

  // Stage q_aug for this block's rows; rows past `rows` stay zero.
  for (int i = tid; i < kRows * p.q_stride; i += kThreads) {
    const int m = i / p.q_stride, d = i % p.q_stride;
    float v = 0.f;
    if (m < rows) {
      const int mm = m0 + m, h = mm % p.n_h;
      const int64_t qrow = static_cast<int64_t>(b) * p.M + mm;
      if (d < p.R) {
        v = to_float(q_latent[qrow * p.R + d]);
      } else {
        const int rope_off = p.R + (h / group) * p.rope2;
        if (d >= rope_off && d < rope_off + p.rope2)
          v = to_float(q_rope[qrow * p.rope2 + d - rope_off]);
      }
    }
    q_s[i] = v;
  }
  for (int i = tid; i < kRows; i += kThreads) {
    m_s[i] = -INFINITY;
    l_s[i] = 0.f;
  }
  if (p.use_red)
    for (int i = tid; i < kRows * p.out_cols; i += kThreads) red_s[i] = 0.f;

  // Output ownership: thread (dv, grp) owns columns col0 + dv*V .. +V of all
  // rows and accumulates over every tokens_groups-th token of a tile.
  const int n_dv = (cols + V - 1) / V;
  const int token_groups = max(1, kThreads / max(n_dv, 1));
  const int dv = tid % max(n_dv, 1), grp = tid / max(n_dv, 1);
  const bool owns_output = n_dv > 0 && grp < token_groups && dv < n_dv;
  float acc[kRows][V];
#pragma unroll
  for (int m = 0; m < kRows; ++m)
#pragma unroll
    for (int v = 0; v < V; ++v) acc[m][v] = 0.f;

  const int chunks_per_row = p.row_stride / V;  // 16-byte chunks incl. padding
  const int* table = block_table + static_cast<int64_t>(b) * p.max_blocks;

  // Cache offset of each row of a tile (-1: out-of-range table column or
  // block id, rejected by the Python wrapper when it validates; such rows
  // read as NaN, never out of bounds). One table read per row, in parallel,
  // so the copies below have no dependent global loads.
  auto stage_offsets = [&](int buf, int t0) {
    const int n = min(p.tile, t_end - t0);
    for (int t = tid; t < n; t += kThreads) {
      const int pos = t0 + t, col = pos / p.block_size;
      const int blk = col < p.max_blocks ? table[col] : -1;
      rowoff_s[buf * p.tile + t] =
          (blk >= 0 && blk < p.num_blocks)
              ? (static_cast<int64_t>(blk) * p.block_size + pos % p.block_size) * p.D
              : int64_t(-1);
    }
  };
  // Copies a tile's rows into tile buffer `buf` (padding columns zeroed):
  // asynchronous 16-byte copies (cp.async) where rows are aligned.
  auto issue_loads = [&](int buf, int t0) {
    const int n = min(p.tile, t_end - t0);
    T* dst_tile = tile_s + static_cast<int64_t>(buf) * p.tile * p.row_stride;
    const int64_t* offs = rowoff_s + buf * p.tile;
    if constexpr (kVectorized) {
      const int row_chunks = p.D / V;
      for (int i = tid; i < n * chunks_per_row; i += kThreads) {
        const int t = i / chunks_per_row, c = i % chunks_per_row;
        uint4* dst = reinterpret_cast<uint4*>(dst_tile + t * p.row_stride) + c;
        const int64_t off = offs[t];
        if (c >= row_chunks)
          *dst = make_uint4(0, 0, 0, 0);
        else if (off < 0)
          *dst = make_uint4(0x7fc07fc0u, 0x7fc07fc0u, 0x7fc07fc0u, 0x7fc07fc0u);
        else
          copy16_async(dst, reinterpret_cast<const uint4*>(cache + off) + c);
      }
      cp_async_commit();
    } else {
      for (int i = tid; i < n * p.row_stride; i += kThreads) {
        const int t = i / p.row_stride, d = i % p.row_stride;
        const int64_t off = offs[t];
        dst_tile[t * p.row_stride + d] =
            d >= p.D ? from_float<T>(0.f) : off < 0 ? from_float<T>(NAN) : cache[off + d];
      }
    }
  };

  // Double buffering: the rows of tile k+1 are in flight while tile k is used.
  int buf = 0;
  stage_offsets(0, t_begin);
  __syncthreads();  // also orders the q_aug / m / l initialisation above
  if (t_begin < t_end) issue_loads(0, t_begin);
  for (int t0 = t_begin; t0 < t_end; t0 += p.tile, buf ^= 1) {
    const int n = min(p.tile, t_end - t0);
    if (t0 + p.tile < t_end) {
      stage_offsets(buf ^ 1, t0 + p.tile);
      __syncthreads();
      issue_loads(buf ^ 1, t0 + p.tile);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* cur = tile_s + static_cast<int64_t>(buf) * p.tile * p.row_stride;

    // ---- scores: `lanes` threads per token split the row, then reduce ----
    {
      const int t = tid / p.lanes, lane = tid % p.lanes;
      float sc[kRows];
#pragma unroll
      for (int m = 0; m < kRows; ++m) sc[m] = 0.f;
      if (t < n) {
        const T* row = cur + t * p.row_stride;
        const int q_chunks = p.q_stride / V;
        for (int c = lane; c < q_chunks; c += p.lanes) {
          float x[V];
          unpack16<T>(reinterpret_cast<const uint4*>(row)[c], x);
#pragma unroll
          for (int m = 0; m < kRows; ++m) {
            if (m >= rows) break;  // uniform: rows past `rows` are padding
            const float4* qv = reinterpret_cast<const float4*>(q_s + m * p.q_stride + c * V);
#pragma unroll
            for (int v4 = 0; v4 < V / 4; ++v4) {
              const float4 qq = qv[v4];
              sc[m] += qq.x * x[4 * v4] + qq.y * x[4 * v4 + 1] +
                       qq.z * x[4 * v4 + 2] + qq.w * x[4 * v4 + 3];
            }
          }
        }
      }
#pragma unroll
      for (int m = 0; m < kRows; ++m)
        for (int off = p.lanes / 2; off > 0; off /= 2)
          sc[m] += __shfl_xor_sync(0xffffffffu, sc[m], off);
      if (lane == 0 && t < p.tile) {
        const int pos = t0 + t;
#pragma unroll
        for (int m = 0; m < kRows; ++m) {
          // Query token i of Q sits at position L - Q + i: causal mask.
          const int q_pos = L - p.Q + (m0 + m) / p.n_h;
          const bool valid = t < n && m < rows && pos <= q_pos;
          s_s[m * p.tile + t] = valid ? sc[m] * p.scale_log2 : -INFINITY;
        }
      }
    }
    __syncthreads();

    // ---- online softmax: one warp per query row ----
    {
      const int warp = tid / 32, lane = tid % 32;
      for (int m = warp; m < kRows; m += kThreads / 32) {
        float mx = -INFINITY;
        for (int t = lane; t < n; t += 32) mx = fmaxf(mx, s_s[m * p.tile + t]);
        for (int off = 16; off > 0; off /= 2)
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        const float m_old = m_s[m];
        const float m_new = fmaxf(m_old, mx);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        float sum = 0.f;
        for (int t = lane; t < n; t += 32) {
          const float e = exp2f(s_s[m * p.tile + t] - m_use);
          s_s[m * p.tile + t] = e;
          sum += e;
        }
        for (int off = 16; off > 0; off /= 2)
          sum += __shfl_xor_sync(0xffffffffu, sum, off);
        __syncwarp();  // every lane has read m_s[m] before lane 0 rewrites it
        if (lane == 0) {
          const float alpha = exp2f(m_old - m_use);
          alpha_s[m] = alpha;
          l_s[m] = l_s[m] * alpha + sum;
          m_s[m] = m_new;
        }
      }
    }
    __syncthreads();

    // ---- output: acc[m][:] = alpha[m] * acc[m][:] + sum_t p[t][m] * row_t ----
    if (owns_output) {
#pragma unroll
      for (int m = 0; m < kRows; ++m) {
        const float a = alpha_s[m];
#pragma unroll
        for (int v = 0; v < V; ++v) acc[m][v] *= a;
      }
      for (int t = grp; t < n; t += token_groups) {
        float x[V];
        unpack16<T>(*reinterpret_cast<const uint4*>(cur + t * p.row_stride + col0 + dv * V), x);
#pragma unroll
        for (int m = 0; m < kRows; ++m) {
          if (m >= rows) break;
          const float pm = s_s[m * p.tile + t];
#pragma unroll
          for (int v = 0; v < V; ++v) acc[m][v] += pm * x[v];
        }
      }
    }
    __syncthreads();
  }

  // ---- merge the token groups' partial sums, normalise, write ----
  const bool single = p.num_splits == 1;
  auto write = [&](int m, int c, float sum) {
    const float l = l_s[m];
    const float val = l > 0.f ? sum / l : 0.f;
    const int64_t qrow = static_cast<int64_t>(b) * p.M + m0 + m;
    if (single)
      out[qrow * p.R + col0 + c] = from_float<T>(val);
    else
      part_out[((static_cast<int64_t>(b) * p.num_splits + split) * p.M + m0 + m) *
                   p.R + col0 + c] = val;
  };
  if (p.use_red) {
    // Token groups add their partial sums one after another, in a fixed
    // order, so the result is bitwise reproducible (no atomics).
    for (int g = 0; g < token_groups; ++g) {
      if (owns_output && grp == g) {
#pragma unroll
        for (int m = 0; m < kRows; ++m)
#pragma unroll
          for (int v = 0; v < V; ++v)
            if (m < rows && dv * V + v < cols) red_s[m * p.out_cols + dv * V + v] += acc[m][v];
      }
      __syncthreads();
    }
    for (int i = tid; i < rows * cols; i += kThreads)
      write(i / cols, i % cols, red_s[(i / cols) * p.out_cols + i % cols]);
  } else if (owns_output) {  // one token group: each thread owns its columns
#pragma unroll
    for (int m = 0; m < kRows; ++m)
#pragma unroll
      for (int v = 0; v < V; ++v)
        if (m < rows && dv * V + v < cols) write(m, dv * V + v, acc[m][v]);
  }
  if (col0 == 0) {
    for (int m = tid; m < rows; m += kThreads) {
      const float l = l_s[m];
      const float v = l > 0.f ? (m_s[m] + log2f(l)) * kLn2 : -INFINITY;
      const int64_t qrow = static_cast<int64_t>(b) * p.M + m0 + m;
      if (single)
        lse[qrow] = v;
      else
        part_lse[(static_cast<int64_t>(b) * p.num_splits + split) * p.M + m0 + m] = v;
    }
  }
}

// Merges the splits of one (sequence, query row) by their log-sum-exp: the
// split weights are computed by all threads at once (block reductions), then
// each thread sums its output columns over the splits.
template <typename T>
__global__ void mla_combine_kernel(const float* __restrict__ part_out,
                                   const float* __restrict__ part_lse,
                                   T* __restrict__ out, float* __restrict__ lse,
                                   int M, int R, int num_splits) {
  constexpr int kCombineThreads = 128;
  __shared__ float w_s[kMaxSplits];
  __shared__ float red_s[kCombineThreads / 32];
  const int m = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  const int64_t base = static_cast<int64_t>(b) * num_splits * M + m;
  auto block_reduce = [&](float v, bool is_max) {
    for (int off = 16; off > 0; off /= 2) {
      const float o = __shfl_xor_sync(0xffffffffu, v, off);
      v = is_max ? fmaxf(v, o) : v + o;
    }
    __syncthreads();
    if (tid % 32 == 0) red_s[tid / 32] = v;
    __syncthreads();
    v = red_s[0];
    for (int w = 1; w < kCombineThreads / 32; ++w) v = is_max ? fmaxf(v, red_s[w]) : v + red_s[w];
    return v;
  };
  float mx = -INFINITY;
  for (int s = tid; s < num_splits; s += kCombineThreads) mx = fmaxf(mx, part_lse[base + s * M]);
  mx = block_reduce(mx, true);
  float total = 0.f;
  for (int s = tid; s < num_splits; s += kCombineThreads) {
    const float w = mx == -INFINITY ? 0.f : __expf(part_lse[base + s * M] - mx);
    w_s[s] = w;
    total += w;
  }
  total = block_reduce(total, false);  // its barriers also publish w_s
  if (tid == 0) lse[static_cast<int64_t>(b) * M + m] = total > 0.f ? mx + logf(total) : -INFINITY;
  const float inv_total = total > 0.f ? 1.f / total : 0.f;
  for (int c = tid; c < R; c += kCombineThreads) {
    float v = 0.f;
#pragma unroll 4
    for (int s = 0; s < num_splits; ++s)
      if (w_s[s] > 0.f) v += w_s[s] * part_out[(base + s * M) * R + c];
    out[(static_cast<int64_t>(b) * M + m) * R + c] = from_float<T>(v * inv_total);
  }
}


int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Shared memory of one block, in bytes, for the kernel's layout above.
size_t smem_bytes(int rows_template, const DecodeShape& p, int elt) {
  const int rows_pad = round_up(rows_template, 4);
  return sizeof(float) * (static_cast<size_t>(rows_template) * p.q_stride +
                          static_cast<size_t>(p.tile) * rows_pad +
                          3 * rows_template +
                          (p.use_red ? static_cast<size_t>(rows_template) * p.out_cols : 0)) +
         sizeof(int64_t) * 2 * p.tile + 2 * static_cast<size_t>(p.tile) * p.row_stride * elt;
}

// The sizes both decode kernels take from the tensors (their parameter
// structs share these field names).
template <typename S>
void fill_shape(S& s, const at::Tensor& q_latent, const at::Tensor& q_rope, const at::Tensor& cache,
                const at::Tensor& block_table, double scale) {
  s.B = q_latent.size(0);
  s.Q = q_latent.size(1);
  s.n_h = q_latent.size(2);
  s.R = q_latent.size(3);
  s.rope2 = q_rope.size(3);
  s.D = cache.size(2);
  s.n_kv = (s.D - s.R) / s.rope2;
  s.block_size = cache.size(1);
  s.max_blocks = block_table.size(1);
  s.num_blocks = cache.size(0);
  s.M = s.Q * s.n_h;
  s.scale_log2 = static_cast<float>(scale) * kLog2e;
}

template <typename T>
void launch_combine(const at::Tensor& part_out, const at::Tensor& part_lse, at::Tensor& out,
                    at::Tensor& lse, int B, int M, int R, int num_splits, cudaStream_t stream) {
  mla_combine_kernel<T><<<dim3(M, B), 128, 0, stream>>>(
      part_out.data_ptr<float>(), part_lse.data_ptr<float>(), out.data_ptr<T>(),
      lse.data_ptr<float>(), M, R, num_splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Flash-decoding split when the caller leaves it to us: enough blocks for
// two waves of the SMs, no split shorter than one tile, at most kMaxSplits.
int choose_splits(int base_blocks, int num_sms, int max_len, int tile) {
  const int want = (2 * num_sms + base_blocks - 1) / base_blocks;
  const int useful = std::max(1, (max_len + tile - 1) / tile);
  return std::max(1, std::min({want, useful, kMaxSplits}));
}

// ---- tensor-core path ----

// Configurations of the mma kernel, tried in order: warps over output
// columns (WC), warp groups over tokens (WT), and the most 16-wide k steps
// (KQ) and 8-wide output tiles (KN) one warp keeps in registers. The first
// that holds the shape wins: SmolLM2-size latents take 4 independent token
// groups of one warp each; DeepSeek-size (576/512) 4 x 2; Llama-2-7B's
// 2560/2048 spreads one token group over 8 warps. (16 warps of half the
// registers each spilled and ran 1.91 ms against 1.24 ms at 7B d_kv=64,
// 64 x 4096 on an H200.) MLA_DECODE_KERNEL=mma:<index> forces a
// configuration that holds the shape, for benchmarks.
struct MmaConfig { int wc, wt, kq, kn; };
constexpr MmaConfig kMmaConfigs[] = {{1, 4, 8, 12}, {1, 4, 16, 16}, {4, 2, 16, 16}, {8, 1, 20, 32}};

size_t mma_smem_bytes(const MmaConfig& c, int row_stride, int elt) {
  return 2 * static_cast<size_t>(16 * c.wt) * row_stride * elt +
         sizeof(float) * ((c.wc > 1 ? c.wt * c.wc * 32 * 8 : 0) + c.wt * 16 * 2);
}

bool mma_decode_allowed(const at::Tensor& q_latent, const at::Tensor& cache) {
  const char* choice = std::getenv("MLA_DECODE_KERNEL");
  if (choice != nullptr && std::strcmp(choice, "fma") == 0) return false;
  if (q_latent.scalar_type() != at::kHalf && q_latent.scalar_type() != at::kBFloat16) return false;
  if (cache.size(2) % 8 != 0 || !is_aligned16(cache.data_ptr())) return false;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q_latent.get_device()));
  return major >= 8;
}

template <typename T, int WC, int WT, int KQ, int KN>
void launch_mma_decode(mma_decode::Shape s, const at::Tensor& q_latent, const at::Tensor& q_rope,
                       const at::Tensor& cache, const at::Tensor& block_table,
                       const at::Tensor& seq_lens, int num_splits, at::Tensor& out,
                       at::Tensor& lse, int num_sms) {
  constexpr MmaConfig cfg{WC, WT, KQ, KN};
  auto kernel = mma_decode::mla_decode_mma_kernel<T, WC, WT, KQ, KN>;
  const size_t smem = mma_smem_bytes(cfg, s.row_stride, sizeof(T));
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const int m_tiles = (s.M + 15) / 16;
  if (num_splits <= 0) {
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, 32 * WC * WT, smem));
    // One wave: every block of a sequence does the same work, so a second,
    // partial wave would leave most SMs idle while it runs (ncu: 2.06 waves
    // at SmolLM2 64 x 4096 before).
    const int capacity = num_sms * std::max(per_sm, 1), base = s.B * m_tiles;
    const int useful = std::max(1, (s.max_blocks * s.block_size + 16 * WT - 1) / (16 * WT));
    num_splits = std::max(1, std::min({capacity / base, useful, kMaxSplits}));
  }
  s.num_splits = num_splits;
  at::Tensor part_out, part_lse;
  if (num_splits > 1) {  // caching allocator: capturable (graph-private pool)
    part_out = at::empty({s.B, num_splits, s.M, s.R}, q_latent.options().dtype(at::kFloat));
    part_lse = at::empty({s.B, num_splits, s.M}, q_latent.options().dtype(at::kFloat));
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  kernel<<<dim3(m_tiles, num_splits, s.B), 32 * WC * WT, smem, stream>>>(
      q_latent.data_ptr<T>(), q_rope.data_ptr<T>(), cache.data_ptr<T>(),
      block_table.data_ptr<int>(), seq_lens.data_ptr<int>(), out.data_ptr<T>(),
      lse.data_ptr<float>(), num_splits > 1 ? part_out.data_ptr<float>() : nullptr,
      num_splits > 1 ? part_lse.data_ptr<float>() : nullptr, s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (num_splits > 1) launch_combine<T>(part_out, part_lse, out, lse, s.B, s.M, s.R, num_splits, stream);
}

// Runs the tensor-core kernel if a configuration holds the shape; false
// leaves the call to the FMA kernel.
bool try_mma_decode(const at::Tensor& q_latent, const at::Tensor& q_rope, const at::Tensor& cache,
                    const at::Tensor& block_table, const at::Tensor& seq_lens, double scale,
                    int64_t num_splits, at::Tensor& out, at::Tensor& lse, int num_sms) {
  if (!mma_decode_allowed(q_latent, cache)) return false;
  mma_decode::Shape s{};
  fill_shape(s, q_latent, q_rope, cache, block_table, scale);
  s.k_steps = (s.D + 15) / 16;
  s.row_stride = s.k_steps * 16 + 8;
  int smem_limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        q_latent.get_device()));
  const int out_tiles = (s.R + 7) / 8;
  const char* choice = std::getenv("MLA_DECODE_KERNEL");
  const int forced = choice != nullptr && std::strncmp(choice, "mma:", 4) == 0 ? std::atoi(choice + 4) : -1;
  int chosen = -1;
  for (int i = 0; i < static_cast<int>(std::size(kMmaConfigs)) && chosen < 0; ++i) {
    if (forced >= 0 && i != forced) continue;
    const MmaConfig& c = kMmaConfigs[i];
    const int kq = (s.k_steps + c.wc - 1) / c.wc;
    const int kn = round_up((out_tiles + c.wc - 1) / c.wc, 2);
    if (kq <= c.kq && kn <= c.kn && mma_smem_bytes(c, s.row_stride, q_latent.element_size()) <= static_cast<size_t>(smem_limit)) {
      chosen = i;
      s.kq = kq;
      s.kn = kn;
    }
  }
  if (chosen < 0) return false;
  const int splits = static_cast<int>(num_splits);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    switch (chosen) {
      case 0: launch_mma_decode<T, 1, 4, 8, 12>(s, q_latent, q_rope, cache, block_table, seq_lens, splits, out, lse, num_sms); break;
      case 1: launch_mma_decode<T, 1, 4, 16, 16>(s, q_latent, q_rope, cache, block_table, seq_lens, splits, out, lse, num_sms); break;
      case 2: launch_mma_decode<T, 4, 2, 16, 16>(s, q_latent, q_rope, cache, block_table, seq_lens, splits, out, lse, num_sms); break;
      default: launch_mma_decode<T, 8, 1, 20, 32>(s, q_latent, q_rope, cache, block_table, seq_lens, splits, out, lse, num_sms); break;
    }
  };
  if (q_latent.scalar_type() == at::kHalf) run(c10::Half{});
  else run(c10::BFloat16{});
  return true;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mla_attention_cuda(
    const at::Tensor& q_latent, const at::Tensor& q_rope,
    const at::Tensor& latent_cache, const at::Tensor& block_table,
    const at::Tensor& seq_lens, double scale, int64_t num_splits) {
  check_attention_args(q_latent, q_rope, latent_cache, block_table, seq_lens);
  const c10::cuda::OptionalCUDAGuard guard(q_latent.device());
  DecodeShape p{};
  fill_shape(p, q_latent, q_rope, latent_cache, block_table, scale);
  at::Tensor out = at::empty_like(q_latent);
  at::Tensor lse = at::empty({p.B, p.Q, p.n_h}, q_latent.options().dtype(at::kFloat));
  if (p.B == 0) return {out, lse};
  int num_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount,
                                        q_latent.get_device()));
  TORCH_CHECK(num_splits <= kMaxSplits, "mla_cuda: num_splits is at most ",
              kMaxSplits, ", got ", num_splits);
  if (try_mma_decode(q_latent, q_rope, latent_cache, block_table, seq_lens, scale,
                     num_splits, out, lse, num_sms))
    return {out, lse};

  const int elt = q_latent.element_size();
  const int V = 16 / elt;
  const bool vectorized = p.D % V == 0 && is_aligned16(latent_cache.data_ptr());
  // Rows of the staged tile and of q_aug padded to whole 16-byte chunks; an
  // odd number of chunks per tile row keeps 8 threads reading 8 rows free of
  // shared-memory bank conflicts.
  p.q_stride = round_up(p.D, V);
  p.row_stride = p.q_stride + ((p.q_stride / V) % 2 == 0 ? V : 0);
  p.out_cols = std::min(p.R, kThreads * V);
  {  // A single token group (n_dv > kThreads/2 in every column chunk) needs no merge.
    const int last = p.R - (p.R - 1) / p.out_cols * p.out_cols;
    const int n_dv_full = (p.out_cols + V - 1) / V, n_dv_last = (last + V - 1) / V;
    p.use_red = !(n_dv_full > kThreads / 2 && n_dv_last > kThreads / 2);
  }

  // Query rows per block (up to 16, balanced over head chunks) and tokens per
  // tile (256 / lanes): the most rows, then the largest tile, that fit.
  constexpr size_t kSmemBudget = 200 * 1024;
  int rows_template = 16;
  for (int rows_cap = std::min(p.M, 16);; rows_cap = (rows_cap + 1) / 2) {
    p.head_chunks = (p.M + rows_cap - 1) / rows_cap;
    p.rows = (p.M + p.head_chunks - 1) / p.head_chunks;
    rows_template = p.rows <= 4 ? 4 : p.rows <= 8 ? 8 : 16;
    for (p.lanes = 1;; p.lanes *= 2) {
      p.tile = kThreads / p.lanes;
      if (smem_bytes(rows_template, p, elt) <= kSmemBudget || p.lanes == 32) break;
    }
    if (smem_bytes(rows_template, p, elt) <= kSmemBudget || rows_cap == 1) break;
  }
  const size_t smem = smem_bytes(rows_template, p, elt);
  TORCH_CHECK(smem <= kSmemBudget, "mla_cuda: a cache row of ", p.D,
              " values is too wide for the decode kernel's shared memory");
  const int col_chunks = (p.R + p.out_cols - 1) / p.out_cols;

  const int max_len = p.max_blocks * p.block_size;  // a bound, known on host
  if (num_splits <= 0) {
    num_splits = choose_splits(p.B * p.head_chunks * col_chunks, num_sms, max_len, p.tile);
  }
  p.num_splits = static_cast<int>(num_splits);

  at::Tensor part_out, part_lse;
  if (p.num_splits > 1) {
    // From the caching allocator: inside CUDA-graph capture this comes from
    // the graph's private pool, so the op stays capturable.
    part_out = at::empty({p.B, p.num_splits, p.M, p.R}, q_latent.options().dtype(at::kFloat));
    part_lse = at::empty({p.B, p.num_splits, p.M}, q_latent.options().dtype(at::kFloat));
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(p.head_chunks * col_chunks, p.num_splits, p.B);
  MLA_DISPATCH_FLOAT_TYPES(
      q_latent.scalar_type(), "mla_decode_cuda", [&] {
        auto launch = [&](auto kernel) {
          if (smem > 48 * 1024)
            C10_CUDA_CHECK(cudaFuncSetAttribute(
                kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
          kernel<<<grid, kThreads, smem, stream>>>(
              q_latent.data_ptr<scalar_t>(), q_rope.data_ptr<scalar_t>(),
              latent_cache.data_ptr<scalar_t>(), block_table.data_ptr<int>(),
              seq_lens.data_ptr<int>(), out.data_ptr<scalar_t>(),
              lse.data_ptr<float>(),
              p.num_splits > 1 ? part_out.data_ptr<float>() : nullptr,
              p.num_splits > 1 ? part_lse.data_ptr<float>() : nullptr, p);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        auto by_rows = [&](auto vec_tag) {
          constexpr bool kV = decltype(vec_tag)::value;
          if (rows_template == 4) launch(mla_decode_kernel<scalar_t, 4, kV>);
          else if (rows_template == 8) launch(mla_decode_kernel<scalar_t, 8, kV>);
          else launch(mla_decode_kernel<scalar_t, 16, kV>);
        };
        if (vectorized) by_rows(std::true_type{});
        else by_rows(std::false_type{});
        if (p.num_splits > 1)
          launch_combine<scalar_t>(part_out, part_lse, out, lse, p.B, p.M, p.R, p.num_splits, stream);
      });
  return {out, lse};
}

TORCH_LIBRARY_IMPL(mla_cuda, CUDA, m) {
  m.impl("mla_attention", &mla_attention_cuda);
}

}  // namespace mla_cuda
