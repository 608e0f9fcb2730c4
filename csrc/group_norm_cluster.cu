// GroupNorm (+SiLU) (+residual) over dense channels_last tensors in ONE launch, for tensors that thread-block
// clusters (sm_90) can hold in registers: the small and mid-size activations of the SD UNets, where the two-kernel
// plan of group_norm_nhwc.cu pays two launches and a round trip through a global workspace for a few microseconds
// of memory traffic. Same contract as sdk_group_norm_nhwc (group_norm_nhwc.h).
//
// The plan. Tiles (n, s, p) as in group_norm_nhwc.cu: channel slice s (whole groups, whole 16-byte vectors) of row
// chunk p of sample n. The P chunks of one (n, s) form one cluster, one block each. A block loads its tile into
// registers once (thread t: vector column t % Wv, rows t / Wv + u * R for u < K), then
//   1. folds its rows into per-channel Welford (mean, M2), merges them per group in shared memory (as the
//      two-kernel plan does) into the block's partial, one cluster barrier, and merges the P partials of its groups
//      read from its peers' shared memory (DSMEM) with Chan's formula: mean and variance, never a raw sum of squares;
//   2. normalizes, applies weight, bias, SiLU and residual from registers, writes out.
// x is read from DRAM exactly once and out written once: the floor of the op's bytes.
#include "group_norm_nhwc.h"
#include "common.cuh"

#include <cooperative_groups.h>

#include <algorithm>
#include <numeric>

namespace cg = cooperative_groups;

namespace {

constexpr int kMaxClusterBlocks = 8;  // the portable cluster size
constexpr int kMaxThreads = 512;
// K: rows (16-byte vectors) of x each thread holds; with a residual, as many of it too, so at most half as many
// rows fit under the 128 registers a thread of a 512-thread block can have.
constexpr int kMaxRowsPerThread = 8, kMaxRowsPerThreadWithResidual = 4;

struct ClusterPlan {
  int N, S, C, G, cpg;
  int P, rows;      // blocks per cluster = row chunks per sample, rows per chunk (the last may be shorter)
  int CS;           // channel slices
  int W, Wv, Gs;    // channels, vectors and groups per slice
  int R, K;         // row slots per block, rows per slot (a power of two <= kMaxRowsPerThread)
  int threads;      // R * Wv rounded up to whole warps
};

// The device code needs sm_90 (clusters); compiled for an older architecture the kernel is empty and never launched.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define SDK_HAS_CLUSTERS 1
#else
#define SDK_HAS_CLUSTERS 0
#endif

#if SDK_HAS_CLUSTERS
// An empty asm that "changes" a held vector: each phase then unpacks it anew instead of the compiler keeping the
// first phase's unpacked floats (twice the registers for fp16/bf16) alive until the last.
__device__ __forceinline__ void hold_packed(uint4& v) { asm("" : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w)); }

__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory"); }

#endif

template <typename T, int K, bool SILU, bool RESIDUAL>
__global__ void __launch_bounds__(kMaxThreads, 1) gn_cluster(
    const T* __restrict__ x, long long x_sn, const T* __restrict__ res, long long r_sn, T* __restrict__ out,
    long long o_sn, const void* __restrict__ weight, int weight_dtype, const void* __restrict__ bias, int bias_dtype,
    float eps, const ClusterPlan pl) {
#if SDK_HAS_CLUSTERS
  constexpr int V = Vec<T>::n;
  cg::cluster_group cluster = cg::this_cluster();
  extern __shared__ float4 smem[];
  float* sm_mean = reinterpret_cast<float*>(smem);  // [R][W] per-thread Welford means, then M2 alike
  float* sm_m2 = sm_mean + pl.R * pl.W;
  float2* sm_part = reinterpret_cast<float2*>(sm_m2 + pl.R * pl.W);  // [Gs] this block's (mean, M2), read by peers
  float* sm_w = reinterpret_cast<float*>(sm_part + pl.Gs);          // [W] weight, then bias, of the slice
  float* sm_b = sm_w + pl.W;
  float* sm_gmean = sm_b + pl.W;  // [Gs] the groups' mean and rstd
  float* sm_rstd = sm_gmean + pl.Gs;

  const int p = (int)cluster.block_rank(), s = blockIdx.y % pl.CS, n = blockIdx.y / pl.CS;
  const int row_begin = p * pl.rows, m = min(pl.rows, pl.S - row_begin);
  const int tid = threadIdx.x, col = tid % pl.Wv, r = tid / pl.Wv;
  const bool active = r < pl.R;
  const long long first = ((long long)row_begin + r) * pl.C + s * pl.W + col * V, step = (long long)pl.R * pl.C;

  // x is read once: stream it past L2. The residual's loads go out with x's so their latency overlaps the
  // statistics.
  uint4 xr[K], rr[K];
#pragma unroll
  for (int u = 0; u < K; ++u) {
    if (active && r + u * pl.R < m) {
      xr[u] = __ldcs(reinterpret_cast<const uint4*>(x + n * x_sn + first + u * step));
      if (RESIDUAL) rr[u] = __ldcs(reinterpret_cast<const uint4*>(res + n * r_sn + first + u * step));
    }
  }
  for (int i = tid; i < pl.W; i += blockDim.x) {
    sm_w[i] = weight ? load_param(weight, weight_dtype, s * pl.W + i) : 1.f;
    sm_b[i] = bias ? load_param(bias, bias_dtype, s * pl.W + i) : 0.f;
  }

  // Per-thread Welford over its rows, merged per group in the block, then across the cluster (Chan's formula).
  if (active) {
    float mean[V], m2[V];
#pragma unroll
    for (int j = 0; j < V; ++j) mean[j] = m2[j] = 0.f;
#pragma unroll
    for (int u = 0; u < K; ++u) {
      if (r + u * pl.R < m) {
        float v[V];
        Vec<T>::unpack(xr[u], v);
        const float inv = __frcp_rn(float(u + 1));
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float d = v[j] - mean[j];
          mean[j] += d * inv;
          m2[j] += d * (v[j] - mean[j]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      sm_mean[r * pl.W + col * V + j] = mean[j];
      sm_m2[r * pl.W + col * V + j] = m2[j];
    }
  }
  __syncthreads();
  merge_slot_stats(sm_mean, sm_m2, pl.R, pl.W, pl.cpg, pl.Gs, m,
                   [&](int lg, float mu, float q) { sm_part[lg] = make_float2(mu, q); });
  cluster.sync();  // every block's partials written and visible to the cluster
  for (int lg = tid; lg < pl.Gs; lg += blockDim.x) {
    float2 part[kMaxClusterBlocks];
#pragma unroll
    for (int q = 0; q < kMaxClusterBlocks; ++q)  // all loads in flight at once
      if (q < pl.P) part[q] = cluster.map_shared_rank(sm_part, q)[lg];
    float cnt = 0.f, mu = 0.f, m2 = 0.f;
#pragma unroll
    for (int q = 0; q < kMaxClusterBlocks; ++q)
      if (q < pl.P) chan_merge(cnt, mu, m2, float(min(pl.rows, pl.S - q * pl.rows)) * pl.cpg, part[q].x, part[q].y);
    sm_gmean[lg] = mu;
    sm_rstd[lg] = rsqrtf(fmaxf(m2 / cnt, 0.f) + eps);
  }
  // This block reads no peer's shared memory after here; peers may run on, but none may exit (and free the shared
  // memory others still read) before all have arrived: the matching wait is at the end.
  cluster_arrive();
  __syncthreads();

  // Normalize from registers. fp32: y = (x - mean) * (rstd * w) + b, subtracting first keeps fp32 precision when
  // |mean| >> std; fp16/bf16: y = x * (rstd * w) + (b - mean * rstd * w), whose rounding (2^-24 |mean| / std) is
  // far below their ulp.
  constexpr bool kCenterFirst = sizeof(T) == 4;
  float center[V], scale[V], shift[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int c = col * V + j, lg = c / pl.cpg;
    scale[j] = sm_rstd[lg] * sm_w[c];
    shift[j] = sm_b[c] - (kCenterFirst ? 0.f : sm_gmean[lg] * scale[j]);
    center[j] = kCenterFirst ? sm_gmean[lg] : 0.f;
  }
#pragma unroll
  for (int u = 0; u < K; ++u) {
    if (active && r + u * pl.R < m) {
      float v[V], rv[V];
      hold_packed(xr[u]);
      Vec<T>::unpack(xr[u], v);
      if (RESIDUAL) Vec<T>::unpack(rr[u], rv);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        float y = (v[j] - center[j]) * scale[j] + shift[j];
        if (SILU) y = __fdividef(y, 1.f + __expf(-y));  // y -> -inf: exp overflows, the quotient is -0 as it should
        if (RESIDUAL) y += rv[j];
        v[j] = y;
      }
      __stcs(reinterpret_cast<uint4*>(out + n * o_sn + first + u * step), Vec<T>::pack(v));
    }
  }
  cluster_wait();
#else
  // Clusters need sm_90: the host side never launches this elsewhere (sdk_group_norm_nhwc_cluster_why_not).
  (void)x; (void)x_sn; (void)res; (void)r_sn; (void)out; (void)o_sn; (void)weight; (void)weight_dtype; (void)bias;
  (void)bias_dtype; (void)eps; (void)pl;
#endif
}

int device_major() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) !=
                                                 cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return major;
}

// Row slots and rows per slot for chunks of `rows` rows and Wv vectors per row, or false when they do not fit.
bool fit_block(int rows, int Wv, bool residual, int* R, int* K) {
  const int max_slots = std::max(1, kMaxThreads / Wv);
  const int k_needed = (rows + max_slots - 1) / max_slots;
  if (Wv > kMaxThreads || k_needed > (residual ? kMaxRowsPerThreadWithResidual : kMaxRowsPerThread)) return false;
  int k = 1;
  while (k < k_needed) k *= 2;  // the kernel is instantiated for K = 1, 2, 4, 8
  *K = k;
  *R = (rows + k - 1) / k;    // as few threads as hold the chunk with K rows each
  return true;
}

const char* make_cluster_plan(int N, int S, int C, int G, int dtype, bool residual, int sms, ClusterPlan* out) {
  if (dtype != SDK_FLOAT32 && dtype != SDK_FLOAT16 && dtype != SDK_BFLOAT16) return "x must be float32, float16 or bfloat16";
  if (N < 1 || S < 1 || C < 1 || G < 1) return "empty tensor or no groups";
  if (C % G) return "num_groups does not divide the channels";
  const int vec = dtype == SDK_FLOAT32 ? 4 : 8, esize = 16 / vec;
  if (C % vec) return "channels are not a multiple of 16 bytes (8 fp16/bf16 or 4 fp32 channels)";
  ClusterPlan pl{};
  pl.N = N; pl.S = S; pl.C = C; pl.G = G; pl.cpg = C / G;
  const int unit = std::lcm(vec, pl.cpg), units = C / unit;
  // Wide slices first (whole DRAM sectors per row), then more slices, and per slice count the fewest blocks per
  // cluster that hold the tile: the first plan whose blocks cover the SMs, else the one with the most blocks.
  bool found = false;
  for (int d = 1; d <= units; ++d) {
    if (units % d) continue;
    const int W = C / d, Wv = W / vec;
    if (Wv > kMaxThreads) continue;
    if (found && W * esize < 64) break;  // rows of under 64 bytes would waste DRAM sectors
    for (int P = 1; P <= std::min(kMaxClusterBlocks, S); ++P) {
      const int rows = (S + P - 1) / P;
      int R, K;
      if ((S + rows - 1) / rows != P || !fit_block(rows, Wv, residual, &R, &K)) continue;  // an empty chunk, or too big
      const long long blocks = (long long)N * d * P;
      if (!found || blocks > (long long)N * pl.CS * pl.P) {
        pl.CS = d; pl.W = W; pl.Wv = Wv; pl.Gs = G / d; pl.P = P; pl.rows = rows; pl.R = R; pl.K = K;
        found = true;
      }
      if (blocks >= sms) goto planned;
    }
  }
planned:
  if (!found) return "too large for one cluster of 8 blocks per (sample, channel slice) to hold in registers";
  if ((long long)N * pl.CS > 65535) return "more than 65535 (sample, channel slice) pairs";
  pl.threads = (pl.R * pl.Wv + 31) / 32 * 32;
  *out = pl;
  return nullptr;
}

template <typename T, int K>
cudaError_t launch_k(const SdkGroupNormArgs& a, const ClusterPlan& pl, cudaStream_t stream) {
  using Fn = void (*)(const T*, long long, const T*, long long, T*, long long, const void*, int, const void*, int,
                      float, ClusterPlan);
  // The plan never gives a residual more than kMaxRowsPerThreadWithResidual rows per thread.
  constexpr bool kResidualFits = K <= kMaxRowsPerThreadWithResidual;
  const bool res = kResidualFits && a.residual != nullptr;
  const Fn fn = a.silu ? (res ? gn_cluster<T, K, true, kResidualFits> : gn_cluster<T, K, true, false>)
                       : (res ? gn_cluster<T, K, false, kResidualFits> : gn_cluster<T, K, false, false>);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(pl.P, pl.N * pl.CS, 1);
  cfg.blockDim = dim3(pl.threads, 1, 1);
  cfg.dynamicSmemBytes = (size_t)(2 * pl.R * pl.W + 4 * pl.Gs + 2 * pl.W) * sizeof(float);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = pl.P;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, fn, static_cast<const T*>(a.x), a.x_batch_stride,
                            static_cast<const T*>(a.residual), a.residual_batch_stride, static_cast<T*>(a.out),
                            a.out_batch_stride, a.weight, a.weight_dtype, a.bias, a.bias_dtype, a.eps, pl);
}

template <typename T>
cudaError_t launch(const SdkGroupNormArgs& a, const ClusterPlan& pl, cudaStream_t stream) {
  switch (pl.K) {
    case 1: return launch_k<T, 1>(a, pl, stream);
    case 2: return launch_k<T, 2>(a, pl, stream);
    case 4: return launch_k<T, 4>(a, pl, stream);
    default: return launch_k<T, 8>(a, pl, stream);
  }
}

}  // namespace

const char* sdk_group_norm_nhwc_cluster_why_not(int N, int S, int C, int G, int dtype, bool residual) {
  if (device_major() < 9) return "thread-block clusters need compute capability 9.0 or newer";
  ClusterPlan pl;
  return make_cluster_plan(N, S, C, G, dtype, residual, sm_count(), &pl);
}

cudaError_t sdk_group_norm_nhwc_cluster(const SdkGroupNormArgs& a, cudaStream_t stream) {
  ClusterPlan pl;
  if (device_major() < 9 || make_cluster_plan(a.N, a.S, a.C, a.G, a.dtype, a.residual != nullptr, sm_count(), &pl))
    return cudaErrorInvalidValue;
  switch (a.dtype) {
    case SDK_FLOAT16: return launch<__half>(a, pl, stream);
    case SDK_BFLOAT16: return launch<__nv_bfloat16>(a, pl, stream);
    default: return launch<float>(a, pl, stream);
  }
}
