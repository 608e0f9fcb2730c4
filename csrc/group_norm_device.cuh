// Helpers of the channels_last GroupNorm kernels (group_norm_nhwc.cu: two kernels over row chunks;
// group_norm_nhwc_cluster.cu: one kernel, a thread block cluster per channel slice). Included by those files only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cstdlib>

#include "group_norm_nhwc.h"

namespace sdk_gn {

// ---- 16-byte vectors of fp32 / fp16 / bf16 (explicit intrinsics: torch builds with __CUDA_NO_HALF_CONVERSIONS__)

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

// n consecutive parameters p[i .. i + n) into out[] (absent: p null), with one switch: a switch per element, unrolled
// over a vector and over several parameters, let the compiler thread one into the next (a minute of nvcc a kernel).
template <int n>
__device__ __forceinline__ void load_params(const void* p, int dtype, int i, float absent, float (&out)[n]) {
  if (p == nullptr) {
#pragma unroll
    for (int j = 0; j < n; ++j) out[j] = absent;
    return;
  }
  switch (dtype) {
    case SDK_FLOAT16:
#pragma unroll
      for (int j = 0; j < n; ++j) out[j] = __half2float(static_cast<const __half*>(p)[i + j]);
      break;
    case SDK_BFLOAT16:
#pragma unroll
      for (int j = 0; j < n; ++j) out[j] = __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i + j]);
      break;
    case SDK_FLOAT64:
#pragma unroll
      for (int j = 0; j < n; ++j) out[j] = static_cast<float>(static_cast<const double*>(p)[i + j]);
      break;
    default:
#pragma unroll
      for (int j = 0; j < n; ++j) out[j] = static_cast<const float*>(p)[i + j];
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Chan et al.: fold (nb, mb, qb) into (na, ma, qa); either count may be 0. q is the sum of squared deviations.
__device__ __forceinline__ void chan_merge(float& na, float& ma, float& qa, float nb, float mb, float qb) {
  const float n = na + nb;
  const float f = n > 0.f ? nb / n : 0.f;
  const float d = mb - ma;
  ma += d * f;
  qa += qb + d * d * na * f;
  na = n;
}

// Programmatic dependent launch (sm_90): gn_stats lets gn_apply be launched as soon as all its blocks run, so
// gn_apply's launch and scheduling overlap gn_stats instead of following it; gn_apply waits for gn_stats to complete
// (its partials written and flushed) before reading them. gn_stats is launched the same way after whatever kernel
// came before it, and waits for that one. No-ops before sm_90, where the launch is plain.
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_for_prerequisite_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// An attribute of the current device, cached per device (a benign race fills a slot with the same value), or
// `fallback` where it cannot be read.
template <cudaDeviceAttr kAttr>
int device_attribute(int fallback) {
  static std::atomic<int> cache[64];  // 0: not asked yet
  int dev = 0, value = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) { cudaGetLastError(); return fallback; }
  if (dev < 64 && cache[dev].load(std::memory_order_relaxed)) return cache[dev].load(std::memory_order_relaxed);
  if (cudaDeviceGetAttribute(&value, kAttr, dev) != cudaSuccess || value <= 0) {
    cudaGetLastError();
    return fallback;
  }
  if (dev < 64) cache[dev].store(value, std::memory_order_relaxed);
  return value;
}

inline int sm_count() { return device_attribute<cudaDevAttrMultiProcessorCount>(132); }
inline int device_major() { return device_attribute<cudaDevAttrComputeCapabilityMajor>(0); }

// Both plans' kernels launch as programmatic dependents of the kernel before them on sm_90+ (each waits for it
// before touching memory). SDKERNELS_GN_PDL=0 launches them plainly (a probe knob, to time both in one run).
inline bool programmatic_launch_enabled() {
  static const bool pdl = [] {
    const char* e = std::getenv("SDKERNELS_GN_PDL");
    return !(e && e[0] == '0');
  }();
  return pdl && device_major() >= 9;
}

}  // namespace sdk_gn
