// Launch configuration of the AdaLN CUDA kernels, in one place.
//
// Plain C++ (no CUDA, no ATen): the binding (adaln.cpp) sizes grids and scratch buffers with it, the
// kernels (*.cu) take their compile-time constants from it, and Python reads it through
// rectok_fast._C.cuda_launch_config (adaln_ext.cuda_launch_config; benchmarks/static_report.py).
//
// Row kernels. A row (one token, D elements) belongs to a *row group* of `tpr` threads (a multiple of
// 32). The row is cut into 16-byte chunks of the activation dtype (E = 16 / sizeof(T) elements:
// 8 for bf16, 4 for fp32); chunk c belongs to thread c % tpr of the group, so a warp reads 512
// contiguous bytes per access and each thread holds at most `cpt` chunks of every row tensor in
// registers. A block runs `groups` row groups side by side (about kTargetThreads threads).
//   forward kernels (and the per-token gated backward): one row per group, the grid covers all B*N rows,
//   every load of the row is issued before any arithmetic;
//   backward kernels: a block owns rows_per_block consecutive tokens of one sample (grid: chunks x B);
//   each group walks `iters` of them with prefetch_rows() rows requested ahead of the one it computes,
//   and keeps its column sums (weight / per-sample modulation gradients) in registers. The groups of a block are summed
//   through shared memory in group order, one partial row per block goes to a scratch buffer, and the
//   finish kernel sums those partials (fixed order, no atomics). Every choice below depends on the
//   shape only, never on the GPU or the run, so the backward is bitwise deterministic.
#pragma once

#include <cstdint>

// The constexpr helpers are also used inside kernels.
#ifdef __CUDACC__
#define RECTOK_HOST_DEVICE __host__ __device__
#else
#define RECTOK_HOST_DEVICE
#endif

namespace rectok {
namespace launch {

constexpr int kWarp = 32;
constexpr int kChunkBytes = 16;     // one vector access of the activation dtype
constexpr int kTargetThreads = 256; // block size aimed for: groups = max(1, kTargetThreads / tpr)
constexpr int kMaxTpr = 512;        // widest row group of the backward kernels (= largest block)
constexpr int kFwdMaxTpr = 256;     // widest row group of the one-row-per-group kernels (forward, per-token gated
                                    // backward): their blocks stay <= 256 threads
constexpr int kFwdMinBlocks = 3;    // __launch_bounds__(kFwdMaxTpr, kFwdMinBlocks): <= 80 registers, no spills

// Elements of each row tensor a thread holds (register arrays in the kernels; chunks per thread
// cpt = elems / E). The D limit is max row group x elems = 4096 for every kernel and dtype. Sized so
// that no kernel spills (ptxas -v) and several blocks fit per SM.
constexpr int kAdalnFwdElems = 16;  // x, shift and scale of the row stay in registers across the reduction
constexpr int kAdalnBwdElems = 8;   // current + prefetched row, weight, two column sums
constexpr int kGatedElems = 16;     // gated residual forward and its backward with a per-token gate
constexpr int kGatedBwdElems = 8;   // gated backward with a per-sample gate: prefetch + column sum

// Backward kernels: rows each thread has requested ahead of the one it computes (a register ring).
// Two for bf16 rows with a per-sample scale (x, dy: 32 bytes per thread per row); one where a row
// takes more registers (fp32, or a per-token scale as a third tensor) -- deeper rings spill.
RECTOK_HOST_DEVICE constexpr int prefetch_rows(bool scale_per_token, int act_bytes) {
  return scale_per_token || act_bytes == 4 ? 1 : 2;
}
constexpr int kGatedBwdPrefetchRows = 1;  // gated backward, per-sample gate: dout and y of the next row

// Backward kernels: row groups wanted over the whole grid -- one wave of 132 SMs x 3 resident row groups
// (the backward row kernels fit 3 blocks of one group per SM at their register counts). Each block writes
// one fp32 partial row per column sum, so fewer, longer blocks mean less partial traffic; this keeps it at
// ~5% of the row traffic at the goal shape while filling the GPU.
constexpr int64_t kWantGroups = 396;
constexpr int64_t kMaxIters = 64;  // rows per group at most

// Finish kernel (second pass of the column sums): kFinishCols columns x kFinishSlices sample slices.
constexpr int kFinishCols = 32;
constexpr int kFinishSlices = 32;
constexpr int kFinishBatch = 8;  // partial rows of each buffer a finish thread requests before adding them

enum class Kernel : int { AdalnFwd = 0, AdalnBwd = 1, GatedFwd = 2, GatedBwdToken = 3, GatedBwdSample = 4 };

constexpr int elems_per_thread(Kernel k) {
  return k == Kernel::AdalnFwd ? kAdalnFwdElems
       : k == Kernel::AdalnBwd ? kAdalnBwdElems
       : k == Kernel::GatedBwdSample ? kGatedBwdElems
       : kGatedElems;
}

// Chunks per thread for activations of act_bytes bytes (a compile-time constant of each kernel).
constexpr int chunks_per_thread(Kernel k, int act_bytes) { return elems_per_thread(k) / (kChunkBytes / act_bytes); }

constexpr bool loops_over_rows(Kernel k) { return k == Kernel::AdalnBwd || k == Kernel::GatedBwdSample; }

struct RowConfig {
  int elems = 0;               // E: elements per 16-byte chunk
  int64_t chunks = 0;          // chunks per row, ceil(D / E)
  int cpt = 0;                 // chunks per thread (compile-time size of the register arrays)
  int tpr = 0;                 // threads per row group
  int groups = 0;              // row groups per block
  int threads = 0;             // threads per block = tpr * groups
  int64_t rows_per_block = 0;  // rows one block covers (backward: tokens of one sample)
  int64_t iters = 0;           // rows each group walks (backward), 1 for the forward kernels
  int64_t grid_x = 0;          // blocks: forward ceil(B*N / groups); backward ceil(N / rows_per_block)
  int64_t grid_y = 0;          // forward 1; backward B
  int64_t partial_rows = 0;    // backward: rows of each fp32 partial-sum buffer (B * grid_x)
  int64_t max_dim = 0;         // widest D these kernels support for this dtype
  bool ok = false;             // D <= max_dim
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// act_bytes: element size of the activations (4 = fp32, 2 = bf16).
inline RowConfig row_config(Kernel k, int64_t B, int64_t N, int64_t D, int act_bytes) {
  RowConfig c;
  c.elems = kChunkBytes / act_bytes;
  c.cpt = chunks_per_thread(k, act_bytes);
  const int max_tpr = loops_over_rows(k) ? kMaxTpr : kFwdMaxTpr;
  c.max_dim = int64_t(max_tpr) * c.cpt * c.elems;
  c.chunks = ceil_div(D < 1 ? 1 : D, c.elems);
  c.tpr = int(ceil_div(ceil_div(c.chunks, c.cpt), kWarp) * kWarp);
  c.ok = D >= 1 && D <= c.max_dim;
  if (!c.ok) return c;
  c.groups = c.tpr >= kTargetThreads ? 1 : kTargetThreads / c.tpr;
  c.threads = c.tpr * c.groups;
  const int64_t rows = B * N;
  if (loops_over_rows(k)) {
    // Blocks per sample: at most kWantGroups row groups over the grid (one wave, no tail), at least one
    // row per group, at most kMaxIters rows per group; then the rows spread evenly over the blocks.
    const int64_t n = N < 1 ? 1 : N, bb = B < 1 ? 1 : B;
    int64_t blocks = kWantGroups / (bb * c.groups);
    blocks = blocks < 1 ? 1 : blocks;
    const int64_t most = ceil_div(n, c.groups), least = ceil_div(n, kMaxIters * c.groups);
    blocks = blocks > most ? most : blocks;
    blocks = blocks < least ? least : blocks;
    const int64_t rpb = ceil_div(ceil_div(n, blocks), c.groups) * c.groups;
    c.rows_per_block = rpb;
    c.iters = rpb / c.groups;
    c.grid_x = ceil_div(n, rpb);
    c.grid_y = B;
    c.partial_rows = B * c.grid_x;
  } else {
    c.rows_per_block = c.groups;
    c.iters = 1;
    c.grid_x = ceil_div(rows < 1 ? 1 : rows, c.groups);
    c.grid_y = 1;
  }
  return c;
}

}  // namespace launch
}  // namespace rectok
