// CUDA kernels of the grouped advantage op (semantics: group_advantages.cpp).
//
// 1. group_kernel: a team of T = min(next_pow2(G), 32) lanes of one warp per
//    group; lanes stride over the group and reduce with warp shuffles (sum,
//    min, max, finiteness, then the sum of squared deviations about the mean:
//    two passes over data that sit in L1). Writes valid, zero_std and, for
//    scales "group" and "none", the advantages. Each block merges its groups'
//    (count, mean, M2) with Chan's formula into one partial.
// 2. finalize_kernel: one block merges the partials into stats = (mean, std).
// 3. batch_scale_kernel (scale "batch" only): elementwise, divides by the batch
//    std read from device memory, so no value ever returns to the host.
// fp16/bf16 rewards are read as such and upcast; arithmetic is in float
// (double for double rewards). No fast-math: the finiteness test needs IEEE.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#include <climits>

#include "group_advantages_kernel.h"

namespace shala {
namespace {

constexpr int kBlock = 256;

template <typename acc_t>
struct Moments {
  long long n;
  acc_t mean;
  acc_t m2;
};

// Chan et al.'s pairwise merge of (count, mean, sum of squared deviations).
template <typename acc_t>
__device__ __forceinline__ Moments<acc_t> merge(const Moments<acc_t>& a, const Moments<acc_t>& b) {
  if (a.n == 0) return b;
  if (b.n == 0) return a;
  const long long n = a.n + b.n;
  const acc_t delta = b.mean - a.mean;
  const acc_t fb = static_cast<acc_t>(b.n) / static_cast<acc_t>(n);
  return {n, a.mean + delta * fb, a.m2 + b.m2 + delta * delta * static_cast<acc_t>(a.n) * fb};
}

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ double load(const double* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }

struct Sum {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct Min {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return b < a ? b : a; }
};
struct Max {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return b > a ? b : a; }
};

// Reduction over the TEAM consecutive lanes of a warp; every lane gets the result.
template <int TEAM, typename T, typename Op>
__device__ __forceinline__ T team_reduce(T v, Op op) {
#pragma unroll
  for (int offset = TEAM / 2; offset > 0; offset >>= 1) {
    v = op(v, __shfl_xor_sync(0xffffffffu, v, offset, TEAM));
  }
  return v;
}

template <typename in_t, typename acc_t, int TEAM>
__global__ void __launch_bounds__(kBlock) group_kernel(
    const in_t* __restrict__ rewards,
    const acc_t* __restrict__ weights,
    int64_t num_groups,
    int64_t group_size,
    Scale scale,
    acc_t eps,
    acc_t* __restrict__ advantages,
    bool* __restrict__ valid_out,
    bool* __restrict__ zero_std_out,
    acc_t* __restrict__ group_mean,
    Moments<acc_t>* __restrict__ partials) {
  constexpr int kTeams = kBlock / TEAM;
  __shared__ Moments<acc_t> shared[kTeams];
  const int team = threadIdx.x / TEAM;
  const int lane = threadIdx.x % TEAM;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kTeams + team;
  const bool active = g < num_groups;
  const int64_t G = group_size;
  const in_t* rg = rewards + (active ? g * G : 0);

  // Summing r - r_0 keeps the mean accurate when the rewards share a large offset.
  const acc_t shift = active ? load(rg) : acc_t(0);
  acc_t sum = 0;
  acc_t lo = INFINITY;
  acc_t hi = -INFINITY;
  int finite = 1;
  if (active) {
    for (int64_t i = lane; i < G; i += TEAM) {
      const acc_t v = load(rg + i);
      finite &= isfinite(v) ? 1 : 0;
      sum += v - shift;
      lo = Min()(lo, v);
      hi = Max()(hi, v);
    }
  }
  // Shuffles run on every lane, active or not: the mask names the whole warp.
  sum = team_reduce<TEAM>(sum, Sum());
  finite = team_reduce<TEAM>(finite, Min());
  lo = team_reduce<TEAM>(lo, Min());
  hi = team_reduce<TEAM>(hi, Max());

  const acc_t w = (active && weights != nullptr) ? weights[g] : acc_t(1);
  const bool valid = active && finite && isfinite(w);
  const bool zero_std = valid && hi == lo;
  const acc_t mean = shift + sum / static_cast<acc_t>(G);
  acc_t m2 = 0;
  if (valid) {
    for (int64_t i = lane; i < G; i += TEAM) {
      const acc_t d = load(rg + i) - mean;
      m2 += d * d;
    }
  }
  m2 = team_reduce<TEAM>(m2, Sum());

  if (active && scale != Scale::kBatch) {
    const acc_t denom = scale == Scale::kGroup ? sqrt(m2 / static_cast<acc_t>(G)) + eps : acc_t(1);
    acc_t* ag = advantages + g * G;
    for (int64_t i = lane; i < G; i += TEAM) {
      ag[i] = (valid && !zero_std) ? (load(rg + i) - mean) / denom * w : acc_t(0);
    }
  }
  if (active && lane == 0) {
    valid_out[g] = valid;
    zero_std_out[g] = zero_std;
    if (scale == Scale::kBatch) group_mean[g] = mean;
  }
  if (lane == 0) {
    shared[team] = valid ? Moments<acc_t>{G, mean, m2} : Moments<acc_t>{0, 0, 0};
  }
  __syncthreads();
#pragma unroll
  for (int s = kTeams / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shared[threadIdx.x] = merge(shared[threadIdx.x], shared[threadIdx.x + s]);
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[blockIdx.x] = shared[0];
}

template <typename acc_t>
__global__ void __launch_bounds__(kBlock) finalize_kernel(
    const Moments<acc_t>* __restrict__ partials, int64_t num_partials, acc_t* __restrict__ stats) {
  __shared__ Moments<acc_t> shared[kBlock];
  Moments<acc_t> acc{0, 0, 0};
  for (int64_t i = threadIdx.x; i < num_partials; i += kBlock) acc = merge(acc, partials[i]);
  shared[threadIdx.x] = acc;
  __syncthreads();
  for (int s = kBlock / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shared[threadIdx.x] = merge(shared[threadIdx.x], shared[threadIdx.x + s]);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const Moments<acc_t> m = shared[0];
    stats[0] = m.n > 0 ? m.mean : acc_t(0);
    stats[1] = m.n > 0 ? sqrt(m.m2 / static_cast<acc_t>(m.n)) : acc_t(0);
  }
}

template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kBlock) batch_scale_kernel(
    const in_t* __restrict__ rewards,
    const acc_t* __restrict__ weights,
    int64_t num_groups,
    int64_t group_size,
    acc_t eps,
    const bool* __restrict__ valid,
    const bool* __restrict__ zero_std,
    const acc_t* __restrict__ group_mean,
    const acc_t* __restrict__ stats,
    acc_t* __restrict__ advantages) {
  const acc_t denom = stats[1] + eps;
  const int64_t n = num_groups * group_size;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kBlock;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x; i < n; i += stride) {
    const int64_t g = i / group_size;
    acc_t a = 0;
    if (valid[g] && !zero_std[g]) {
      a = (load(rewards + i) - group_mean[g]) / denom * (weights != nullptr ? weights[g] : acc_t(1));
    }
    advantages[i] = a;
  }
}

constexpr size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }

int team_size(int64_t group_size) {
  int t = 1;
  while (t < 32 && t < group_size) t *= 2;
  return t;
}

int64_t group_blocks(int64_t num_groups, int64_t group_size) {
  const int64_t teams = kBlock / team_size(group_size);
  return (num_groups + teams - 1) / teams;
}

template <typename in_t, typename acc_t, int TEAM>
void launch_group_kernel(
    int64_t blocks, cudaStream_t stream, const in_t* r, const acc_t* w, int64_t B, int64_t G, Scale scale,
    acc_t eps, acc_t* adv, bool* valid, bool* zero_std, acc_t* group_mean, Moments<acc_t>* partials) {
  group_kernel<in_t, acc_t, TEAM><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(
      r, w, B, G, scale, eps, adv, valid, zero_std, group_mean, partials);
}

template <typename in_t, typename acc_t>
cudaError_t launch_typed(
    const in_t* r, const acc_t* w, int64_t B, int64_t G, Scale scale, acc_t eps, acc_t* adv, bool* valid,
    bool* zero_std, acc_t* stats, void* workspace, cudaStream_t stream) {
  const int64_t blocks = group_blocks(B, G);
  if (blocks > INT_MAX) return cudaErrorInvalidValue;
  auto* partials = static_cast<Moments<acc_t>*>(workspace);
  auto* group_mean = reinterpret_cast<acc_t*>(
      static_cast<char*>(workspace) + align16(static_cast<size_t>(blocks) * sizeof(Moments<acc_t>)));
  if (blocks > 0) {
    switch (team_size(G)) {
      case 1: launch_group_kernel<in_t, acc_t, 1>(blocks, stream, r, w, B, G, scale, eps, adv, valid, zero_std, group_mean, partials); break;
      case 2: launch_group_kernel<in_t, acc_t, 2>(blocks, stream, r, w, B, G, scale, eps, adv, valid, zero_std, group_mean, partials); break;
      case 4: launch_group_kernel<in_t, acc_t, 4>(blocks, stream, r, w, B, G, scale, eps, adv, valid, zero_std, group_mean, partials); break;
      case 8: launch_group_kernel<in_t, acc_t, 8>(blocks, stream, r, w, B, G, scale, eps, adv, valid, zero_std, group_mean, partials); break;
      case 16: launch_group_kernel<in_t, acc_t, 16>(blocks, stream, r, w, B, G, scale, eps, adv, valid, zero_std, group_mean, partials); break;
      default: launch_group_kernel<in_t, acc_t, 32>(blocks, stream, r, w, B, G, scale, eps, adv, valid, zero_std, group_mean, partials); break;
    }
  }
  finalize_kernel<acc_t><<<1, kBlock, 0, stream>>>(partials, blocks, stats);
  const int64_t n = B * G;
  if (scale == Scale::kBatch && n > 0) {
    const int64_t grid = (n + kBlock - 1) / kBlock < 65536 ? (n + kBlock - 1) / kBlock : 65536;
    batch_scale_kernel<in_t, acc_t><<<static_cast<unsigned>(grid), kBlock, 0, stream>>>(
        r, w, B, G, eps, valid, zero_std, group_mean, stats, adv);
  }
  return cudaGetLastError();
}

}  // namespace

size_t group_advantages_workspace_bytes(int64_t num_groups, int64_t group_size, RewardType type) {
  const size_t acc = type == RewardType::kFloat64 ? sizeof(double) : sizeof(float);
  const size_t moments = type == RewardType::kFloat64 ? sizeof(Moments<double>) : sizeof(Moments<float>);
  const size_t blocks = static_cast<size_t>(group_blocks(num_groups, group_size));
  return align16(blocks * moments) + align16(static_cast<size_t>(num_groups) * acc);
}

cudaError_t launch_group_advantages(
    const void* rewards,
    RewardType type,
    const void* weights,
    int64_t num_groups,
    int64_t group_size,
    Scale scale,
    double eps,
    void* advantages,
    bool* valid,
    bool* zero_std,
    void* stats,
    void* workspace,
    cudaStream_t stream) {
  if (group_size < 1 || num_groups < 0) return cudaErrorInvalidValue;
  if (type == RewardType::kFloat64) {
    return launch_typed(
        static_cast<const double*>(rewards), static_cast<const double*>(weights), num_groups, group_size, scale, eps,
        static_cast<double*>(advantages), valid, zero_std, static_cast<double*>(stats), workspace, stream);
  }
  const auto* w = static_cast<const float*>(weights);
  auto* adv = static_cast<float*>(advantages);
  auto* st = static_cast<float*>(stats);
  const auto e = static_cast<float>(eps);
  switch (type) {
    case RewardType::kFloat32:
      return launch_typed(static_cast<const float*>(rewards), w, num_groups, group_size, scale, e, adv, valid, zero_std, st, workspace, stream);
    case RewardType::kFloat16:
      return launch_typed(static_cast<const __half*>(rewards), w, num_groups, group_size, scale, e, adv, valid, zero_std, st, workspace, stream);
    case RewardType::kBFloat16:
      return launch_typed(static_cast<const __nv_bfloat16*>(rewards), w, num_groups, group_size, scale, e, adv, valid, zero_std, st, workspace, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace shala
