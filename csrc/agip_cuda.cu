// AGIP step on CUDA: the three passes of the fused backends (stats, refine, update) as
// plain CUDA kernels with extern "C" launchers (no torch headers: they compile with nvcc
// alone, e.g. `nvcc -c -arch=sm_75 csrc/agip_cuda.cu` for a T4, sm_90 for H100/H200).
// Bound to Python by csrc/agip_cuda.cpp. docs/algorithm.md §1-2; same semantics as
// csrc/agip_cpu.cpp and kernels/*.py. fp32 buffers.
//
// Rounding: the saliency and its EMA use __fmul_rn / __fadd_rn (never contracted into
// FMAs), so masks match the reference bit for bit; the rest is compiled with
// --fmad=false by agip/backends/cuda.py and IEEE division / square root (nvcc default).
// Determinism: G^2 partial sums per block in a fixed tree order; histogram counts are
// integer atomics (exact in any order).
#include <cstdint>
#include <cuda_runtime.h>

namespace {

constexpr int THREADS = 256;
constexpr int ITEMS = 8;  // entries per thread per block
constexpr int64_t BLOCK = static_cast<int64_t>(THREADS) * ITEMS;

// The score's constants, rounded to fp32 on the host. fisher_q < 0: Taylor |w g|;
// else Fisher |w| v_t^(q/4) (algorithm.md §2.1b).
struct ScoreArgs {
  float keep, fresh, clip, beta2, omb2;
  int fisher_q;
};

// v_t = beta2 v + (1 - beta2) ghat^2 with ghat = g M c, rounded as every backend does.
__device__ __forceinline__ float fisher_vt(float v, float g, bool act, const ScoreArgs& a) {
  const float ghat = __fmul_rn(__fmul_rn(g, act ? 1.f : 0.f), a.clip);
  return __fadd_rn(__fmul_rn(v, a.beta2), __fmul_rn(__fmul_rn(a.omb2, ghat), ghat));
}

// The score from pre-update w (and raw g, or v_t), then its EMA; __fmul_rn / __fadd_rn /
// __fsqrt_rn are never contracted into FMAs, so masks match the reference bit for bit.
__device__ __forceinline__ float saliency_of(float w, float g, float vt, const float* ema, int64_t i,
                                             const ScoreArgs& a) {
  float s;
  if (a.fisher_q < 0) s = fabsf(__fmul_rn(w, g));
  else if (a.fisher_q == 0) s = fabsf(w);
  else if (a.fisher_q == 1) s = __fmul_rn(fabsf(w), __fsqrt_rn(__fsqrt_rn(vt)));
  else if (a.fisher_q == 2) s = __fmul_rn(fabsf(w), __fsqrt_rn(vt));
  else s = __fmul_rn(fabsf(w), vt);
  if (ema != nullptr) s = __fadd_rn(__fmul_rn(ema[i], a.keep), __fmul_rn(s, a.fresh));
  return s;
}

__device__ __forceinline__ float saliency(const float* w, const float* g, const float* v, bool act, const float* ema,
                                          int64_t i, const ScoreArgs& a) {
  const float vt = a.fisher_q > 0 ? fisher_vt(v[i], g[i], act, a) : 0.f;
  return saliency_of(w[i], g[i], vt, ema, i, a);
}

__device__ __forceinline__ float block_sum(float x, float* red) {
  red[threadIdx.x] = x;
  __syncthreads();
  for (int s = THREADS / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] = __fadd_rn(red[threadIdx.x], red[threadIdx.x + s]);
    __syncthreads();
  }
  return red[0];
}

__global__ void stats_kernel(const float* __restrict__ g, const float* __restrict__ w, const float* __restrict__ v,
                             const uint8_t* __restrict__ mask, const float* __restrict__ ema,
                             float* __restrict__ partial, int* __restrict__ sal_hist, int* __restrict__ grow_hist,
                             int64_t n, int64_t n_prunable, ScoreArgs sa, int sal_lo, int sal_hi, bool with_saliency,
                             bool regrow) {
  __shared__ float red[THREADS];
  __shared__ unsigned long long lumps[2];
  if (threadIdx.x < 2) lumps[threadIdx.x] = 0;
  __syncthreads();
  const int64_t base = static_cast<int64_t>(blockIdx.x) * BLOCK;
  float acc = 0.f;
  unsigned below = 0, above = 0;
  for (int it = 0; it < ITEMS; ++it) {
    const int64_t i = base + static_cast<int64_t>(it) * THREADS + threadIdx.x;
    if (i >= n) break;
    const float gi = g[i];
    const bool inp = i < n_prunable;
    const bool act = inp ? mask[i] != 0 : true;
    const float gm = __fmul_rn(gi, act ? 1.f : 0.f);  // Inf * 0 = NaN: a pruned Inf still poisons G^2
    acc = __fadd_rn(acc, __fmul_rn(gm, gm));
    if (inp && act && with_saliency) {
      const int bin = static_cast<int>(__float_as_uint(saliency(w, g, v, act, ema, i, sa)) >> 16);
      if (bin < sal_lo) ++below;
      else if (bin > sal_hi) ++above;
      else atomicAdd(&sal_hist[bin], 1);
    }
    if (inp && !act && regrow) atomicAdd(&grow_hist[__float_as_uint(fabsf(gi)) >> 16], 1);
  }
  const float total = block_sum(acc, red);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
  if (below) atomicAdd(&lumps[0], static_cast<unsigned long long>(below));
  if (above) atomicAdd(&lumps[1], static_cast<unsigned long long>(above));
  __syncthreads();
  if (threadIdx.x == 0 && lumps[0]) atomicAdd(&sal_hist[sal_lo - 1], static_cast<int>(lumps[0]));
  if (threadIdx.x == 0 && lumps[1]) atomicAdd(&sal_hist[sal_hi + 1], static_cast<int>(lumps[1]));
}

__global__ void refine_kernel(const float* __restrict__ g, const float* __restrict__ w, const float* __restrict__ v,
                              const uint8_t* __restrict__ mask, const float* __restrict__ ema, int* __restrict__ hist,
                              int64_t n_prunable, unsigned prefix, ScoreArgs sa, bool with_saliency) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_prunable; i += stride) {
    const bool act = mask[i] != 0;
    if (act != with_saliency) continue;
    const float s = with_saliency ? saliency(w, g, v, act, ema, i, sa) : fabsf(g[i]);
    const unsigned b = __float_as_uint(s);
    if ((b >> 16) == prefix) atomicAdd(&hist[b & 0xFFFF], 1);
  }
}

struct UpdateArgs {
  float decay, lerp_weight, beta2, one_minus_beta2, step_size, bc2_sqrt, eps, clip, neg_lr_s, theta, regrow_theta,
      keep, fresh;
  int fisher_q;
};

template <bool PRUNABLE, bool PRUNE_STEP>
__global__ void update_kernel(float* __restrict__ w, const float* __restrict__ g, float* __restrict__ m,
                              float* __restrict__ v, uint8_t* __restrict__ mask, float* __restrict__ ema, int64_t start,
                              int64_t end, UpdateArgs a) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = start + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < end; i += stride) {
    const float w0 = w[i], gi = g[i];
    float wi = w0, mi = m[i], vi = v[i];
    float ghat;
    bool act = true;
    if (PRUNABLE) {
      act = mask[i] != 0;
      ghat = gi * (act ? 1.f : 0.f) * a.clip;  // the gradient of the active network, clipped
    } else {
      ghat = gi * a.clip;
    }
    // AdamW as torch computes it: decay, lerp, addcmul, bias-corrected addcdiv
    wi = wi * a.decay;
    mi = a.lerp_weight < 0.5f ? mi + a.lerp_weight * (ghat - mi) : ghat - (ghat - mi) * (1.0f - a.lerp_weight);
    vi = vi * a.beta2 + a.one_minus_beta2 * ghat * ghat;  // (--fmad=false) the v_t the Fisher score reads
    const float denom = sqrtf(vi) / a.bc2_sqrt + a.eps;
    wi = wi + a.step_size * (mi / denom);
    wi = wi + a.neg_lr_s * ghat;  // terminal attractor: w -= lr * s * ghat
    if (PRUNABLE) {
      const ScoreArgs sa{a.keep, a.fresh, a.clip, a.beta2, a.one_minus_beta2, a.fisher_q};
      const float s = saliency_of(w0, gi, vi, ema, i, sa);  // pre-update w; raw g or v_t
      bool kept = act;
      if (PRUNE_STEP) {
        const bool grown = !act && fabsf(gi) > a.regrow_theta;
        kept = (grown ? __int_as_float(0x7f800000) : s) > a.theta;
        mask[i] = kept ? 1 : 0;
      }
      if (!kept) wi = mi = vi = 0.f;
      if (ema != nullptr) ema[i] = kept ? s : 0.f;
    }
    w[i] = wi;
    m[i] = mi;
    v[i] = vi;
  }
}

int grid_for(int64_t n) {
  const int64_t blocks = (n + THREADS - 1) / THREADS;
  return static_cast<int>(blocks < 65535 * 8 ? blocks : 65535 * 8);  // grid-stride loops cover the rest
}

}  // namespace

extern "C" {

// Number of fp32 partial sums agip_cuda_stats writes for n entries.
int64_t agip_cuda_stats_blocks(int64_t n) { return (n + BLOCK - 1) / BLOCK; }

// score5 = {ema_keep, ema_new, clip, beta2, 1 - beta2}, fisher_q = -1 (Taylor) or 0, 1, 2, 4.
int agip_cuda_stats(const float* g, const float* w, const float* v, const uint8_t* mask, const float* ema,
                    float* partial, int* sal_hist, int* grow_hist, int64_t n, int64_t n_prunable, const float* score5,
                    int fisher_q, int sal_lo, int sal_hi, int with_saliency, int regrow, cudaStream_t stream) {
  const int64_t blocks = agip_cuda_stats_blocks(n);
  if (blocks == 0) return 0;
  const ScoreArgs sa{score5[0], score5[1], score5[2], score5[3], score5[4], fisher_q};
  stats_kernel<<<static_cast<unsigned>(blocks), THREADS, 0, stream>>>(g, w, v, mask, ema, partial, sal_hist, grow_hist,
                                                                       n, n_prunable, sa, sal_lo, sal_hi,
                                                                       with_saliency != 0, regrow != 0);
  return static_cast<int>(cudaGetLastError());
}

int agip_cuda_refine(const float* g, const float* w, const float* v, const uint8_t* mask, const float* ema, int* hist,
                     int64_t n_prunable, unsigned prefix, const float* score5, int fisher_q, int with_saliency,
                     cudaStream_t stream) {
  if (n_prunable == 0) return 0;
  const ScoreArgs sa{score5[0], score5[1], score5[2], score5[3], score5[4], fisher_q};
  refine_kernel<<<grid_for(n_prunable), THREADS, 0, stream>>>(g, w, v, mask, ema, hist, n_prunable, prefix, sa,
                                                              with_saliency != 0);
  return static_cast<int>(cudaGetLastError());
}

int agip_cuda_update(float* w, const float* g, float* m, float* v, uint8_t* mask, float* ema, int64_t start,
                     int64_t end, const float* args13, int prunable, int prune_step, int fisher_q,
                     cudaStream_t stream) {
  if (end <= start) return 0;
  const UpdateArgs a{args13[0], args13[1], args13[2], args13[3], args13[4], args13[5], args13[6],
                     args13[7], args13[8], args13[9], args13[10], args13[11], args13[12], fisher_q};
  const int grid = grid_for(end - start);
  if (!prunable)
    update_kernel<false, false><<<grid, THREADS, 0, stream>>>(w, g, m, v, mask, nullptr, start, end, a);
  else if (prune_step)
    update_kernel<true, true><<<grid, THREADS, 0, stream>>>(w, g, m, v, mask, ema, start, end, a);
  else
    update_kernel<true, false><<<grid, THREADS, 0, stream>>>(w, g, m, v, mask, ema, start, end, a);
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
