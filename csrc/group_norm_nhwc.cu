// GroupNorm (+SiLU) (+residual) over dense channels_last tensors, with an optional per-(sample, channel) shift of
// the input: see group_norm_nhwc.h for the contract.
//
// The plan. A sample is S rows of C contiguous channels. The work is cut into tiles (n, p, s): row chunk p of
// sample n (P chunks per sample) and channel slice s (CS slices; a slice holds whole groups and whole 16-byte
// vectors, so no vector ever needs the statistics of a group outside its tile). Two kernels walk the same tiles:
//   1. gn_stats: each thread owns one vector column of the tile and folds its rows into per-channel Welford
//      (mean, M2); the block merges them (Chan's formula, two passes in shared memory) into one (mean, M2) per
//      group and writes it as partial p of that group. Per-thread Welford, never a sum of squares: VAE groups have
//      4M elements whose mean can be large next to their spread.
//   2. gn_apply: each block merges the P partials of its groups (Chan's formula again), turns them into a
//      per-channel scale and shift held in registers, and streams its tile: read x (mostly from L2), write out.
// P is kept small enough that re-reading the partials in every apply block costs little (see make_plan); the
// channel slices supply the parallelism that small P leaves out, so small SD shapes still fill the GPU.
#include "group_norm_nhwc.h"

#include "group_norm_device.cuh"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <numeric>

namespace {

using namespace sdk_gn;

constexpr int kUnroll = 4;          // rows in flight per thread: enough bytes in flight to hide DRAM latency
constexpr int kMaxThreads = 512;    // the widest slice (in vectors) one block takes
constexpr int kTargetThreads = 256;

struct Plan {
  int N, S, C, G;
  int cpg;        // channels per group
  int P, rows;    // row chunks per sample (= partials per group) and rows per chunk (the last may be shorter)
  int CS;         // channel slices per row
  int W, Wv, Gs;  // channels, 16-byte vectors and groups per slice
  int R;          // rows a block works on at once; thread t has column t % Wv and row slot t / Wv
  int threads;    // R * Wv rounded up to whole warps (the extra threads only help merge)
};

struct Tile {
  int n, p, s, row_begin, m;  // m: rows in this chunk
};

__device__ __forceinline__ Tile tile_of(const Plan& pl, int b) {
  Tile t;
  t.s = b % pl.CS;  // slices vary fastest: neighbouring blocks read neighbouring bytes
  b /= pl.CS;
  t.p = b % pl.P;
  t.n = b / pl.P;
  t.row_begin = t.p * pl.rows;
  t.m = min(pl.rows, pl.S - t.row_begin);
  return t;
}

// Rows that row slot r visits in a chunk of m rows (rows r, r + R, r + 2R, ... < m): m / R, one more for r < m % R.
struct SlotRows {
  int q, e;
  __device__ SlotRows(int m, int R) : q(m / R), e(m % R) {}
  __device__ __forceinline__ float operator()(int r) const { return float(q + (r < e)); }
};

// ---- kernel 1: one (mean, M2) partial per (sample, row chunk, group) ---------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kMaxThreads, 2) gn_stats(const T* __restrict__ x, long long x_sn,
                                                        const void* __restrict__ pre_shift, int pre_shift_dtype,
                                                        long long pre_shift_sn, float2* __restrict__ partials,
                                                        const Plan pl) {
  constexpr int V = Vec<T>::n;
  extern __shared__ float4 smem[];
  float* sm_mean = reinterpret_cast<float*>(smem);  // [row slot][channel of the slice], then M2 alike
  float* sm_m2 = sm_mean + blockDim.x * V;
  const Tile t = tile_of(pl, blockIdx.x);
  const int tid = threadIdx.x, col = tid % pl.Wv, r = tid / pl.Wv;
  wait_for_prerequisite_grid();  // launched as a programmatic dependent too: x may still be being written
  allow_dependent_launch();

  float mean[V], m2[V];
#pragma unroll
  for (int j = 0; j < V; ++j) mean[j] = m2[j] = 0.f;
  if (r < pl.R) {
    const T* base = x + t.n * x_sn + (long long)t.row_begin * pl.C + t.s * pl.W + col * V;
    int k = 0;  // rows folded so far: the same for every channel, so one reciprocal serves all V
    for (int i = r; i < t.m; i += pl.R * kUnroll) {
      uint4 raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (i + u * pl.R < t.m) raw[u] = __ldg(reinterpret_cast<const uint4*>(base + (long long)(i + u * pl.R) * pl.C));
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (i + u * pl.R >= t.m) break;
        float v[V];
        Vec<T>::unpack(raw[u], v);
        const float inv = __frcp_rn(float(++k));
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float d = v[j] - mean[j];
          mean[j] += d * inv;
          m2[j] += d * (v[j] - mean[j]);
        }
      }
    }
  }
  // shift[n, c] added to every x of channel c moves that channel's Welford mean by it and leaves its M2 (a slot
  // that saw no rows has weight 0 in the merge below, whatever its mean).
  if (pre_shift != nullptr) {
    const int c0 = (int)(t.n * pre_shift_sn) + t.s * pl.W + col * V;
    float shift[V];
    load_params(pre_shift, pre_shift_dtype, c0, 0.f, shift);
#pragma unroll
    for (int j = 0; j < V; ++j) mean[j] += shift[j];
  }
  // Thread t's channels sit at t * V: row slot r, slice channel col * V.
#pragma unroll
  for (int j = 0; j < V; j += 4) {
    *reinterpret_cast<float4*>(sm_mean + tid * V + j) = make_float4(mean[j], mean[j + 1], mean[j + 2], mean[j + 3]);
    *reinterpret_cast<float4*>(sm_m2 + tid * V + j) = make_float4(m2[j], m2[j + 1], m2[j + 2], m2[j + 3]);
  }
  __syncthreads();

  // One warp per group merges its R * cpg (row slot, channel) entries: group mean first, then
  // M2 = sum(M2_e + n_e * (mean_e - mean)^2), every term non-negative.
  // Lane l takes entries l, l + 32, ... of the (slot rr, channel c) grid, stepped without integer division.
  const int lane = tid & 31, cpg = pl.cpg, dr = 32 / cpg, dc = 32 % cpg;
  const SlotRows rows_of(t.m, pl.R);
  const float total = float(t.m) * cpg;
  for (int lg = tid >> 5; lg < pl.Gs; lg += blockDim.x >> 5) {
    const float* g_mean = sm_mean + lg * cpg;
    const float* g_m2 = sm_m2 + lg * cpg;
    float s = 0.f;
    for (int rr = lane / cpg, c = lane % cpg; rr < pl.R;) {
      s += rows_of(rr) * g_mean[rr * pl.W + c];
      c += dc;
      rr += dr;
      if (c >= cpg) { c -= cpg; ++rr; }
    }
    const float mu = warp_sum(s) / total;
    float q = 0.f;
    for (int rr = lane / cpg, c = lane % cpg; rr < pl.R;) {
      const float d = g_mean[rr * pl.W + c] - mu;
      q += g_m2[rr * pl.W + c] + rows_of(rr) * d * d;
      c += dc;
      rr += dr;
      if (c >= cpg) { c -= cpg; ++rr; }
    }
    q = warp_sum(q);
    if (lane == 0) partials[((long long)t.n * pl.G + t.s * pl.Gs + lg) * pl.P + t.p] = make_float2(mu, q);
  }
}

// ---- kernel 2: merge the partials of the tile's groups, normalize the tile -------------------------------------

template <typename T, bool SILU, bool RESIDUAL>
__global__ void __launch_bounds__(kMaxThreads, 2) gn_apply(
    const T* __restrict__ x, long long x_sn, const T* __restrict__ res, long long r_sn, T* __restrict__ out,
    long long o_sn, const void* __restrict__ weight, int weight_dtype, const void* __restrict__ bias, int bias_dtype,
    const void* __restrict__ pre_shift, int pre_shift_dtype, long long pre_shift_sn,
    const float2* __restrict__ partials, float eps, const Plan pl) {
  constexpr int V = Vec<T>::n;
  extern __shared__ float4 smem[];
  float* sm_mean = reinterpret_cast<float*>(smem);
  float* sm_rstd = sm_mean + pl.Gs;
  // gn_stats ran its tiles in order, each from its first row to its last: what L2 still holds is the last tiles
  // and the end of every tile, so walk tiles backwards and each tile's rows from the end.
  const Tile t = tile_of(pl, gridDim.x - 1 - blockIdx.x);
  const int tid = threadIdx.x, lane = tid & 31;
  // gn_stats' partials. gn_apply does not let the next kernel launch early: where that kernel was the next call's
  // gn_stats, 2x320x64x64 took 13.0 us against 11.5 (and 2x1280x32x32 12.7 against 11.8), though the small shapes
  // gained ~0.6 us (H200, bench_group_norm, CUDA backend forced, same call, twice each).
  wait_for_prerequisite_grid();

  for (int lg = tid >> 5; lg < pl.Gs; lg += blockDim.x >> 5) {
    const float2* part = partials + ((long long)t.n * pl.G + t.s * pl.Gs + lg) * pl.P;
    float n = 0.f, mu = 0.f, q = 0.f;
    for (int p = lane; p < pl.P; p += 32) {
      const float2 v = part[p];
      chan_merge(n, mu, q, float(min(pl.rows, pl.S - p * pl.rows)) * pl.cpg, v.x, v.y);
    }
#pragma unroll
    for (int o = 16; o; o >>= 1) {
      const float n2 = __shfl_xor_sync(0xffffffffu, n, o), mu2 = __shfl_xor_sync(0xffffffffu, mu, o),
                  q2 = __shfl_xor_sync(0xffffffffu, q, o);
      chan_merge(n, mu, q, n2, mu2, q2);
    }
    if (lane == 0) {
      sm_mean[lg] = mu;
      sm_rstd[lg] = rsqrtf(fmaxf(q / n, 0.f) + eps);
    }
  }
  __syncthreads();

  const int col = tid % pl.Wv, r = tid / pl.Wv;
  if (r >= pl.R || r >= t.m) return;
  const int c0 = t.s * pl.W + col * V;
  // fp32: y = (x - mean) * (rstd * w) + b, subtracting first keeps fp32 precision when |mean| >> std.
  // fp16/bf16: y = x * (rstd * w) + (b - mean * rstd * w) rounds to 2^-24 * |mean| / std, far below their output
  // ulp, and saves the 8 registers that keep the residual variants from spilling.
  constexpr bool kCenterFirst = sizeof(T) == 4;
  float mu[V], scale[V], shift[V];
  // x + pre_shift - mean: the pre-shift joins the mean, a per-channel constant (mu holds the centre for now)
#pragma unroll
  for (int j = 0; j < V; ++j) mu[j] = sm_mean[(col * V + j) / pl.cpg];
  float pre[V];
  load_params(pre_shift, pre_shift_dtype, (int)(t.n * pre_shift_sn) + c0, 0.f, pre);
  load_params(weight, weight_dtype, c0, 1.f, scale);
  load_params(bias, bias_dtype, c0, 0.f, shift);
#pragma unroll
  for (int j = 0; j < V; ++j) {
    mu[j] -= pre[j];
    scale[j] *= sm_rstd[(col * V + j) / pl.cpg];
    shift[j] -= kCenterFirst ? 0.f : mu[j] * scale[j];
    if (!kCenterFirst) mu[j] = 0.f;
  }
  const long long first = ((long long)t.row_begin + r) * pl.C + c0, step = (long long)pl.R * pl.C;
  const T* xb = x + t.n * x_sn + first;
  const T* rb = RESIDUAL ? res + t.n * r_sn + first : nullptr;
  T* ob = out + t.n * o_sn + first;
  // x and residual are read for the last time and out is not read here again: streaming hints keep them from
  // pushing the rest of x out of L2.
  // With a residual, half the rows in flight still keep as many bytes in flight, in 64 registers.
  constexpr int U = RESIDUAL ? kUnroll / 2 : kUnroll;
  for (int k = (t.m - 1 - r) / pl.R; k >= 0; k -= U) {
    uint4 xr[U], rr[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (k - u < 0) break;
      xr[u] = __ldcs(reinterpret_cast<const uint4*>(xb + (k - u) * step));
      if (RESIDUAL) rr[u] = __ldcs(reinterpret_cast<const uint4*>(rb + (k - u) * step));
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (k - u < 0) break;
      float v[V], rv[V];
      Vec<T>::unpack(xr[u], v);
      if (RESIDUAL) Vec<T>::unpack(rr[u], rv);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        float y = (kCenterFirst ? v[j] - mu[j] : v[j]) * scale[j] + shift[j];
        if (SILU) y = __fdividef(y, 1.f + __expf(-y));  // y -> -inf: exp overflows, the quotient is -0 as it should
        if (RESIDUAL) y += rv[j];
        v[j] = y;
      }
      __stcs(reinterpret_cast<uint4*>(ob + (k - u) * step), Vec<T>::pack(v));
    }
  }
}

// ---- host side -----------------------------------------------------------------------------------------------

const char* make_plan(int N, int S, int C, int G, int dtype, int sms, Plan* out) {
  if (dtype != SDK_FLOAT32 && dtype != SDK_FLOAT16 && dtype != SDK_BFLOAT16) return "x must be float32, float16 or bfloat16";
  if (N < 1 || S < 1 || C < 1 || G < 1) return "empty tensor or no groups";
  if (C % G) return "num_groups does not divide the channels";
  const int vec = dtype == SDK_FLOAT32 ? 4 : 8;
  if (C % vec) return "channels are not a multiple of 16 bytes (8 fp16/bf16 or 4 fp32 channels)";
  Plan pl;
  pl.N = N; pl.S = S; pl.C = C; pl.G = G; pl.cpg = C / G;
  // The narrowest slice that holds whole groups and whole vectors; C is a multiple of it.
  const int unit = std::lcm(vec, pl.cpg), units = C / unit;
  // Blocks: up to 4 per SM of 256 threads, fewer when the tensor is too small to give each thread 2 rows. Aiming
  // at 2 rows per thread rather than kUnroll (4) took 5-12% off the SD1.5 UNet shapes of 1024 positions and
  // 2x320x64x64, ~1 us off the smaller ones, nothing at 2x640x64x64 and 2x960x64x64 (H200, bench/NOTES.md,
  // session 9): one DRAM round trip per thread instead of two.
  // SDKERNELS_GN_PLAN="rows,blocks_per_sm" overrides both numbers (a probe knob: scripts/probe_gn_plan.sh).
  static const int2 knobs = [] {
    int2 k = make_int2(2, 4);
    if (const char* e = std::getenv("SDKERNELS_GN_PLAN")) std::sscanf(e, "%d,%d", &k.x, &k.y);
    return make_int2(std::max(k.x, 1), std::max(k.y, 1));
  }();
  const long long vectors = (long long)N * S * (C / vec);
  const long long target = std::clamp<long long>(vectors / (knobs.x * kTargetThreads), 1, (long long)knobs.y * sms);
  // Every apply block re-reads the P partials (8 bytes) of each of its groups; P^2 <= S * cpg / 32 keeps that
  // under 1/8 of the block's fp16 tile.
  const long long p_cap = std::max<long long>(
      1, std::min<long long>({(long long)S, 1024, (long long)std::sqrt((double)S * pl.cpg / 32.0)}));
  // Split rows first (wide slices read whole DRAM sectors), then channels until there are enough blocks.
  pl.CS = 0;
  for (int d = 1; d <= units; ++d) {
    if (units % d) continue;
    const int wv = C / d / vec;
    if (wv > kMaxThreads) continue;        // too wide for one block: more slices
    if (pl.CS && wv * 16 < 64) break;      // rows of under 64 bytes a slice would waste DRAM sectors
    pl.CS = d;
    if ((long long)N * p_cap * d >= target) break;
  }
  if (!pl.CS) return "the smallest channel slice holding whole groups and whole vectors is wider than 512 vectors";
  const long long per_sample = (target + (long long)N * pl.CS - 1) / ((long long)N * pl.CS);
  const long long P = std::max<long long>(1, std::min(p_cap, per_sample));
  pl.rows = (int)(((long long)S + P - 1) / P);
  pl.P = (int)(((long long)S + pl.rows - 1) / pl.rows);  // no empty chunk
  pl.W = C / pl.CS;
  pl.Wv = pl.W / vec;
  pl.Gs = G / pl.CS;
  pl.R = std::clamp((pl.rows + kUnroll - 1) / kUnroll, 1, std::max(1, kTargetThreads / pl.Wv));
  pl.threads = (pl.R * pl.Wv + 31) / 32 * 32;
  if ((long long)N * pl.P * pl.CS > INT_MAX) return "too many tiles";
  *out = pl;
  return nullptr;
}

template <typename T>
cudaError_t launch(const SdkGroupNormArgs& a, const Plan& pl, cudaStream_t stream) {
  using ApplyFn = void (*)(const T*, long long, const T*, long long, T*, long long, const void*, int, const void*, int,
                           const void*, int, long long, const float2*, float, Plan);
  const bool res = a.residual != nullptr;
  const ApplyFn apply = a.silu ? (res ? gn_apply<T, true, true> : gn_apply<T, true, false>)
                               : (res ? gn_apply<T, false, true> : gn_apply<T, false, false>);
  const int blocks = pl.N * pl.P * pl.CS;
  float2* partials = static_cast<float2*>(a.workspace);
  const size_t stats_smem = (size_t)pl.threads * Vec<T>::n * 2 * sizeof(float);  // <= 32 KiB
  // Both kernels are programmatic dependents (group_norm_device.cuh): gn_stats launched so took 0.1-0.3 us off
  // gn_apply's alone (H200, same call as above).
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(pl.threads);
  cfg.dynamicSmemBytes = stats_smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = programmatic_launch_enabled() ? 1 : 0;
  cudaError_t err = cudaLaunchKernelEx(&cfg, gn_stats<T>, static_cast<const T*>(a.x), a.x_batch_stride, a.shift,
                                       a.shift_dtype, a.shift_batch_stride, partials, pl);
  if (err != cudaSuccess) return err;
  cfg.dynamicSmemBytes = 2 * pl.Gs * sizeof(float);
  return cudaLaunchKernelEx(&cfg, apply, static_cast<const T*>(a.x), a.x_batch_stride,
                            static_cast<const T*>(a.residual), a.residual_batch_stride, static_cast<T*>(a.out),
                            a.out_batch_stride, a.weight, a.weight_dtype, a.bias, a.bias_dtype, a.shift,
                            a.shift_dtype, a.shift_batch_stride, static_cast<const float2*>(partials), a.eps, pl);
}

}  // namespace

const char* sdk_group_norm_nhwc_why_not(int N, int S, int C, int G, int dtype) {
  Plan pl;
  return make_plan(N, S, C, G, dtype, 132, &pl);  // the SM count changes how the work is cut, not whether it can be
}

size_t sdk_group_norm_nhwc_workspace_bytes(int N, int S, int C, int G, int dtype) {
  Plan pl;
  if (make_plan(N, S, C, G, dtype, sm_count(), &pl)) return 0;
  return (size_t)N * G * pl.P * sizeof(float2);
}

cudaError_t sdk_group_norm_nhwc(const SdkGroupNormArgs& a, cudaStream_t stream) {
  Plan pl;
  if (make_plan(a.N, a.S, a.C, a.G, a.dtype, sm_count(), &pl)) return cudaErrorInvalidValue;
  cudaError_t err = cudaSuccess;
  if (!sdk_group_norm_nhwc_cluster(a, stream, &err)) return err;  // the one-kernel plan applied
  switch (a.dtype) {
    case SDK_FLOAT16: return launch<__half>(a, pl, stream);
    case SDK_BFLOAT16: return launch<__nv_bfloat16>(a, pl, stream);
    default: return launch<float>(a, pl, stream);
  }
}
