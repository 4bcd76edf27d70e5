// The AGIP kernels' argument structs and the per-entry math they share (docs/algorithm.md
// §1.3-1.6, §2.1, §2.1b), in plain C++ with no torch headers, so that any kernel source
// (C++ or CUDA) can include it. The structs' fields are in the order of the Python
// bundles agip.backends.ScoreArgs / UpdateArgs (a test compares them); the numbers arrive
// as doubles and are rounded to fp32 once, as every backend rounds them.
//
// Rounding: each product and sum is rounded separately (compile with FMA contraction off,
// -ffp-contract=off), in the reference backend's order, so that scores, and hence masks,
// are bit-identical to it.
#pragma once

#include <cmath>
#include <cstdint>

namespace agip {

// The score's constants (fisher_q apart): v_t = beta2 v + omb2 ghat^2, ghat = g M clip;
// with a saliency EMA, S = ema_keep EMA + ema_new S.
struct ScoreArgs {
  float clip, beta2, omb2, ema_keep, ema_new;
};

// Pass C's scalars for one param group's range.
struct UpdateArgs {
  float decay, lerp_weight, beta2, one_minus_beta2, step_size, bc2_sqrt, eps, clip, neg_lr_s, theta, regrow_theta,
      ema_keep, ema_new, score_beta2, score_omb2;
};
constexpr int UPDATE_ARGS = 15;  // the number of floats in UpdateArgs

// v_t^(Q/4) with correctly rounded square roots only, so every backend rounds alike.
template <int Q>
inline float fisher_factor(float vt) {
  if constexpr (Q <= 0) return 1.f;
  else if constexpr (Q == 1) return std::sqrt(std::sqrt(vt));
  else if constexpr (Q == 2) return std::sqrt(vt);
  else return vt;
}

// v_t = beta2 v + (1 - beta2) ghat^2: the second moment the update stores and the Fisher
// score reads.
inline float second_moment(float v, float ghat, float beta2, float omb2) { return v * beta2 + omb2 * ghat * ghat; }

// The score of one entry from pre-update w: Taylor |w g| (SCORE < 0) with the raw g, or
// Fisher |w| v_t^(SCORE/4).
template <int SCORE>
inline float score(float w, float g, float vt) {
  if constexpr (SCORE < 0) return std::fabs(w * g);
  else return std::fabs(w) * fisher_factor<SCORE>(vt);
}

// One AdamW step of one entry as torch computes it (decay, lerp, addcmul, bias-corrected
// addcdiv), then the terminal attractor w -= lr s ghat. lerp's two branches (weight < 0.5
// or not) are torch's; v becomes v_t.
inline void adamw(float& w, float& m, float& v, float ghat, float decay, float lw, float one_minus_lw, bool small,
                  float beta2, float omb2, float step_size, float bc2_sqrt, float eps, float neg_lr_s) {
  w = w * decay;
  const float m_small = m + lw * (ghat - m), m_large = ghat - (ghat - m) * one_minus_lw;
  m = small ? m_small : m_large;
  v = second_moment(v, ghat, beta2, omb2);
  const float denom = std::sqrt(v) / bc2_sqrt + eps;
  w = w + step_size * (m / denom);
  w = w + neg_lr_s * ghat;
}

}  // namespace agip
