// Shape facts of the CUDA ISTA step kernels that depend only on (mode, d, D): threads per block, the
// padded table sizes, the row grouping and the shared memory each launch needs. Plain C++ (no CUDA), so
// that the kernel bodies, the launchers (ista_step_plan.h), the test suite's emulation and the Python
// side (through the module function `cuda_ista_launch`, which the op's backend check asks before choosing
// the cuda backend) all use this one definition.
#pragma once
#include <cstddef>

namespace leanvae {
namespace cuda {
namespace ista {

enum Mode : int { kStep = 0, kResidual = 1, kInit = 2 };
constexpr int kCols = 4;  // columns per thread
constexpr int kMaxThreads = 1024;
constexpr int kBwdRows = 4;  // backward: rows per group; their x and grad dot products form 2 * kBwdRows virtual rows

// Threads of a block: ceil(D / kCols), rounded up to whole warps.
inline int block_threads(int D) { return ((D + kCols - 1) / kCols + 31) / 32 * 32; }
// Columns the shared tables hold per row: every thread's kCols columns, zero past D.
inline int table_cols(int D) { return block_threads(D) * kCols; }

// Forward: groups of 8 rows for small d (8 x 4 sums per reduction), else 4 rows x 8 phi rows; DP: phi rows
// padded to the reduction's granularity.
inline int fwd_rows(int d) { return d <= 4 ? 8 : 4; }
inline int fwd_dp(int d) { return d <= 4 ? 4 : (d + 7) / 8 * 8; }
// Backward: 8 virtual rows x 4 phi rows per reduction; DMAX: the grad_phi register specialisation.
inline int bwd_dp(int d) { return (d + 3) / 4 * 4; }
inline int bwd_dmax(int d) { return d <= 4 ? 4 : (d <= 16 ? 16 : 64); }

// Shared memory in bytes of a block with `red_rows` reduction rows over DP padded phi rows: the phi table
// (and Q^T in the init mode) (DP, table_cols), red_s (warps, DP * red_rows), e_s and h_s (red_rows, DP)
// each, and one float per warp.
inline size_t smem_bytes(int mode, int D, int DP, int red_rows) {
  const size_t warps = static_cast<size_t>(block_threads(D)) / 32;
  const size_t tables = static_cast<size_t>(DP) * table_cols(D) * (mode == kInit ? 2 : 1);
  return (tables + warps * DP * red_rows + 2 * static_cast<size_t>(red_rows) * DP + warps) * sizeof(float);
}
inline size_t fwd_smem(int mode, int d, int D) { return smem_bytes(mode, D, fwd_dp(d), fwd_rows(d)); }
inline size_t bwd_smem(int mode, int d, int D) { return smem_bytes(mode, D, bwd_dp(d), 2 * kBwdRows); }

}  // namespace ista
}  // namespace cuda
}  // namespace leanvae
