// Synchronisation points and shared-memory access of the CUDA kernel bodies (csrc/cuda/*_body.cuh).
//
// The bodies compile twice: with nvcc, where every macro below is exactly the CUDA construct it names
// (__syncthreads(), __shfl_xor_sync(), a pointer into shared memory, ...), and with a host compiler for the
// test suite's emulation (LV_EMULATION defined, tests/emulation/lv_emu.h), where threads are fibers, every
// shared-memory access goes through a race-checking shadow and every sync point can be disabled by its id
// to show that the checker notices (mutation tests).
//
// Every sync point carries an id, a string literal unique in csrc/cuda/ ("family.what"): the test suite
// finds the sync points by these macros and runs one mutation per id. Kernel code under csrc/cuda/ uses
// no bare __syncthreads / __shfl_*_sync / cp.async.wait_group outside this file.
//
//   LV_SYNC(id)                       __syncthreads()
//   LV_SYNC_OR(id, pred)              __syncthreads_or(pred)
//   LV_SHFL_XOR(id, mask, v, lm)      __shfl_xor_sync(mask, v, lm)      (float)
//   LV_SHFL_DOWN(id, mask, v, delta)  __shfl_down_sync(mask, v, delta)  (float)
//   LV_CP_WAIT(id, IO, n)             IO::template wait<n>(): cp.async.wait_group n where IO issues cp.async
//   LV_CP_COMMIT(IO)                  IO::commit(): cp.async.commit_group where IO issues cp.async
//   LV_SPTR(T)                        T*: a pointer into shared memory
//   LV_LDS4(p)                        *reinterpret_cast<const float4*>(p): 16 bytes of shared memory
//   LV_DEV                            __device__ __forceinline__
//   LV_UNROLL                         #pragma unroll
#pragma once

#if defined(__CUDACC__)

#define LV_DEV __device__ __forceinline__
#define LV_UNROLL _Pragma("unroll")
#define LV_SYNC(id) __syncthreads()
#define LV_SYNC_OR(id, pred) __syncthreads_or(pred)
#define LV_SHFL_XOR(id, mask, v, lm) __shfl_xor_sync((mask), (v), (lm))
#define LV_SHFL_DOWN(id, mask, v, delta) __shfl_down_sync((mask), (v), (delta))
#define LV_CP_WAIT(id, IO, n) IO::template wait<n>()
#define LV_CP_COMMIT(IO) IO::commit()
#define LV_SPTR(T) T*
#define LV_LDS4(p) (*reinterpret_cast<const float4*>(p))

#elif defined(LV_EMULATION)

#include "lv_emu.h"
#define LV_DEV inline
#define LV_UNROLL
#define LV_SYNC(id) ::lvemu::sync((id), __FILE__, __LINE__)
#define LV_SYNC_OR(id, pred) ::lvemu::sync_or((id), __FILE__, __LINE__, (pred))
#define LV_SHFL_XOR(id, mask, v, lm) ::lvemu::shfl_xor((id), __FILE__, __LINE__, (mask), (v), (lm))
#define LV_SHFL_DOWN(id, mask, v, delta) ::lvemu::shfl_down((id), __FILE__, __LINE__, (mask), (v), (delta))
#define LV_CP_WAIT(id, IO, n) ::lvemu::cp_wait((id), __FILE__, __LINE__, (n))
#define LV_CP_COMMIT(IO) ::lvemu::cp_commit()
#define LV_SPTR(T) ::lvemu::SPtr<T>
#define LV_LDS4(p) ::lvemu::ld4(p)

#else
#error "csrc/cuda kernel bodies compile with nvcc, or on the host only for the test suite's emulation (LV_EMULATION)"
#endif
