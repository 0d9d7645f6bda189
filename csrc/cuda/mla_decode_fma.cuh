// FMA decode kernel of absorbed MLA attention (see mla_attention.cu for the
// method): float32, float16 and bfloat16 caches of any row width, any GPU.
//
// Grid: x = (head chunk, output-column chunk), y = split of the sequence,
// z = sequence. Query rows are the Q*n_h (token, head) pairs of a sequence
// (FlashMLA's trick for several query tokens); a block takes up to kRows (16)
// of them. Each split keeps a running max and sum (online softmax) over tiles
// of TT rows staged in shared memory; the combine kernel of mla_attention.cu
// merges the splits by their log-sum-exp.
//
// 16-bit caches whose rows are whole 16-byte chunks run on the tensor-core
// kernel of mla_decode_mma.cuh instead (sm_80+); this one serves float32,
// other row widths and older GPUs. MLA_DECODE_KERNEL=fma forces it.
#pragma once

#include "common.cuh"
#include "mla_decode.cuh"

namespace mla_cuda {
namespace fma_decode {

template <typename T, int kRows, bool kVectorized>
__global__ void __launch_bounds__(kThreads)
mla_decode_kernel(const T* __restrict__ q_latent, const T* __restrict__ q_rope,
                  const T* __restrict__ cache, const int* __restrict__ block_table,
                  const int* __restrict__ seq_lens, T* __restrict__ out,
                  float* __restrict__ lse, float* __restrict__ part_out,
                  float* __restrict__ part_lse, const Shape p) {
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
          *dst = make_uint4(kNanWord, kNanWord, kNanWord, kNanWord);
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
    const float val = l == 0.f ? 0.f : sum / l;  // no key: zeros; a NaN sum stays NaN
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
      const float v = row_lse(m_s[m], l);
      const int64_t qrow = static_cast<int64_t>(b) * p.M + m0 + m;
      if (single)
        lse[qrow] = v;
      else
        part_lse[(static_cast<int64_t>(b) * p.num_splits + split) * p.M + m0 + m] = v;
    }
  }
}

template <typename T, int kRows, bool kVectorized>
int prepare(size_t smem) {
  return prepare_decode_kernel<T, Shape>(mla_decode_kernel<T, kRows, kVectorized>, kThreads, smem);
}

template <typename T, int kRows, bool kVectorized>
void launch(const DecodeBuffers& buf, const Shape& p, dim3 grid, size_t smem, cudaStream_t stream) {
  launch_decode_kernel<T, Shape>(mla_decode_kernel<T, kRows, kVectorized>, grid, kThreads, smem,
                                 stream, buf, p);
}

}  // namespace fma_decode
}  // namespace mla_cuda

// The FMA kernels of one dtype: every query-row count the host picks (4, 8,
// 16) with and without 16-byte vector loads.
#define MLA_INSTANTIATE_FMA_DECODE(T, ROWS)                                           \
  template int mla_cuda::fma_decode::prepare<T, ROWS, true>(size_t);                  \
  template int mla_cuda::fma_decode::prepare<T, ROWS, false>(size_t);                 \
  template void mla_cuda::fma_decode::launch<T, ROWS, true>(                          \
      const mla_cuda::DecodeBuffers&, const mla_cuda::fma_decode::Shape&, dim3, size_t, \
      cudaStream_t);                                                                  \
  template void mla_cuda::fma_decode::launch<T, ROWS, false>(                         \
      const mla_cuda::DecodeBuffers&, const mla_cuda::fma_decode::Shape&, dim3, size_t, \
      cudaStream_t);
