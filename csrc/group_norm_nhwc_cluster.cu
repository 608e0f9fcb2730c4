// GroupNorm (+SiLU) (+residual) over dense channels_last tensors in ONE kernel on sm_90+, where a sample's channel
// slice fits the registers of one thread block cluster: see group_norm_nhwc.h for the contract.
//
// The plan. Tiles as in group_norm_nhwc.cu, (sample n, channel slice s, row chunk p), but the P row chunks of one
// (n, s) are the P blocks of one cluster, and each thread keeps the rows it reads in registers. Each thread folds its
// rows by Welford; each block merges them into one (count, mean, M2) per group; one exchange through distributed
// shared memory merges the cluster's P blocks; then every block normalizes the rows it holds. x is read once and out
// written once, in one launch, where the two-kernel plan reads x twice and launches twice.
#include "group_norm_nhwc.h"

#include "group_norm_device.cuh"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <numeric>
#include <tuple>

// Named, not internal: on sm_80, where the kernel's body is empty, unreferenced internal functions are errors.
namespace sdk_gn_cluster {

// Thread block clusters (sm_90; the kernel's body is empty below, where nothing calls these).
__device__ __forceinline__ void cluster_arrive() {  // this thread's shared-memory writes and reads are done
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_wait() {  // every thread of every block of the cluster has arrived
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}

// A float4 in the shared memory of block `rank` of the cluster, at the place of `p` in this block's.
__device__ __forceinline__ float4 load_from_block(const float4* p, int rank) {
  float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const uint32_t local = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(remote) : "memory");
#endif
  return v;
}

// Merges (count, mean, M2) statistics over the lanes of a warp, every lane ending with the whole: the mean first
// (a sum of count * mean), then M2 = sum(M2_i + count_i * (mean_i - mean)^2), every term non-negative. The
// butterfly adds in the same order in every warp that holds the same values, so every block of a cluster merging the
// same P partials gets the same bits.
__device__ __forceinline__ float2 warp_merge(float count, float mean, float m2, float total) {
  const float mu = sdk_gn::warp_sum(count * mean) / total;
  const float d = mean - mu;
  return make_float2(mu, sdk_gn::warp_sum(count > 0.f ? m2 + count * d * d : 0.f));
}

}  // namespace sdk_gn_cluster

namespace {

using namespace sdk_gn;
using namespace sdk_gn_cluster;

constexpr int kHold = 8;          // most rows a thread holds (one 16-byte vector each: 32 registers)
constexpr int kMaxThreads = 512;  // the widest block
constexpr int kMaxCluster = 8;    // the portable cluster size: every sm_90 part can co-schedule it

struct ClusterPlan {
  int S, C, G, cpg;
  int P, rows;        // blocks per cluster (row chunks of a slice), rows per chunk (the last may be shorter)
  int CS, W, Wv, Gs;  // channel slices per row; channels, 16-byte vectors and groups per slice
  int R, hold;        // row slots (thread t: vector column t % Wv, slot t / Wv) and rows per slot (<= kHold)
  int threads;        // R * Wv rounded up to whole warps
};

// Shared memory: (count, mean, M2) per group (this block's, read by the whole cluster), the groups' (mean, rstd), and
// (mean, M2) per (slot, slice channel) and per slice channel.
size_t cluster_smem_bytes(const ClusterPlan& pl, int V) {
  return pl.Gs * sizeof(float4) + ((size_t)pl.Gs + (size_t)pl.threads * V + pl.W) * sizeof(float2);
}
constexpr size_t kMaxSmem = 48 * 1024;  // the dynamic shared memory a launch gets without opting in

template <typename T, bool SILU, bool RESIDUAL>
__global__ void __launch_bounds__(kMaxThreads, 1) gn_cluster(
    const T* __restrict__ x, long long x_sn, const T* __restrict__ res, long long r_sn, T* __restrict__ out,
    long long o_sn, const void* __restrict__ weight, int weight_dtype, const void* __restrict__ bias, int bias_dtype,
    const void* __restrict__ pre_shift, int pre_shift_dtype, long long pre_shift_sn, float eps, const ClusterPlan pl) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int V = Vec<T>::n;
  extern __shared__ float4 smem[];
  float4* sm_group = smem;                                           // [group]: (count, mean, M2) of this block
  float2* sm_stat = reinterpret_cast<float2*>(sm_group + pl.Gs);     // [group]: (mean, rstd)
  float2* sm_chan = sm_stat + pl.Gs;                                 // [slot][slice channel]: (mean, M2)
  float2* sm_col = sm_chan + pl.threads * V;                         // [slice channel]: (mean, M2)
  const int p = blockIdx.x % pl.P, s = blockIdx.x / pl.P % pl.CS, n = blockIdx.x / (pl.P * pl.CS);
  const int row_begin = p * pl.rows, m = min(pl.rows, pl.S - row_begin);
  const int tid = threadIdx.x, col = tid % pl.Wv, r = tid / pl.Wv, lane = tid & 31;
  const int c0 = s * pl.W + col * V;  // this thread's first channel
  // The rows held: xb[u * step]; step * kHold < 2^31 (make_cluster_plan), 32-bit offsets from one base pointer.
  const long long first = ((long long)row_begin + r) * pl.C + c0;
  const int step = pl.R * pl.C;
  const T* xb = x + n * x_sn + first;
  T* ob = out + n * o_sn + first;
  const int shift_row = (int)(n * pre_shift_sn);
  auto held = [&](int u) { return r < pl.R && u < pl.hold && r + u * pl.R < m; };
  wait_for_prerequisite_grid();  // a programmatic dependent: x may still be being written

  // Every load in flight at once: one DRAM round trip per thread.
  uint4 xr[kHold];
#pragma unroll
  for (int u = 0; u < kHold; ++u)
    if (held(u)) xr[u] = __ldg(reinterpret_cast<const uint4*>(xb + u * step));

  // Per-thread Welford over the rows held (the u-th row's weight 1 / (u + 1) a constant), never a sum of squares:
  // VAE-like groups can have a mean far from zero next to their spread.
  float mean[V], m2[V];
#pragma unroll
  for (int j = 0; j < V; ++j) mean[j] = m2[j] = 0.f;
#pragma unroll
  for (int u = 0; u < kHold; ++u) {
    if (!held(u)) continue;
    float v[V];
    Vec<T>::unpack(xr[u], v);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float d = v[j] - mean[j];
      mean[j] += d * (1.f / (u + 1));
      m2[j] += d * (v[j] - mean[j]);
    }
  }
#pragma unroll
  for (int j = 0; j < V; ++j) sm_chan[tid * V + j] = make_float2(mean[j], m2[j]);
  __syncthreads();
  // Each slice channel over the R slots (slot r held q + (r < e) rows), then each group over its channels, both by
  // mean first and M2 after. A channel's shift moves its mean and nothing else.
  const int q = m / pl.R, e = m % pl.R;
  for (int c = tid; c < pl.W; c += blockDim.x) {
    float sum = 0.f;
    for (int rr = 0; rr < pl.R; ++rr) sum += float(q + (rr < e)) * sm_chan[rr * pl.W + c].x;
    const float mu = sum / m;
    float q2 = 0.f;
    for (int rr = 0; rr < pl.R; ++rr) {
      const float2 st = sm_chan[rr * pl.W + c];
      const float d = st.x - mu;
      q2 += st.y + float(q + (rr < e)) * d * d;
    }
    sm_col[c] = make_float2(mu + (pre_shift ? load_param(pre_shift, pre_shift_dtype, shift_row + s * pl.W + c) : 0.f),
                            q2);
  }
  __syncthreads();
  for (int g = tid >> 5; g < pl.Gs; g += blockDim.x >> 5) {
    float n_l = 0.f, mu_l = 0.f, q_l = 0.f;  // lane l folds channels l, l + 32, ... of the group
    for (int c = lane; c < pl.cpg; c += 32) {
      const float2 st = sm_col[g * pl.cpg + c];
      chan_merge(n_l, mu_l, q_l, float(m), st.x, st.y);
    }
    const float2 merged = warp_merge(n_l, mu_l, q_l, float(m) * pl.cpg);
    if (lane == 0) sm_group[g] = make_float4(float(m) * pl.cpg, merged.x, merged.y, 0.f);
  }
  cluster_arrive();  // this block's group statistics written
  cluster_wait();
  const float count = float(pl.S) * pl.cpg;
  for (int g = tid >> 5; g < pl.Gs; g += blockDim.x >> 5) {
    const float4 b = lane < pl.P ? load_from_block(sm_group + g, lane) : make_float4(0.f, 0.f, 0.f, 0.f);
    const float2 merged = warp_merge(b.x, b.y, b.z, count);
    if (lane == 0) sm_stat[g] = make_float2(merged.x, rsqrtf(fmaxf(merged.y / count, 0.f) + eps));
  }
  // This block's statistics stay readable until every block has read them: arrive now, wait just before leaving.
  cluster_arrive();
  __syncthreads();

  // As gn_apply: fp32 subtracts the mean first; fp16/bf16 fold it into the offset (2^-24 |mean| / std, far below
  // their output ulp). x - mu = x + shift - mean.
  constexpr bool kCenterFirst = sizeof(T) == 4;
  float mu[V], scale[V], offset[V];
  load_params(pre_shift, pre_shift_dtype, shift_row + c0, 0.f, mu);
  load_params(weight, weight_dtype, c0, 1.f, scale);
  load_params(bias, bias_dtype, c0, 0.f, offset);
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const float2 st = sm_stat[(col * V + j) / pl.cpg];
    mu[j] = st.x - mu[j];
    scale[j] *= st.y;
    offset[j] -= kCenterFirst ? 0.f : mu[j] * scale[j];
    if (!kCenterFirst) mu[j] = 0.f;
  }
#pragma unroll
  for (int u = 0; u < kHold; ++u) {
    if (!held(u)) continue;
    float v[V], rv[V];
    Vec<T>::unpack(xr[u], v);
    // The residual is read only here: held through the statistics too, bf16 spilled.
    if (RESIDUAL) Vec<T>::unpack(__ldcs(reinterpret_cast<const uint4*>(res + n * r_sn + first + u * step)), rv);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      float y = (v[j] - mu[j]) * scale[j] + offset[j];
      if (SILU) y = __fdividef(y, 1.f + __expf(-y));  // y -> -inf: exp overflows, the quotient is -0 as it should
      if (RESIDUAL) y += rv[j];
      v[j] = y;
    }
    *reinterpret_cast<uint4*>(ob + u * step) = Vec<T>::pack(v);
  }
  cluster_wait();
#endif
}

// SDKERNELS_GN_CLUSTER: unset, the defaults; "0", the two-kernel plan everywhere; "P,blocks,rows" sets the cluster
// size, the fewest blocks worth stopping the slice search at, and the rows a thread aims to hold (by default 8, else
// 4, else 2: the first that fits one wave). A probe knob, read on every call so that one process can time several.
struct ClusterKnobs {
  bool off;
  int P, min_blocks, rows_per_thread;  // rows_per_thread 0: the defaults in turn
};

ClusterKnobs cluster_knobs(int sms) {
  ClusterKnobs k{false, kMaxCluster, sms, 0};
  if (const char* e = std::getenv("SDKERNELS_GN_CLUSTER")) {
    if (e[0] == '0' && e[1] == '\0') k.off = true;
    else std::sscanf(e, "%d,%d,%d", &k.P, &k.min_blocks, &k.rows_per_thread);
  }
  k.P = std::clamp(k.P, 1, kMaxCluster);
  k.rows_per_thread = std::clamp(k.rows_per_thread, 0, kHold);
  return k;
}

template <typename T>
void (*widest_variant())(const T*, long long, const T*, long long, T*, long long, const void*, int, const void*, int,
                         const void*, int, long long, float, ClusterPlan) {
  return gn_cluster<T, true, true>;  // the most registers of the four
}

// Clusters of P blocks of `threads` threads the current device runs at once (cudaOccupancyMaxActiveClusters, for
// the variant with the most registers), cached per (device, dtype, threads, shared memory, P); 0 where unknown.
int active_clusters(int dtype, int threads, size_t smem, int P) {
  static std::mutex lock;
  static std::map<std::tuple<int, int, int, size_t, int>, int> cache;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) { cudaGetLastError(); return 0; }
  const auto key = std::make_tuple(dev, dtype, threads, smem, P);
  {
    std::lock_guard<std::mutex> guard(lock);
    const auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = P;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(P);
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int clusters = 0;
  cudaError_t err = dtype == SDK_FLOAT16    ? cudaOccupancyMaxActiveClusters(&clusters, widest_variant<__half>(), &cfg)
                    : dtype == SDK_BFLOAT16 ? cudaOccupancyMaxActiveClusters(&clusters, widest_variant<__nv_bfloat16>(),
                                                                             &cfg)
                                            : cudaOccupancyMaxActiveClusters(&clusters, widest_variant<float>(), &cfg);
  if (err != cudaSuccess) { cudaGetLastError(); clusters = 0; }
  std::lock_guard<std::mutex> guard(lock);
  cache[key] = clusters;
  return clusters;
}

// The widest slices first (whole DRAM sectors per row), narrower until there are enough blocks, never rows under 64
// bytes once some slice fits; each block's threads hold about `aim` rows.
const char* plan_slices(int N, int S, int C, int G, int dtype, const ClusterKnobs& k, int aim, ClusterPlan* out) {
  const int vec = dtype == SDK_FLOAT32 ? 4 : 8, elem_bytes = 16 / vec;
  ClusterPlan pl;
  pl.S = S; pl.C = C; pl.G = G; pl.cpg = C / G;
  pl.rows = (S + std::min(k.P, S) - 1) / std::min(k.P, S);
  pl.P = (S + pl.rows - 1) / pl.rows;  // no empty chunk
  const int unit = std::lcm(vec, pl.cpg), units = C / unit;
  const char* why = "a sample's channel slice is too large for one cluster's registers";
  bool found = false;
  for (int d = 1; d <= units; ++d) {
    if (units % d) continue;
    ClusterPlan c = pl;
    c.CS = d;
    c.W = C / d;
    c.Wv = c.W / vec;
    if (c.Wv > kMaxThreads) continue;
    if (found && c.W * elem_bytes < 64) break;
    c.R = std::min((c.rows + aim - 1) / aim, kMaxThreads / c.Wv);
    c.hold = (c.rows + c.R - 1) / c.R;
    if (c.hold > kHold) continue;  // the chunk does not fit the block's registers
    if ((long long)c.R * C * kHold >= INT_MAX) continue;  // the kernel's 32-bit row offsets
    c.Gs = G / d;
    c.threads = (c.R * c.Wv + 31) / 32 * 32;
    if (cluster_smem_bytes(c, vec) > kMaxSmem) continue;  // 512 threads over a slice of 512 vectors: up to 64 KiB
    const long long blocks = (long long)N * d * c.P;
    if (blocks > (long long)active_clusters(dtype, c.threads, cluster_smem_bytes(c, vec), c.P) * c.P) {
      why = "the clusters would not all run at once";
      continue;
    }
    *out = c;
    found = true;
    if (blocks >= k.min_blocks) break;
  }
  return found ? nullptr : why;
}


// nullptr and the plan where one cluster's registers hold a channel slice of a sample and the whole grid runs in one
// wave (a second wave would wait for the first's clusters, each holding its SMs through the exchange), else why not.
// Measured (H200, scripts/probe_gn_plans.py, session 27): 8 rows a thread fit 2x1280x32x32 in one wave (10.3 us
// against the two kernels' 12.2), 4 fit 2x320x64x64 (11.6 against 12.1).
const char* make_cluster_plan(int N, int S, int C, int G, int dtype, const ClusterKnobs& k, ClusterPlan* out) {
  if (k.off) return "SDKERNELS_GN_CLUSTER=0";
  const char* why = "a sample's channel slice is too large for one cluster's registers";
  for (const int rows_per_thread : {8, 4, 2}) {
    const int aim = k.rows_per_thread ? k.rows_per_thread : rows_per_thread;
    const char* reason = plan_slices(N, S, C, G, dtype, k, aim, out);
    if (!reason) return nullptr;
    if (std::strcmp(reason, why)) why = reason;  // the more telling one
    if (k.rows_per_thread) break;
  }
  return why;
}

template <typename T>
cudaError_t launch(const SdkGroupNormArgs& a, const ClusterPlan& pl, cudaStream_t stream) {
  using Fn = void (*)(const T*, long long, const T*, long long, T*, long long, const void*, int, const void*, int,
                      const void*, int, long long, float, ClusterPlan);
  const bool res = a.residual != nullptr;
  const Fn kernel = a.silu ? (res ? gn_cluster<T, true, true> : gn_cluster<T, true, false>)
                           : (res ? gn_cluster<T, false, true> : gn_cluster<T, false, false>);
  cudaLaunchAttribute attr[2];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = pl.P;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[1].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(a.N * pl.CS * pl.P);
  cfg.blockDim = dim3(pl.threads);
  cfg.dynamicSmemBytes = cluster_smem_bytes(pl, Vec<T>::n);  // <= kMaxSmem
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = programmatic_launch_enabled() ? 2 : 1;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<const T*>(a.x), a.x_batch_stride,
                            static_cast<const T*>(a.residual), a.residual_batch_stride, static_cast<T*>(a.out),
                            a.out_batch_stride, a.weight, a.weight_dtype, a.bias, a.bias_dtype, a.shift,
                            a.shift_dtype, a.shift_batch_stride, a.eps, pl);
}

}  // namespace

const char* sdk_group_norm_nhwc_cluster_why_not(int N, int S, int C, int G, int dtype) {
  if (device_major() < 9) return "thread block clusters need sm_90";
  ClusterPlan pl;
  return make_cluster_plan(N, S, C, G, dtype, cluster_knobs(sm_count()), &pl);
}

const char* sdk_group_norm_nhwc_cluster(const SdkGroupNormArgs& a, cudaStream_t stream, cudaError_t* err) {
  if (device_major() < 9) return "thread block clusters need sm_90";
  ClusterPlan pl;
  if (const char* why = make_cluster_plan(a.N, a.S, a.C, a.G, a.dtype, cluster_knobs(sm_count()), &pl)) return why;
  switch (a.dtype) {
    case SDK_FLOAT16: *err = launch<__half>(a, pl, stream); break;
    case SDK_BFLOAT16: *err = launch<__nv_bfloat16>(a, pl, stream); break;
    default: *err = launch<float>(a, pl, stream);
  }
  return nullptr;
}
