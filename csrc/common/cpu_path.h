// Which SIMD path of the CPU kernels a translation unit is compiled for.
//
// The portable build compiles every CPU kernel source once per SIMD path (setup.py: CPU_PATHS), each with
// the path's -m flags, and defines for it
//     LEANVAE_CPU_PATH_INDEX   the path's position in the module's list (0 = the baseline every CPU runs)
//     LEANVAE_CPU_PATH_NS      an identifier unique to the path (path_avx2, ...)
// The kernels register under their path's index; the registry hands out, per kernel, the best path the
// running CPU supports. Inline functions of the CPU headers live in the inline namespace
// LEANVAE_CPU_PATH_NS, so each path keeps its own copies: the linker never merges an AVX-512 copy of a
// helper with the baseline's. A translation unit compiled once (registry, bindings, CUDA sources, a
// -march build) gets path 0 and `path_default`.
#pragma once

#ifndef LEANVAE_CPU_PATH_INDEX
#define LEANVAE_CPU_PATH_INDEX 0
#endif
#ifndef LEANVAE_CPU_PATH_NS
#define LEANVAE_CPU_PATH_NS path_default
#endif
