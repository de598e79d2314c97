// Device helpers shared by the AdaLN CUDA kernels: row loads/stores in a fixed element-to-thread
// mapping, a deterministic block sum, and the second pass of the two-pass column reductions.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>

#include <cstdint>

namespace rectok {
namespace cuda {

// Element-to-thread mapping of one row of D elements over a block of blockDim.x threads, P elements
// per thread:
//   VEC = true : thread t owns d = t*P + j, j < P, read and written as whole 16-byte (or 8/4-byte)
//                accesses. Requires D % P == 0 and every row start aligned to P elements.
//   VEC = false: thread t owns d = t + j*blockDim.x (coalesced scalar accesses; any D, any alignment).
template <bool VEC, int P>
__device__ __forceinline__ int col_of(int j) {
  return VEC ? int(threadIdx.x) * P + j : int(threadIdx.x) + j * int(blockDim.x);
}

template <int BYTES>
struct RawChunk;
template <>
struct RawChunk<4> { using type = uint32_t; };
template <>
struct RawChunk<8> { using type = uint2; };
template <>
struct RawChunk<16> { using type = uint4; };

// Load P elements of type S starting at p (aligned to min(16, P*sizeof(S)) bytes) as floats.
template <typename S, int P>
__device__ __forceinline__ void load_vec(const S* __restrict__ p, float (&out)[P]) {
  constexpr int BYTES = P * int(sizeof(S));
  constexpr int CHUNK = BYTES >= 16 ? 16 : BYTES;
  using R = typename RawChunk<CHUNK>::type;
  constexpr int K = BYTES / CHUNK;
  static_assert(BYTES % CHUNK == 0, "bad vector width");
  R raw[K];
#pragma unroll
  for (int k = 0; k < K; ++k) raw[k] = reinterpret_cast<const R*>(p)[k];
  const S* e = reinterpret_cast<const S*>(raw);
#pragma unroll
  for (int j = 0; j < P; ++j) out[j] = static_cast<float>(e[j]);
}

template <typename S, int P>
__device__ __forceinline__ void store_vec(S* __restrict__ p, const float (&in)[P]) {
  constexpr int BYTES = P * int(sizeof(S));
  constexpr int CHUNK = BYTES >= 16 ? 16 : BYTES;
  using R = typename RawChunk<CHUNK>::type;
  constexpr int K = BYTES / CHUNK;
  R raw[K];
  S* e = reinterpret_cast<S*>(raw);
#pragma unroll
  for (int j = 0; j < P; ++j) e[j] = static_cast<S>(in[j]);
#pragma unroll
  for (int k = 0; k < K; ++k) reinterpret_cast<R*>(p)[k] = raw[k];
}

// This thread's P elements of a row; missing elements (d >= D) read as 0.
template <typename S, int P, bool VEC>
__device__ __forceinline__ void load_row(const S* __restrict__ row, int D, float (&out)[P]) {
  if (VEC) {
    if (int(threadIdx.x) * P < D) {
      load_vec<S, P>(row + threadIdx.x * P, out);
    } else {
#pragma unroll
      for (int j = 0; j < P; ++j) out[j] = 0.f;
    }
  } else {
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const int d = col_of<VEC, P>(j);
      out[j] = d < D ? static_cast<float>(row[d]) : 0.f;
    }
  }
}

template <typename S, int P, bool VEC>
__device__ __forceinline__ void store_row(S* __restrict__ row, int D, const float (&in)[P]) {
  if (VEC) {
    if (int(threadIdx.x) * P < D) store_vec<S, P>(row + threadIdx.x * P, in);
  } else {
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const int d = col_of<VEC, P>(j);
      if (d < D) row[d] = static_cast<S>(in[j]);
    }
  }
}

// Round a float through S (the reference casts the normalised row to the activation dtype).
template <typename S>
__device__ __forceinline__ float round_through(float v) {
  return static_cast<float>(static_cast<S>(v));
}
template <>
__device__ __forceinline__ float round_through<float>(float v) {
  return v;
}

// Sum of v over the block, returned to every thread. Fixed order (xor-shuffle tree inside each warp,
// then warps in index order), so the result does not depend on scheduling. smem: >= 32 floats.
__device__ __forceinline__ float block_sum(float v, float* smem) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float s = 0.f;
  for (int w = 0; w < nwarps; ++w) s += smem[w];
  return s;
}

// Second pass of a column reduction: out[g, d] = sum_{i < rows} part[(g*rows + i), d], in index order.
template <typename O>
__global__ void sum_partials_kernel(const float* __restrict__ part, int64_t rows, int64_t D, O* __restrict__ out) {
  const int64_t d = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t g = blockIdx.y;
  if (d >= D) return;
  const float* p = part + g * rows * D + d;
  float s = 0.f;
  for (int64_t i = 0; i < rows; ++i) s += p[i * D];
  out[g * D + d] = static_cast<O>(s);
}

// Launch sum_partials_kernel for `groups` groups of `rows` partial rows of width D into out (O = fp32 or bf16).
inline void sum_partials(const at::Tensor& part, int64_t groups, int64_t rows, int64_t D, at::Tensor& out,
                         cudaStream_t stream) {
  const dim3 block(256), grid(static_cast<unsigned>((D + 255) / 256), static_cast<unsigned>(groups));
  if (out.scalar_type() == at::kFloat) {
    sum_partials_kernel<float><<<grid, block, 0, stream>>>(part.data_ptr<float>(), rows, D, out.data_ptr<float>());
  } else {
    sum_partials_kernel<c10::BFloat16><<<grid, block, 0, stream>>>(part.data_ptr<float>(), rows, D,
                                                                   out.data_ptr<c10::BFloat16>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline bool aligned_to(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % uintptr_t(bytes) == 0; }

}  // namespace cuda
}  // namespace rectok
