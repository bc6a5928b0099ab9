// Block and thread bodies of the CUDA causal depthwise 3x3x3 conv kernels (csrc/cuda/causal_conv.cu).
//
// Written to compile as host C++ too (no CUDA headers; storage and shared-memory access go through an `IO`
// class given by the includer, sync points through csrc/cuda/lv_sync.cuh), so that the test suite's
// emulation (tests/emulation/) runs exactly this code on the CPU, every thread of a block as a fiber, with
// a race checker on shared memory, cp.async and barriers. Left untested without a GPU: the launch
// configuration, the vector loads themselves and cp.async's hardware.
//
// Forward and grad input: conv_kernel_body / ConvBlock below (a block stages each frame's tile of input in
// shared memory, its threads compute from it). Grad weight: wgrad_kernel_body / wgrad_thread (a thread owns
// kV channels of kWPW pixels of a few rows). Accumulation order per output: bias, then taps (i, j, k)
// lexicographically, whatever frame a tap reads: chunked calls reproduce a full call.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/kernel_args.h"
#include "lv_sync.cuh"

#include <cmath>

#ifdef __CUDACC__
#define LV_HD __host__ __device__ __forceinline__
#else
#define LV_HD inline
#endif

// acc + w * x rounded once: what nvcc makes of the update (an FFMA), written out so that the host build
// rounds the same way in every instantiation (a host compiler contracts `acc += w * x` into an FMA in some
// code paths and not in others, so the emulated steady and general loops, and the emulated chunked and
// whole calls, would differ in the last bit).
#ifdef __CUDA_ARCH__
#define LV_FMA(w, x, acc) __fmaf_rn((w), (x), (acc))
#else
#define LV_FMA(w, x, acc) std::fma((w), (x), (acc))
#endif

namespace leanvae {
namespace causal_conv {

constexpr int kV = 2;    // channels per thread
constexpr int kWPW = 2;  // grad weight: pixels per thread, along W
constexpr int kWY = 16;  // grad weight: threads along W per block (a block covers kWY * kWPW = 32 pixels)

struct Frames {
  const void* data = nullptr;  // null: absent (reads as zeros)
  int64_t s[5] = {0, 0, 0, 0, 0};  // element strides of (B, T, H, W, C)
};

struct ConvParams {
  int64_t B = 0, T = 0, H = 0, W = 0, C = 0, G = 0;  // G: group size, 0 = causal
  Frames src;   // forward: x; grad input: grad_y
  Frames aux;   // forward: cache (or absent); grad input: grad of the new cache
  const float* w27 = nullptr;   // (27, C), tap-major (spatially flipped for grad input)
  const float* bias = nullptr;  // (C,) or null
  void* out = nullptr;          // forward: y; grad input: grad x. (B, T, H, W, C), channel stride 1
  int64_t out_s[4] = {0, 0, 0, 0};
  void* ocache = nullptr;       // forward: new cache; grad input: grad of the cache (or null). Channel stride 1
  int64_t oc_s[4] = {0, 0, 0, 0};
  bool residual = false;
};

struct WgradParams {
  int64_t B = 0, T = 0, H = 0, W = 0, C = 0, G = 0;
  Frames x, cache, gy;  // cache may be absent
  int64_t rows = 8;     // rows of pixels per thread (and per partial)
  float* part = nullptr;  // (n_parts, 28, C): per block of rows x (kWY * kWPW) pixels
};

LV_HD int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

template <bool B>
struct Bool {
  static constexpr bool value = B;
};

// Output frame t's temporal tap i reads frame t - off + i (off = 2 causal, 1 group); in group mode a tap past
// the end of t's group (or of the call) reads zeros instead.
// 32-bit division (the host checks T and G < 2^30): a 64-bit one is a long subroutine on the GPU.
LV_HD bool tap_valid(int64_t t, int i, int64_t T, int64_t G) {
  if (G == 0) return true;
  const int32_t start = (static_cast<int32_t>(t) / static_cast<int32_t>(G)) * static_cast<int32_t>(G);
  return t - 1 + i < imin(T, static_cast<int64_t>(start) + G);
}

// tid = ((i3 * n2 + i2) * n1 + i1) * n0 + i0, in 32-bit arithmetic when everything fits.
LV_HD void split_index(int64_t tid, int64_t n0, int64_t n1, int64_t n2, int64_t& i0, int64_t& i1, int64_t& i2,
                       int64_t& i3) {
  if (tid < (int64_t(1) << 31) && n0 < (int64_t(1) << 31) && n1 < (int64_t(1) << 31) && n2 < (int64_t(1) << 31)) {
    uint32_t r = static_cast<uint32_t>(tid);
    const uint32_t m0 = static_cast<uint32_t>(n0), m1 = static_cast<uint32_t>(n1), m2 = static_cast<uint32_t>(n2);
    i0 = r % m0, r /= m0;
    i1 = r % m1, r /= m1;
    i2 = r % m2, i3 = r / m2;
  } else {
    int64_t r = tid;
    i0 = r % n0, r /= n0;
    i1 = r % n1, r /= n1;
    i2 = r % n2, i3 = r / n2;
  }
}

// Forward (BWD = false) and grad input (BWD = true): one thread block per tile of output, kConvRows rows x
// ConvTile::TW pixels x kConvCh channels of one batch item, walking the frames. Two kinds of work, ordered by
// barriers (conv_kernel_body):
//  - issue (staging): the block's threads copy a frame's (rows + 2) x (TW + 2) x kConvCh input tile (the
//    spatial halo included, zeros outside the frame) into a slot of a ring of kConvStages shared-memory
//    tiles, as storage, in chunks of 16 bytes (VL channels: 8 for 16-bit types, 4 for float32): one
//    asynchronous 16-byte copy (cp.async) each where the host proved that the layout allows it (VEC), else
//    element by element with any strides. A thread's chunks are the same every frame, so their in-frame
//    offsets are computed once (32-bit under VEC: the host checks that a frame's offsets fit) and each
//    frame adds one frame pointer. An input element is read from global memory once per tile that needs
//    it: (rows + 2) / rows x (TW + 2) / TW times per frame. The frames of the next kConvStages - 1 steps
//    are in flight while a step computes.
//  - compute: a thread owns kConvV channels of PW consecutive pixels of one row (a warp's lanes along the
//    channels, so that its shared-memory reads are contiguous and conflict-free), reads its 3 rows x
//    (PW + 2) pixels from the step's tile and feeds three rolling accumulators, one per output frame the
//    frame touches; the 27 taps of its channels stay in registers. Slot 0 is then complete and stored; the
//    causal forward's residual (x of the frame of this step) comes from the tile too.
// Forward: step s over source frames -n .. T+1-off; slot k holds output s + off - 2 + k (tap i = 2 - k).
// Grad input: step s over grad_y frames 0 .. T+off-1; slot k holds output e = s - off + k (tap i = k, where the
// forward tap (s, k) is valid); e < 0 is the grad of cache frame e + n.
// Accumulation order per output: bias, then taps (i, j, k) lexicographically, whatever frame a tap reads and
// whatever the tiling: chunked calls reproduce a full call, and the vector and scalar paths agree bit for bit.
constexpr int kConvThreads = 256;  // 8 warps
constexpr int kConvV = 1;          // channels per thread in the compute phase
constexpr int kConvCh = 32 * kConvV;  // channels per block: a warp's 32 lanes x kConvV
constexpr int kConvRows = 4;       // output rows per block
constexpr int kConvPG = 2;         // pixel groups per row: kConvRows * kConvPG = 8 warps

// PW: pixels per thread along W. One channel per thread keeps its 27 taps in 27 registers, which leaves room
// for 3 x PW accumulators, the PW + 2 staged inputs of a row and the staging under __launch_bounds__(256, 2)
// (128 registers) with nvcc 13 for sm_90, without spills (tests/test_causal_conv.py checks it with ptxas).
template <bool BWD>
struct ConvTile {
  static constexpr int PW = 4;
  static constexpr int TW = kConvPG * PW;           // output pixels per block
  static constexpr int TR = kConvRows + 2;          // staged rows
  static constexpr int TC = TW + 2;                 // staged pixels per row
  static constexpr int kElems = TR * TC * kConvCh;  // elements of one staged frame
};
// Staged frames in flight: the ring of shared-memory tiles holds the frames of steps s .. s + kConvStages - 1
// (compute reads step s while the copies of the next kConvStages - 1 frames are under way).
constexpr int kConvStages = 4;

// Blocks of a launch: ((b * nhb + hb) * nwb + wb) * ncb + cb.
template <bool BWD>
LV_HD void conv_grid(const ConvParams& p, int64_t& ncb, int64_t& nwb, int64_t& nhb, int64_t& blocks) {
  ncb = (p.C + kConvCh - 1) / kConvCh;
  nwb = (p.W + ConvTile<BWD>::TW - 1) / ConvTile<BWD>::TW;
  nhb = (p.H + kConvRows - 1) / kConvRows;
  blocks = p.B * nhb * nwb * ncb;
}

// The frame steps s of a launch, lo <= s < hi, and within them the steady ones, a <= s < b: in causal mode
// (G = 0) the steps whose frame is in x, whose three slots all take their tap, whose complete output is a
// frame of y, and (forward) whose frame is not copied to the new cache. The kernels run the steady steps in
// a lean loop of their own (ConvBlock's STEADY = true), the few others in the general one.
LV_HD void conv_steps(const ConvParams& p, bool bwd, int64_t& lo, int64_t& a, int64_t& b, int64_t& hi) {
  const int off = p.G > 0 ? 1 : 2;
  lo = bwd ? 0 : -off;
  hi = bwd ? p.T + off : p.T + 2 - off;
  a = b = lo;
  if (p.G == 0) {
    a = bwd ? imin(2, p.T) : 0;
    b = bwd ? p.T : (p.T > 2 ? p.T - 2 : 0);
    if (b < a) b = a;
  }
}

template <class IO, bool VEC, bool BWD>
struct ConvBlock {
  using S = typename IO::storage;
  using Tile = ConvTile<BWD>;
  static constexpr int PW = Tile::PW, V = kConvV;
  static constexpr int VL = static_cast<int>(16 / sizeof(S));  // channels per 16-byte chunk
  static constexpr int kChunkPx = kConvCh / VL;                 // chunks per staged pixel
  static constexpr int kChunks = Tile::TR * Tile::TC * kChunkPx;
  static constexpr int kIters = (kChunks + kConvThreads - 1) / kConvThreads;
  // In-frame offsets of the staged chunks: 32-bit where the host proved that they fit (conv_vec_ok).
  using Off = typename std::conditional<VEC, int32_t, int64_t>::type;

  // Indices are 32-bit (make_conv_params checks T, H, W, C < 2^30); element offsets are 64-bit.
  struct Stager {
    int64_t b, src_b, aux_b;  // the batch item, and its element offsets in src and aux
    int32_t h0, w0, c0;    // the block's first output row, pixel and channel
    int32_t t;             // thread index in the block
    Off off[kIters];       // in-frame offset of each of the thread's chunks in src
    int8_t cn[kIters];     // its channels inside the frame (0: halo outside the frame, or no chunk)
  };
  struct Thread {
    float wr[27][V], init[V], acc[3][PW][V];
    int64_t b;
    int32_t h, w0, c0, cn, nw;  // nw: its pixels inside the frame
    int32_t tile_off;           // its first staged pixel (row h-1, pixel w0-1) in the tile
    bool active, edge;
  };

  // Chunk q of the tile: staged row r, staged pixel x, chunk cc of channels; chunk q sits at q * VL in the
  // tile, and consecutive threads take consecutive chunks (contiguous in a channels-last frame).
  static LV_HD void chunk_pos(int q, int& r, int& x, int& cc) {
    cc = q % kChunkPx;
    x = (q / kChunkPx) % Tile::TC;
    r = q / (kChunkPx * Tile::TC);
  }

  static LV_HD void setup(const ConvParams& p, int64_t blk, int t, Thread& th, Stager& st) {
    int64_t ncb, nwb, nhb, blocks, cb, wb, hb, b;
    conv_grid<BWD>(p, ncb, nwb, nhb, blocks);
    split_index(blk, ncb, nwb, nhb, cb, wb, hb, b);
    st.b = b, st.src_b = b * p.src.s[0], st.aux_b = b * p.aux.s[0];
    st.h0 = static_cast<int32_t>(hb * kConvRows), st.w0 = static_cast<int32_t>(wb * Tile::TW);
    st.c0 = static_cast<int32_t>(cb * kConvCh), st.t = t;
    LV_UNROLL
    for (int it = 0; it < kIters; ++it) {
      const int q = t + it * kConvThreads;
      int r, x, cc;
      chunk_pos(q, r, x, cc);
      const int64_t hh = st.h0 - 1 + r, w = st.w0 - 1 + x, c = st.c0 + cc * VL;
      const bool in = q < kChunks && hh >= 0 && hh < p.H && w >= 0 && w < p.W && c < p.C;
      st.cn[it] = static_cast<int8_t>(in ? imin(VL, p.C - c) : 0);
      st.off[it] = static_cast<Off>(in ? hh * p.src.s[2] + w * p.src.s[3] + c * p.src.s[4] : 0);
    }
    const int lane = t % 32, row = (t / 32) / kConvPG, pg = (t / 32) % kConvPG;
    th.b = b;
    th.h = st.h0 + row;
    th.w0 = st.w0 + pg * PW;
    th.c0 = st.c0 + lane * V;
    th.tile_off = (row * Tile::TC + pg * PW) * kConvCh + lane * V;
    th.active = b < p.B && th.h < p.H && th.w0 < p.W && th.c0 < p.C;
    th.cn = th.active ? static_cast<int32_t>(imin(V, p.C - th.c0)) : 0;
    th.nw = th.active ? static_cast<int32_t>(imin(PW, p.W - th.w0)) : 0;
    th.edge = BWD && (th.h == 0 || th.h == p.H - 1 || th.w0 == 0 || th.w0 + PW >= p.W);
    LV_UNROLL
    for (int tap = 0; tap < 27; ++tap)
      LV_UNROLL
      for (int v = 0; v < V; ++v) th.wr[tap][v] = v < th.cn ? p.w27[tap * p.C + th.c0 + v] : 0.f;
    LV_UNROLL
    for (int v = 0; v < V; ++v) th.init[v] = (p.bias != nullptr && v < th.cn) ? p.bias[th.c0 + v] : 0.f;
    LV_UNROLL
    for (int k = 0; k < 3; ++k)
      LV_UNROLL
      for (int px = 0; px < PW; ++px)
        LV_UNROLL
        for (int v = 0; v < V; ++v) th.acc[k][px][v] = th.init[v];
  }

  // Staging of step s (a frame of the cache, of src, or past the end: zeros) into `slot` of the ring; on the
  // vector path asynchronous 16-byte copies (cp.async) that the kernel waits for before the step's compute
  // phase.
  // NONNEG: the caller knows s >= 0 (no cache frame).
  template <bool NONNEG>
  static LV_HD void issue(const ConvParams& p, const Stager& st, int32_t s, S* slot) {
    const int32_t n = p.G > 0 ? 1 : 2, T = static_cast<int32_t>(p.T);
    if (!NONNEG && !BWD && s < 0) {  // a frame of the cache (at most two steps): offsets computed here, 64-bit
      issue_aux(p, st, s + n, slot);
      return;
    }
    const S* frame = s < T ? static_cast<const S*>(p.src.data) + st.src_b + s * p.src.s[1] : nullptr;
    LV_UNROLL
    for (int it = 0; it < kIters; ++it) {
      const int q = st.t + it * kConvThreads;
      if (kChunks % kConvThreads != 0 && q >= kChunks) break;
      const bool in = frame != nullptr && st.cn[it] > 0;
      IO::template stage<VL>(slot + q * VL, in ? frame + st.off[it] : nullptr, p.src.s[4], st.cn[it]);
    }
  }

  // Forward, general steps: the new cache holds the last n frames of cat(cache or zeros, x), copied bit for
  // bit from the frame of step s (a cache frame when T < n), by the threads that stage the chunks of the
  // block's own output positions (each output position belongs to exactly one block).
  static LV_HD void cache_copy(const ConvParams& p, const Stager& st, int32_t s) {
    const int32_t n = p.G > 0 ? 1 : 2, T = static_cast<int32_t>(p.T);
    if (BWD || s < T - n || s >= T) return;
    if (s >= 0) {
      copy_to_cache(p, st, s - (T - n), static_cast<const S*>(p.src.data) + st.src_b + s * p.src.s[1], p.src.s, st.off);
      return;
    }
    const S* frame = p.aux.data ? static_cast<const S*>(p.aux.data) + st.aux_b + (s + n) * p.aux.s[1] : nullptr;
    int64_t off[kIters];
    LV_UNROLL
    for (int it = 0; it < kIters; ++it) {
      int r, x, cc;
      chunk_pos(st.t + it * kConvThreads, r, x, cc);
      off[it] = (st.h0 - 1 + r) * p.aux.s[2] + (st.w0 - 1 + x) * p.aux.s[3] + (st.c0 + cc * VL) * p.aux.s[4];
    }
    copy_to_cache(p, st, s - (T - n), frame, p.aux.s, off);
  }

  static LV_HD void issue_aux(const ConvParams& p, const Stager& st, int32_t a, S* slot) {
    const S* frame = p.aux.data ? static_cast<const S*>(p.aux.data) + st.aux_b + a * p.aux.s[1] : nullptr;
    int64_t off[kIters];
    LV_UNROLL
    for (int it = 0; it < kIters; ++it) {
      const int q = st.t + it * kConvThreads;
      off[it] = 0;
      if (kChunks % kConvThreads != 0 && q >= kChunks) break;
      int r, x, cc;
      chunk_pos(q, r, x, cc);
      off[it] = (st.h0 - 1 + r) * p.aux.s[2] + (st.w0 - 1 + x) * p.aux.s[3] + (st.c0 + cc * VL) * p.aux.s[4];
      const bool in = frame != nullptr && st.cn[it] > 0;
      IO::template stage<VL>(slot + q * VL, in ? frame + off[it] : nullptr, p.aux.s[4], st.cn[it]);
    }
  }

  // The chunks of the block's own output positions (staged rows 1..kConvRows, pixels 1..TW) of a frame
  // (null: zeros) into frame `slot` of the new cache.
  template <class O>
  static LV_HD void copy_to_cache(const ConvParams& p, const Stager& st, int32_t slot, const S* frame,
                                  const int64_t* fs, const O* off) {
    S* cache = static_cast<S*>(p.ocache) + st.b * p.oc_s[0] + static_cast<int64_t>(slot) * p.oc_s[1];
    LV_UNROLL
    for (int it = 0; it < kIters; ++it) {
      const int q = st.t + it * kConvThreads;
      if (kChunks % kConvThreads != 0 && q >= kChunks) break;
      int r, x, cc;
      chunk_pos(q, r, x, cc);
      if (st.cn[it] > 0 && r >= 1 && r <= kConvRows && x >= 1 && x <= Tile::TW)
        IO::template copy<VL>(cache + (st.h0 - 1 + r) * p.oc_s[2] + (st.w0 - 1 + x) * p.oc_s[3] + st.c0 + cc * VL,
                              frame != nullptr ? frame + off[it] : nullptr, fs[4], st.cn[it]);
    }
  }

  // Phase 2 of step s: the thread's taps from the staged tile, then its complete slot 0 to memory.
  template <bool STEADY>
  static LV_HD void compute(const ConvParams& p, Thread& th, int32_t s, const S* tile) {
    if (!th.active) return;
    const int32_t T = static_cast<int32_t>(p.T), G = static_cast<int32_t>(p.G), h = th.h, w0 = th.w0;
    const int32_t off = (STEADY || G == 0) ? 2 : 1, n = off;  // steady steps are causal
    // Which slots this frame feeds: a real output (forward: 0 <= o < T; grad input: e >= 0, or a cache frame
    // when there is a cache) through a valid tap.
    bool valid[3];
    LV_UNROLL
    for (int k = 0; k < 3; ++k) {
      if (STEADY) {
        valid[k] = true;
      } else if (BWD) {
        valid[k] = s < T && tap_valid(s, k, T, G) && (s - off + k >= 0 || p.ocache != nullptr);
      } else {
        const int32_t o = s + off - 2 + k;
        valid[k] = o >= 0 && o < T && tap_valid(o, 2 - k, T, G);
      }
    }
    auto& acc = th.acc;
    const auto& wr = th.wr;
    const S* rows = tile + th.tile_off;
    LV_UNROLL
    for (int j = 0; j < 3; ++j) {
      float xv[PW + 2][V];
      LV_UNROLL
      for (int px = 0; px < PW + 2; ++px) IO::template lds<V>(rows + (j * Tile::TC + px) * kConvCh, xv[px]);
      // Grad input skips the taps that read grad_y past the frame (the forward never had those outputs),
      // rather than multiplying zeros: with an Inf or NaN weight 0 * w is NaN. Only threads on the frame's
      // border have such taps; they take a checked copy of the loop, the others the unchecked one. The
      // forward multiplies its zero padding, as the reference's convolution of a zero-padded frame does.
      if (BWD && th.edge) {
        if (h + j - 1 < 0 || h + j - 1 >= p.H) continue;
        LV_UNROLL
        for (int k = 0; k < 3; ++k) {
          if (!valid[k]) continue;
          LV_UNROLL
          for (int kk = 0; kk < 3; ++kk)
            LV_UNROLL
            for (int px = 0; px < PW; ++px) {
              if (w0 - 1 + px + kk < 0 || w0 - 1 + px + kk >= p.W) continue;
              LV_UNROLL
              for (int v = 0; v < V; ++v) acc[k][px][v] = LV_FMA(wr[k * 9 + j * 3 + kk][v], xv[px + kk][v], acc[k][px][v]);
            }
        }
        continue;
      }
      LV_UNROLL
      for (int k = 0; k < 3; ++k) {
        if (!valid[k]) continue;  // skipped, not multiplied by zero: NaN * 0 is NaN
        const int i = BWD ? k : 2 - k;
        LV_UNROLL
        for (int kk = 0; kk < 3; ++kk)
          LV_UNROLL
          for (int px = 0; px < PW; ++px)
            LV_UNROLL
            for (int v = 0; v < V; ++v) acc[k][px][v] = LV_FMA(wr[i * 9 + j * 3 + kk][v], xv[px + kk][v], acc[k][px][v]);
      }
    }
    // Slot 0 is complete: output frame o (grad input: o < 0 is the grad of cache frame o + n).
    const int32_t o = BWD ? s - off : s + off - 2;
    if (STEADY || (o >= 0 && o < T)) {
      store<STEADY>(p, th, static_cast<S*>(p.out) + th.b * p.out_s[0] + o * p.out_s[1] + h * p.out_s[2] + th.c0,
                    p.out_s[3], o, tile);
    } else if (BWD && o < 0 && p.ocache != nullptr) {
      store<false>(p, th, static_cast<S*>(p.ocache) + th.b * p.oc_s[0] + (o + n) * p.oc_s[1] + h * p.oc_s[2] + th.c0,
                   p.oc_s[3], o, tile);
    }
    LV_UNROLL
    for (int px = 0; px < PW; ++px)
      LV_UNROLL
      for (int v = 0; v < V; ++v) {
        acc[0][px][v] = acc[1][px][v];
        acc[1][px][v] = acc[2][px][v];
        acc[2][px][v] = th.init[v];
      }
  }

  // Slot 0 (output frame o) to dst (pixel w0, channel c0; dw: pixel stride), plus the residual (forward: x of
  // frame o; grad input: grad_y of frame o), then (grad input) the grad of the new cache frame that holds
  // frame o.
  template <bool STEADY>
  static LV_HD void store(const ConvParams& p, const Thread& th, S* dst, int64_t dw, int32_t o, const S* tile) {
    const int32_t n = (STEADY || p.G == 0) ? 2 : 1, qn = o - (static_cast<int32_t>(p.T) - n);
    // The causal forward's output o is the frame staged at this step: its residual is the tile's centre row.
    const bool res_tile = !BWD && n == 2 && p.residual;
    const S* res = nullptr;
    if (p.residual && o >= 0 && !res_tile)
      res = static_cast<const S*>(p.src.data) + th.b * p.src.s[0] + o * p.src.s[1] + th.h * p.src.s[2] +
            th.w0 * p.src.s[3] + th.c0 * p.src.s[4];
    const S* gnc = nullptr;
    if (!STEADY && BWD && qn >= 0)
      gnc = static_cast<const S*>(p.aux.data) + th.b * p.aux.s[0] + qn * p.aux.s[1] + th.h * p.aux.s[2] +
            th.w0 * p.aux.s[3] + th.c0 * p.aux.s[4];
    dst += th.w0 * dw;
    LV_UNROLL
    for (int px = 0; px < PW; ++px, dst += dw) {
      if (px >= th.nw) break;
      float val[V], add[V];
      LV_UNROLL
      for (int v = 0; v < V; ++v) val[v] = th.acc[0][px][v];
      if (res_tile) {
        IO::template lds<V>(tile + th.tile_off + (Tile::TC + px + 1) * kConvCh, add);
        LV_UNROLL
        for (int v = 0; v < V; ++v) val[v] += add[v];
      } else if (res != nullptr) {
        IO::template load<V>(res + px * p.src.s[3], p.src.s[4], th.cn, add);
        LV_UNROLL
        for (int v = 0; v < V; ++v) val[v] += add[v];
      }
      if (gnc != nullptr) {
        IO::template load<V>(gnc + px * p.aux.s[3], p.aux.s[4], th.cn, add);
        LV_UNROLL
        for (int v = 0; v < V; ++v) val[v] += add[v];
      }
      IO::template store<V>(dst, th.cn, val);
    }
  }
};

// Grad weight: thread (b, row block hb, pixel group wg, channel group cv) accumulates, over its `rows` rows
// and all frames, acc[tap][v] = sum gy[o] * (frame read by output o through tap), acc[27] = sum gy (bias).
// Step s walks source frames -n .. T-1; a ring holds gy of the three outputs frame s feeds (slot k: output
// s + off - 2 + k, tap i = 2 - k). The order of additions is fixed: the result is deterministic.
// Addressing is hoisted: a thread's column offsets and column validity are computed once, its row offsets
// once per row, and each step adds one frame pointer. Off: the in-frame offset type, int32_t only where the
// host proved every in-frame offset of x, cache and grad_y fits (wgrad_off32_ok); offsets of rows and
// columns outside the frame are never formed (they are not loaded), so they cannot overflow.
template <class IO, int V, int PW, class Off = int64_t>
LV_HD void wgrad_thread(const WgradParams& p, int64_t b, int64_t hb, int64_t wg, int64_t cv, float (&acc)[28][V]) {
  using S = typename IO::storage;
  LV_UNROLL
  for (int tap = 0; tap < 28; ++tap)
    LV_UNROLL
    for (int v = 0; v < V; ++v) acc[tap][v] = 0.f;
  const int64_t c0 = cv * V, w0 = wg * PW, T = p.T;
  if (b >= p.B || c0 >= p.C || w0 >= p.W) return;
  const int cn = static_cast<int>(imin(V, p.C - c0));
  const int off = p.G > 0 ? 1 : 2, n = off;
  const S* x = static_cast<const S*>(p.x.data) + b * p.x.s[0];
  const S* cache = p.cache.data ? static_cast<const S*>(p.cache.data) + b * p.cache.s[0] : nullptr;
  const S* gy = static_cast<const S*>(p.gy.data) + b * p.gy.s[0];
  bool col_ok[PW + 2];  // column w0 - 1 + px inside the frame (px >= 1: output column w0 + px - 1 exists)
  Off xcol[PW + 2], ccol[PW + 2], gcol[PW];
  LV_UNROLL
  for (int px = 0; px < PW + 2; ++px) {
    const int64_t w = w0 - 1 + px;
    col_ok[px] = w >= 0 && w < p.W;
    xcol[px] = col_ok[px] ? static_cast<Off>(w * p.x.s[3] + c0 * p.x.s[4]) : Off(0);
    ccol[px] = col_ok[px] && cache ? static_cast<Off>(w * p.cache.s[3] + c0 * p.cache.s[4]) : Off(0);
    if (px >= 1 && px <= PW) gcol[px - 1] = col_ok[px] ? static_cast<Off>(w * p.gy.s[3] + c0 * p.gy.s[4]) : Off(0);
  }
  const bool cols_inside = w0 >= 1 && w0 + PW < p.W;
  // Off = int64_t (any strides: the scalar path) computes each address where it is used, as the registers
  // the hoisted offsets would take make the 64-bit path spill.
  constexpr bool kHoist = sizeof(Off) == 4;
  for (int64_t h = hb * p.rows; h < imin(p.H, hb * p.rows + p.rows); ++h) {
    bool row_ok[3];
    Off xrow[3], crow[3];
    LV_UNROLL
    for (int j = 0; j < 3; ++j) {
      const int64_t hh = h + j - 1;
      row_ok[j] = hh >= 0 && hh < p.H;
      xrow[j] = row_ok[j] ? static_cast<Off>(hh * p.x.s[2]) : Off(0);
      crow[j] = row_ok[j] && cache ? static_cast<Off>(hh * p.cache.s[2]) : Off(0);
    }
    const Off grow = static_cast<Off>(h * p.gy.s[2]);
    float g[3][PW][V];
    LV_UNROLL
    for (int k = 0; k < 3; ++k)
      LV_UNROLL
      for (int px = 0; px < PW; ++px)
        LV_UNROLL
        for (int v = 0; v < V; ++v) g[k][px][v] = 0.f;
    const S* gyf = gy;  // grad_y frame of output s + off, from output 0 (s = -n)
    // One step; kSteady: the caller proved every check true (frame s of x, the three outputs it feeds
    // exist, rows h - 1 .. h + 1 and columns w0 - 1 .. w0 + PW inside the frame, no group), so the steady
    // steps run without them. Same additions in the same order either way.
    auto step = [&](int64_t s, auto steady) {
      constexpr bool kSteady = decltype(steady)::value;
      const bool on_ok = kSteady || s + off < T;  // the output entering the ring (tap 0 reads frame s)
      LV_UNROLL
      for (int px = 0; px < PW; ++px) {
        if (on_ok && (kSteady || col_ok[px + 1])) {
          if (kHoist)
            IO::template load<V>(gyf + (grow + gcol[px]), p.gy.s[4], cn, g[2][px]);
          else
            IO::template load<V>(gyf + (h * p.gy.s[2] + (w0 + px) * p.gy.s[3] + c0 * p.gy.s[4]), p.gy.s[4], cn, g[2][px]);
        } else {
          LV_UNROLL
          for (int v = 0; v < V; ++v) g[2][px][v] = 0.f;
        }
        LV_UNROLL
        for (int v = 0; v < V; ++v) acc[27][v] += g[2][px][v];
      }
      gyf += p.gy.s[1];
      bool valid[3];
      LV_UNROLL
      for (int k = 0; k < 3; ++k) {
        const int64_t o = s + off - 2 + k;
        valid[k] = kSteady || (o >= 0 && o < T && tap_valid(o, 2 - k, T, p.G));
      }
      const bool in_x = kSteady || s >= 0;
      const S* frame = in_x ? x + s * p.x.s[1] : (cache ? cache + (s + n) * p.cache.s[1] : nullptr);
      const int64_t sc = in_x ? p.x.s[4] : p.cache.s[4];
      LV_UNROLL
      for (int j = 0; j < 3; ++j) {
        float xv[PW + 2][V];
        const bool r_ok = kSteady || (frame != nullptr && row_ok[j]);
        const Off rowo = in_x ? xrow[j] : crow[j];
        LV_UNROLL
        for (int px = 0; px < PW + 2; ++px) {
          if (r_ok && (kSteady || col_ok[px])) {
            const S* src;
            if (kHoist)
              src = frame + (rowo + (in_x ? xcol[px] : ccol[px]));
            else if (in_x)
              src = frame + ((h + j - 1) * p.x.s[2] + (w0 - 1 + px) * p.x.s[3] + c0 * p.x.s[4]);
            else
              src = frame + ((h + j - 1) * p.cache.s[2] + (w0 - 1 + px) * p.cache.s[3] + c0 * p.cache.s[4]);
            IO::template load<V>(src, sc, cn, xv[px]);
          } else {
            LV_UNROLL
            for (int v = 0; v < V; ++v) xv[px][v] = 0.f;
          }
        }
        LV_UNROLL
        for (int k = 0; k < 3; ++k) {
          if (!valid[k]) continue;
          const int i = 2 - k;
          LV_UNROLL
          for (int kk = 0; kk < 3; ++kk)
            LV_UNROLL
            for (int px = 0; px < PW; ++px) {
              if (!kSteady && !col_ok[px + 1]) continue;  // no output there: skipped, not 0 * x (x may be Inf)
              LV_UNROLL
              for (int v = 0; v < V; ++v) {
                float& a = acc[i * 9 + j * 3 + kk][v];
                a = LV_FMA(g[k][px][v], xv[px + kk][v], a);  // the GPU's FFMA, in the host build too
              }
            }
        }
      }
      LV_UNROLL
      for (int px = 0; px < PW; ++px)
        LV_UNROLL
        for (int v = 0; v < V; ++v) {
          g[0][px][v] = g[1][px][v];
          g[1][px][v] = g[2][px][v];
        }
    };
    // Steady steps [sa, sb): frames 0 .. T - 3 of interior rows, for threads whose columns are interior.
    // The 64-bit (scalar) path runs every step as a general one: its steady copy spilled (16-bit types).
    const bool steady_row = kHoist && p.G == 0 && row_ok[0] && row_ok[2] && cols_inside;
    const int64_t sa = steady_row ? 0 : T, sb = steady_row ? (T > 2 ? T - 2 : 0) : T;
    for (int64_t s = -n; s < sa; ++s) step(s, Bool<false>());
    for (int64_t s = sa; s < sb; ++s) step(s, Bool<true>());
    for (int64_t s = sb; s < T; ++s) step(s, Bool<false>());
  }
}

// Forward / grad input, one block (blk, thread tid of kConvThreads): a ring of kConvStages staged frames in
// shared memory (`ring`: kConvStages * ConvTile<BWD>::kElems storage elements, 16-byte aligned). The frames
// of the next kConvStages - 1 steps are being copied while step s computes from its own.
// Sync points: before step s computes, every thread waits for its own copies of step s (the wait_group)
// and then for every other thread's (the barrier), which also tells every thread that the others are done
// reading the slot of step s - 1, which this step's staging overwrites.
template <class IO, bool VEC, bool BWD>
LV_DEV void conv_kernel_body(const ConvParams& p, int64_t blk, int tid, int64_t s_lo, int64_t s_a, int64_t s_b,
                             int64_t s_hi, typename IO::storage* ring) {
  using Blk = ConvBlock<IO, VEC, BWD>;
  constexpr int kE = Blk::Tile::kElems, kS = kConvStages;
  typename Blk::Thread th;
  typename Blk::Stager st;
  Blk::setup(p, blk, tid, th, st);
  // |s| < 2^30 (make_conv_params); step s uses slot (s - s_lo) % kS.
  const int32_t lo = static_cast<int32_t>(s_lo), a = static_cast<int32_t>(s_a), b = static_cast<int32_t>(s_b),
                hi = static_cast<int32_t>(s_hi);
  for (int i = 0; i < kS - 1; ++i) {
    if (lo + i < hi) Blk::template issue<false>(p, st, lo + i, ring + i * kE);
    LV_CP_COMMIT(IO);  // one group per step, empty or not, so that wait<kS - 2> means "step s has landed"
  }
  auto step = [&](int32_t s, auto steady) {
    LV_CP_WAIT("conv.ring_wait", IO, kS - 2);  // this thread's copies of step s have landed
    LV_SYNC("conv.step");  // every thread's copies of step s are visible; every thread is done with step s - 1
    constexpr bool kSteady = decltype(steady)::value;
    if (!kSteady) Blk::cache_copy(p, st, s);
    Blk::template compute<kSteady>(p, th, s, ring + ((s - lo) % kS) * kE);
    const int32_t sn = s + kS - 1;  // into the slot of step s - 1; steady steps have s >= 0
    if (sn < hi) Blk::template issue<kSteady>(p, st, sn, ring + ((sn - lo) % kS) * kE);
    LV_CP_COMMIT(IO);
  };
  // The steady steps [a, b) run in a loop of their own.
  for (int32_t s = lo; s < a; ++s) step(s, Bool<false>());
  for (int32_t s = a; s < b; ++s) step(s, Bool<true>());
  for (int32_t s = b; s < hi; ++s) step(s, Bool<false>());
}

// Grad weight, one block of 32 x kWY threads (threadIdx (x, y), block blockIdx.x of ncvb x nwb x nhb x B):
// each thread's sums over its rows and frames (wgrad_thread) are added over threadIdx.y in order 0..kWY-1 in
// shared memory (`red`: 28 x 32 * kV floats) and stored as the block's partial by the threads of y = 0.
// Sync point: after each y's turn, so that the next y reads its sums.
template <class IO, bool VEC>
LV_DEV void wgrad_kernel_body(const WgradParams& p, int64_t ncvb, int64_t nwb, int64_t nhb, LV_SPTR(float) red) {
  constexpr int kRed = 32 * kV;  // floats per tap in red
  int64_t cvb, wb, hb, b;
  split_index(blockIdx.x, ncvb, nwb, nhb, cvb, wb, hb, b);
  const int64_t cv = cvb * 32 + threadIdx.x;
  float acc[28][kV];
  // VEC: 32-bit in-frame offsets (the launcher checked wgrad_off32_ok)
  wgrad_thread<IO, kV, kWPW, typename std::conditional<VEC, int32_t, int64_t>::type>(p, b, hb, wb * kWY + threadIdx.y,
                                                                                       cv, acc);
  for (int y = 0; y < kWY; ++y) {
    if (threadIdx.y == y) {
      LV_UNROLL
      for (int tap = 0; tap < 28; ++tap)
        LV_UNROLL
        for (int v = 0; v < kV; ++v) red[tap * kRed + threadIdx.x * kV + v] =
            (y == 0 ? 0.f : static_cast<float>(red[tap * kRed + threadIdx.x * kV + v])) + acc[tap][v];
    }
    LV_SYNC("conv.wgrad_reduce");
  }
  if (threadIdx.y == 0) {
    float* part = p.part + ((b * nhb + hb) * nwb + wb) * 28 * p.C;
    for (int tap = 0; tap < 28; ++tap)
      LV_UNROLL
      for (int v = 0; v < kV; ++v) {
        const int64_t c = cv * kV + v;
        if (c < p.C) part[tap * p.C + c] = red[tap * kRed + threadIdx.x * kV + v];
      }
  }
}

// Thread m of the partial sums' reduction: gw27[tap][c] (tap < 27) and gb[c] (tap 27) = sum over
// partials, in partial order.
LV_DEV void sum_partials_body(const float* __restrict__ part, float* __restrict__ gw27, float* __restrict__ gb, int64_t n_parts, int64_t C, int64_t m) {
  if (m >= 28 * C) return;
  float s = 0.f;
  for (int64_t k = 0; k < n_parts; ++k) s += part[k * 28 * C + m];
  if (m < 27 * C) gw27[m] = s;
  else gb[m - 27 * C] = s;
}

// Whether the grad weight may keep its in-frame offsets in 32 bits: every (row, column, channel) offset
// inside a frame of x, cache and grad_y, with non-negative strides, below 2^31.
inline bool wgrad_off32_ok(const WgradParams& p) {
  const Frames* fs[3] = {&p.x, &p.cache, &p.gy};
  for (const Frames* f : fs) {
    if (f->data == nullptr) continue;
    int64_t span = 0;
    for (int d = 2; d < 5; ++d) {
      if (f->s[d] < 0) return false;
      span += (d == 2 ? p.H - 1 : d == 3 ? p.W - 1 : p.C - 1) * f->s[d];
      if (span >= (int64_t(1) << 31)) return false;
    }
  }
  return true;
}

// Whether every access can use V-element vector loads/stores: channel stride 1, C and every other stride a
// multiple of V, base pointers aligned to V elements.
inline bool vec_ok(const Frames& f, int64_t C, int V, int elem_size) {
  if (f.data == nullptr) return true;
  if (f.s[4] != 1 || C % V != 0) return false;
  for (int d = 0; d < 4; ++d)
    if (f.s[d] % V != 0) return false;
  return reinterpret_cast<uintptr_t>(f.data) % (static_cast<uintptr_t>(V) * elem_size) == 0;
}

inline Frames frames_of(const TensorView& t, bool present = true) {
  Frames f;
  if (!present) return f;
  f.data = t.data;
  for (int d = 0; d < 5; ++d) f.s[d] = t.st(d);
  return f;
}

inline void check_5d(const KernelArgs& a, const TensorView& t, const char* what) {
  if (t.ndim != 5) throw std::invalid_argument(a.name + ": " + what + " must be 5-D");
}

// Forward: tensors [x, cache, w27, bias, y, new_cache], ints [has_cache, has_bias, residual, group_size].
// Grad input: tensors [grad_y, grad_new_cache, wflip27, grad_x, grad_cache], ints [has_cache, residual, group_size].
inline ConvParams make_conv_params(const KernelArgs& a, bool bwd) {
  const TensorView& src = a.t(0);
  check_5d(a, src, bwd ? "grad_y" : "x");
  ConvParams p;
  p.B = src.size(0), p.T = src.size(1), p.H = src.size(2), p.W = src.size(3), p.C = src.size(4);
  p.G = a.i(bwd ? 2 : 3);
  if (p.T >= (int64_t(1) << 30) || p.G >= (int64_t(1) << 30) || p.H >= (int64_t(1) << 30) ||
      p.W >= (int64_t(1) << 30) || p.C >= (int64_t(1) << 30))
    throw std::invalid_argument(a.name + ": frames, rows, columns, channels and group size must be < 2^30");
  p.src = frames_of(src);
  p.aux = frames_of(a.t(1), bwd || a.i(0) != 0);
  p.w27 = a.t(2).ptr<const float>();
  p.bias = (!bwd && a.i(1) != 0) ? a.t(3).ptr<const float>() : nullptr;
  const TensorView &out = a.t(bwd ? 3 : 4), &oc = a.t(bwd ? 4 : 5);
  p.out = out.data;
  for (int d = 0; d < 4; ++d) p.out_s[d] = out.st(d);
  if (!bwd || a.i(0) != 0) {
    p.ocache = oc.data;
    for (int d = 0; d < 4; ++d) p.oc_s[d] = oc.st(d);
  }
  if (out.st(4) != 1 || (p.ocache && oc.st(4) != 1)) throw std::invalid_argument(a.name + ": outputs must have channel stride 1");
  p.residual = a.i(bwd ? 1 : 2) != 0;
  return p;
}

// Whether the conv kernels may take their vector path (ConvBlock<IO, true, BWD>): 16-byte chunks of every
// input, output and cache (channel stride 1, C and the other strides multiples of 16 bytes' worth of
// elements, 16-byte aligned base pointers), and every in-frame offset of the source below 2^31 (the
// staging keeps them in 32 bits).
inline bool conv_vec_ok(const ConvParams& p, int elem_size) {
  const int VL = 16 / elem_size;
  Frames out, oc;
  out.data = p.out;
  oc.data = p.ocache;
  for (int d = 0; d < 4; ++d) out.s[d] = p.out_s[d], oc.s[d] = p.oc_s[d];
  out.s[4] = oc.s[4] = 1;
  if (!(vec_ok(p.src, p.C, VL, elem_size) && vec_ok(p.aux, p.C, VL, elem_size) && vec_ok(out, p.C, VL, elem_size) &&
        vec_ok(oc, p.C, VL, elem_size)))
    return false;
  int64_t span = 0;
  for (int d = 2; d < 5; ++d) {
    if (p.src.s[d] < 0) return false;
    span += (d == 2 ? p.H - 1 : d == 3 ? p.W - 1 : p.C - 1) * p.src.s[d];
  }
  return span < (int64_t(1) << 31);
}

// Grad weight: tensors [x, cache, grad_y, gw27 (27, C) float, gb (C,) float, part (n_parts, 28, C) float],
// ints [has_cache, group_size, rows, cols]; cols must be kWY * kWPW.
inline WgradParams make_wgrad_params(const KernelArgs& a, int64_t* n_parts) {
  const TensorView& x = a.t(0);
  check_5d(a, x, "x");
  WgradParams p;
  p.B = x.size(0), p.T = x.size(1), p.H = x.size(2), p.W = x.size(3), p.C = x.size(4);
  p.G = a.i(1);
  if (p.T >= (int64_t(1) << 30) || p.G >= (int64_t(1) << 30))
    throw std::invalid_argument(a.name + ": frames and group size must be < 2^30");
  p.x = frames_of(x);
  p.cache = frames_of(a.t(1), a.i(0) != 0);
  p.gy = frames_of(a.t(2));
  p.rows = a.i(2);
  if (p.rows < 1 || a.i(3) != kWY * kWPW)
    throw std::invalid_argument(a.name + ": partial tile must be rows >= 1 by " + std::to_string(kWY * kWPW) + " columns");
  const TensorView& part = a.t(5);
  *n_parts = p.B * ((p.H + p.rows - 1) / p.rows) * ((p.W + kWY * kWPW - 1) / (kWY * kWPW));
  if (part.ndim != 3 || part.size(0) != *n_parts || part.size(1) != 28 || part.size(2) != p.C || !part.is_contiguous())
    throw std::invalid_argument(a.name + ": workspace must be a contiguous (" + std::to_string(*n_parts) + ", 28, C) tensor");
  p.part = part.ptr<float>();
  return p;
}

}  // namespace causal_conv
}  // namespace leanvae
