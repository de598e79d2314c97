// Device helpers shared by the AdaLN CUDA kernels: 16-byte chunks held as raw registers, the row-group
// sum, the cross-group column sum through shared memory, and the finish kernel of the column sums.
// Every reduction adds in a fixed order that depends on the shape only (deterministic, no atomics).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "adaln_kernels.h"
#include "adaln_launch.h"

namespace rectok {
namespace cuda {

using bf16 = __nv_bfloat16;

template <typename S>
__device__ __forceinline__ float to_float(S v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<bf16>(bf16 v) { return __bfloat162float(v); }

template <typename S>
__device__ __forceinline__ S from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ bf16 from_float<bf16>(float v) { return __float2bfloat16_rn(v); }

// Round a float through S (the reference casts the normalised row to the activation dtype).
template <typename S>
__device__ __forceinline__ float round_through(float v) { return to_float<S>(from_float<S>(v)); }

template <int BYTES>
struct WordOf;
template <>
struct WordOf<8> { using type = uint2; };
template <>
struct WordOf<16> { using type = uint4; };
template <>
struct WordOf<32> { using type = uint4; };

// E consecutive elements of S kept as raw words until used (bf16 stays packed: half the registers).
template <typename S, int E>
struct Pack {
  static constexpr int kBytes = E * int(sizeof(S));
  using W = typename WordOf<kBytes>::type;
  static constexpr int kWords = kBytes / int(sizeof(W));
  W w[kWords];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int k = 0; k < kWords; ++k) w[k] = W{};
  }
  __device__ __forceinline__ float get(int j) const { return to_float<S>(reinterpret_cast<const S*>(w)[j]); }
  __device__ __forceinline__ void set(int j, float v) { reinterpret_cast<S*>(w)[j] = from_float<S>(v); }

  // Elements p[0 .. valid) (valid may exceed E; <= 0 loads nothing); the rest read as 0.
  // VEC: p is aligned and valid is either <= 0 or >= E.
  template <bool VEC>
  __device__ __forceinline__ void load(const S* __restrict__ p, int valid) {
    if (VEC) {
      if (valid > 0) {
#pragma unroll
        for (int k = 0; k < kWords; ++k) w[k] = reinterpret_cast<const W*>(p)[k];
      } else {
        zero();
      }
    } else {
      S* e = reinterpret_cast<S*>(w);
#pragma unroll
      for (int j = 0; j < E; ++j) e[j] = j < valid ? p[j] : from_float<S>(0.f);
    }
  }
  template <bool VEC>
  __device__ __forceinline__ void store(S* __restrict__ p, int valid) const {
    if (VEC) {
      if (valid > 0) {
#pragma unroll
        for (int k = 0; k < kWords; ++k) reinterpret_cast<W*>(p)[k] = w[k];
      }
    } else {
      const S* e = reinterpret_cast<const S*>(w);
#pragma unroll
      for (int j = 0; j < E; ++j)
        if (j < valid) p[j] = e[j];
    }
  }
};

// Where a thread's k-th chunk of a row starts, and how many of its elements exist.
struct RowSlot {
  int group, lane, groups, tpr;
  __device__ __forceinline__ RowSlot(int tpr_) : tpr(tpr_) {
    group = int(threadIdx.x) / tpr_;
    lane = int(threadIdx.x) - group * tpr_;
    groups = int(blockDim.x) / tpr_;
  }
  template <int E>
  __device__ __forceinline__ int col(int k) const { return (lane + k * tpr) * E; }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;  // the xor tree leaves the same bits in every lane
}

// Sum of v over the tpr threads of this row group. Must be reached by every thread of the block
// (it synchronises the block when a row spans several warps). red: >= blockDim.x / 32 floats.
__device__ __forceinline__ float group_sum(float v, int tpr, float* red) {
  v = warp_sum(v);
  if (tpr == launch::kWarp) return v;
  const int warp = int(threadIdx.x) >> 5, per_group = tpr >> 5, first = (warp / per_group) * per_group;
  if ((threadIdx.x & 31) == 0) red[warp] = v;
  __syncthreads();
  float s = 0.f;
  for (int i = 0; i < per_group; ++i) s += red[first + i];
  __syncthreads();  // red is rewritten by the next call
  return s;
}

// acc (CPT x E per thread) summed over the row groups of the block into group 0, in group order.
// buf: >= tpr * CPT * E floats of shared memory. Every thread of the block must call it.
template <int CPT, int E>
__device__ __forceinline__ void sum_over_groups(float (&acc)[CPT][E], const RowSlot& s, float* buf) {
  for (int g = 1; g < s.groups; ++g) {
    if (s.group == g) {
#pragma unroll
      for (int k = 0; k < CPT; ++k)
#pragma unroll
        for (int j = 0; j < E; ++j) buf[(k * E + j) * s.tpr + s.lane] = acc[k][j];
    }
    __syncthreads();
    if (s.group == 0) {
#pragma unroll
      for (int k = 0; k < CPT; ++k)
#pragma unroll
        for (int j = 0; j < E; ++j) acc[k][j] += buf[(k * E + j) * s.tpr + s.lane];
    }
    __syncthreads();
  }
}

// Group 0 writes its column sums as one fp32 partial row.
template <int CPT, int E, bool VEC>
__device__ __forceinline__ void store_partial(const float (&acc)[CPT][E], const RowSlot& s, float* __restrict__ row,
                                              int D) {
  if (s.group != 0) return;
#pragma unroll
  for (int k = 0; k < CPT; ++k) {
    const int col = s.col<E>(k);
    Pack<float, E> p;
#pragma unroll
    for (int j = 0; j < E; ++j) p.set(j, acc[k][j]);
    p.template store<VEC>(row + col, D - col);
  }
}

__device__ __forceinline__ void store_as(void* p, int64_t i, float v, bool as_bf16) {
  if (as_bf16) static_cast<bf16*>(p)[i] = __float2bfloat16_rn(v);
  else static_cast<float*>(p)[i] = v;
}

// Second pass of the column sums, for nch partial rows per sample (rows b*nch .. b*nch+nch-1):
//   S1_b[d] = sum_c pw[b*nch + c, d],  S0_b[d] = sum_c ps[b*nch + c, d]   (c in index order)
//   ds1[b, d] = w[d] * S1_b[d]                     (when ds1: the per-sample scale gradient)
//   ds0[b, d] = S0_b[d]                            (when ds0: per-sample shift / gate gradient)
//   dweight[d] = sum_b coef_b[d] * S1_b[d], coef = 1 + scale[b, d] when scale, else 1 (when dweight)
// Block: kFinishCols columns x kFinishSlices slices; slice t takes samples t, t + slices, ... and the
// slices are added in slice order: the result depends on the shape only.
template <typename M>
__global__ void __launch_bounds__(launch::kFinishCols* launch::kFinishSlices, 1)
finish_kernel(const float* __restrict__ pw, const float* __restrict__ ps, int64_t nch, int64_t B, int D,
              const M* __restrict__ scale, int64_t sc_sb, const float* __restrict__ w, void* dweight,
              bool dweight_bf16, void* ds1, bool ds1_bf16, void* ds0, bool ds0_bf16) {
  __shared__ float part[launch::kFinishSlices][launch::kFinishCols + 1];
  const int tx = int(threadIdx.x) % launch::kFinishCols, ty = int(threadIdx.x) / launch::kFinishCols;
  const int d = int(blockIdx.x) * launch::kFinishCols + tx;
  float acc = 0.f;
  if (d < D) {
    const float wd = ds1 != nullptr ? w[d] : 0.f;
    for (int64_t b = ty; b < B; b += launch::kFinishSlices) {
      // kFinishBatch partial rows of both buffers are requested before any is added (the blocks are few,
      // so each thread must keep several loads in flight). The row index is clamped to the last row, so
      // every load is unconditional and valid; a row past the end is loaded again but never added. A
      // missing buffer reads the other one (never added either). The adds run in index order c = 0, 1,
      // ..., exactly the order of a plain loop, so the sums are bitwise those of one.
      const float* p1 = pw != nullptr ? pw + b * nch * D + d : nullptr;
      const float* p0 = ps != nullptr ? ps + b * nch * D + d : nullptr;
      const float* q1 = p1 != nullptr ? p1 : p0;
      const float* q0 = p0 != nullptr ? p0 : p1;
      const float coef = (p1 != nullptr && scale != nullptr) ? 1.f + to_float<M>(scale[b * sc_sb + d]) : 1.f;
      const int last = int(nch) - 1;  // nch * D < 2^31: the rows of one sample, offsets fit an int
      float s1 = 0.f, s0 = 0.f;
      for (int c0 = 0; c0 <= last; c0 += launch::kFinishBatch) {
        float v1[launch::kFinishBatch], v0[launch::kFinishBatch];
#pragma unroll
        for (int i = 0; i < launch::kFinishBatch; ++i) {
          const int c = c0 + i < last ? c0 + i : last;
          v1[i] = q1[c * D];
          v0[i] = q0[c * D];
        }
#pragma unroll
        for (int i = 0; i < launch::kFinishBatch; ++i) {
          if (c0 + i <= last) {
            s1 += v1[i];
            s0 += v0[i];
          }
        }
      }
      if (p1 != nullptr) {
        acc += coef * s1;
        if (ds1 != nullptr) store_as(ds1, b * D + d, wd * s1, ds1_bf16);
      }
      if (p0 != nullptr) store_as(ds0, b * D + d, s0, ds0_bf16);
    }
  }
  if (dweight == nullptr) return;  // uniform over the block
  part[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && d < D) {
    float s = 0.f;
#pragma unroll 8
    for (int t = 0; t < launch::kFinishSlices; ++t) s += part[t][tx];
    store_as(dweight, d, s, dweight_bf16);
  }
}

inline bool aligned_to(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % uintptr_t(bytes) == 0; }

}  // namespace cuda
}  // namespace rectok
