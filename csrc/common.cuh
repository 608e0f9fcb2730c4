// Helpers shared by the GroupNorm kernels: 16-byte vectors of fp32 / fp16 / bf16 (explicit intrinsics: torch
// builds with __CUDA_NO_HALF_CONVERSIONS__), parameter loads of any float dtype, a warp sum, Welford statistics
// merged with Chan's formula, the SM count.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>

#include "group_norm_nhwc.h"  // SdkDtype

namespace {

template <typename T> struct Vec;
template <> struct Vec<float> {
  static constexpr int n = 4;
  static __device__ __forceinline__ void unpack(const uint4& r, float (&f)[4]) {
    f[0] = __uint_as_float(r.x); f[1] = __uint_as_float(r.y); f[2] = __uint_as_float(r.z); f[3] = __uint_as_float(r.w);
  }
  static __device__ __forceinline__ uint4 pack(const float (&f)[4]) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
  }
};
template <> struct Vec<__half> {
  static constexpr int n = 8;
  static __device__ __forceinline__ void unpack(const uint4& r, float (&f)[8]) {
    const __half2* h = reinterpret_cast<const __half2*>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) { const float2 v = __half22float2(h[i]); f[2 * i] = v.x; f[2 * i + 1] = v.y; }
  }
  static __device__ __forceinline__ uint4 pack(const float (&f)[8]) {
    uint4 r;
    __half2* h = reinterpret_cast<__half2*>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
    return r;
  }
};
template <> struct Vec<__nv_bfloat16> {
  static constexpr int n = 8;
  static __device__ __forceinline__ void unpack(const uint4& r, float (&f)[8]) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) { const float2 v = __bfloat1622float2(h[i]); f[2 * i] = v.x; f[2 * i + 1] = v.y; }
  }
  static __device__ __forceinline__ uint4 pack(const float (&f)[8]) {
    uint4 r;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    return r;
  }
};

// weight and bias may come in any float dtype; they are read once per thread, so a runtime switch costs nothing.
__device__ __forceinline__ float load_param(const void* p, int dtype, int i) {
  switch (dtype) {
    case SDK_FLOAT16: return __half2float(static_cast<const __half*>(p)[i]);
    case SDK_BFLOAT16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case SDK_FLOAT64: return static_cast<float>(static_cast<const double*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Rows that row slot r visits in a chunk of m rows (rows r, r + R, r + 2R, ... < m): m / R, one more for r < m % R.
struct SlotRows {
  int q, e;
  __device__ SlotRows(int m, int R) : q(m / R), e(m % R) {}
  __device__ __forceinline__ float operator()(int r) const { return float(q + (r < e)); }
};

// Chan et al.: fold (nb, mb, qb) into (na, ma, qa); either count may be 0. q is the sum of squared deviations.
__device__ __forceinline__ void chan_merge(float& na, float& ma, float& qa, float nb, float mb, float qb) {
  const float n = na + nb;
  const float f = n > 0.f ? nb / n : 0.f;
  const float d = mb - ma;
  ma += d * f;
  qa += qb + d * d * na * f;
  na = n;
}

// One warp per group of a tile merges the tile's per-(row slot, channel) Welford entries (sm_mean, sm_m2: [R][W],
// slot r having folded the rows r, r + R, ... < m) into the group's (mean, M2) and calls emit(group, mean, M2) on
// lane 0: the group mean first, then M2 = sum(M2_e + n_e * (mean_e - mean)^2), every term non-negative. Lane l takes
// entries l, l + 32, ... of the (slot, channel) grid of its group, stepped without integer division.
template <typename Emit>
__device__ __forceinline__ void merge_slot_stats(const float* sm_mean, const float* sm_m2, int R, int W, int cpg,
                                                 int Gs, int m, Emit emit) {
  const int lane = threadIdx.x & 31, dr = 32 / cpg, dc = 32 % cpg;
  const SlotRows rows_of(m, R);
  const float total = float(m) * cpg;
  for (int lg = threadIdx.x >> 5; lg < Gs; lg += blockDim.x >> 5) {
    const float* g_mean = sm_mean + lg * cpg;
    const float* g_m2 = sm_m2 + lg * cpg;
    float s = 0.f;
    for (int rr = lane / cpg, c = lane % cpg; rr < R;) {
      s += rows_of(rr) * g_mean[rr * W + c];
      c += dc;
      rr += dr;
      if (c >= cpg) { c -= cpg; ++rr; }
    }
    const float mu = warp_sum(s) / total;
    float q = 0.f;
    for (int rr = lane / cpg, c = lane % cpg; rr < R;) {
      const float d = g_mean[rr * W + c] - mu;
      q += g_m2[rr * W + c] + rows_of(rr) * d * d;
      c += dc;
      rr += dr;
      if (c >= cpg) { c -= cpg; ++rr; }
    }
    q = warp_sum(q);
    if (lane == 0) emit(lg, mu, q);
  }
}

inline int sm_count() {
  static std::atomic<int> cache[64];  // per device; a benign race fills it with the same value
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) { cudaGetLastError(); return 132; }
  if (dev < 64 && cache[dev].load(std::memory_order_relaxed)) return cache[dev].load(std::memory_order_relaxed);
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) {
    cudaGetLastError();
    return 132;
  }
  if (dev < 64) cache[dev].store(sms, std::memory_order_relaxed);
  return sms;
}

}  // namespace
