// GroupNorm (+SiLU) (+residual) over dense channels_last tensors, in plain CUDA (no torch headers).
//
//   out = [silu](group_norm(x + shift, G, weight, bias, eps)) [+ residual]
//
// shift (optional) is an (N, C) tensor added per sample and channel before the statistics (a ResNet block's conv
// bias plus time embedding): it moves each channel's mean and nothing else, so both kernels fold it into per-channel
// constants and never add it per element.
// x is seen as (N, S, C): S the flattened spatial size, channel stride 1, spatial stride C, any batch stride.
// Requirements (sdk_group_norm_nhwc_why_not checks the shape ones; the caller checks the pointers):
//   * C % G == 0 and C a multiple of the 16-byte vector width (8 fp16/bf16 or 4 fp32 channels);
//   * x, residual, out 16-byte aligned, their batch strides multiples of that width;
//   * residual has x's dtype; weight/bias contiguous (C,) of any SdkDtype, or null.
// Statistics are fp32 (per-thread Welford, merged with Chan's formula); see group_norm_nhwc.cu for the plan.
#pragma once

#include <cstddef>
#include <cuda_runtime.h>

enum SdkDtype : int { SDK_FLOAT32 = 0, SDK_FLOAT16 = 1, SDK_BFLOAT16 = 2, SDK_FLOAT64 = 3 };

// The current device's compute capability major (0 where it cannot be read); shared by every kernel file.
inline int sdk_device_major() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) !=
                                                  cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return major;
}

struct SdkGroupNormArgs {
  const void* x;             // dtype: SDK_FLOAT32, SDK_FLOAT16 or SDK_BFLOAT16
  const void* weight;        // (C,) or null (= ones)
  const void* bias;          // (C,) or null (= zeros)
  const void* residual;      // like x, or null
  const void* shift;         // (N, C), channel stride 1, of any SdkDtype, or null (= zeros)
  void* out;                 // like x
  void* workspace;           // sdk_group_norm_nhwc_workspace_bytes(...) bytes, 8-byte aligned, no init needed
  long long x_batch_stride, residual_batch_stride, out_batch_stride, shift_batch_stride;  // in elements
  int N, S, C, G;
  int dtype, weight_dtype, bias_dtype, shift_dtype;
  float eps;
  bool silu;
};

// nullptr when the kernels support this shape and dtype, else a short reason (a static string).
const char* sdk_group_norm_nhwc_why_not(int N, int S, int C, int G, int dtype);

// Bytes of workspace the launch needs on the current device (it depends on the device's SM count).
size_t sdk_group_norm_nhwc_workspace_bytes(int N, int S, int C, int G, int dtype);

// The one-kernel plan (group_norm_nhwc_cluster.cu, sm_90+, where a cluster's registers hold a sample's channel slice):
// nullptr where it applies to this shape on the current device, else why not. sdk_group_norm_nhwc takes it there.
const char* sdk_group_norm_nhwc_cluster_why_not(int N, int S, int C, int G, int dtype);
// Plans once and, where the plan applies, enqueues it: nullptr then (*err the launch's error), else why not (nothing
// enqueued, *err untouched).
const char* sdk_group_norm_nhwc_cluster(const SdkGroupNormArgs& args, cudaStream_t stream, cudaError_t* err);

// Enqueues the one-kernel plan where it applies, else the two kernels, on `stream` (current device); returns the
// launch error, if any. No host sync, no memset: safe to capture in a CUDA graph.
cudaError_t sdk_group_norm_nhwc(const SdkGroupNormArgs& args, cudaStream_t stream);
