// Pass A of the AGIP step on the CPU (docs/algorithm.md §1.2, 2): G^2 chunk sums and the
// first-digit histograms of the score, with the band's candidate keys.
#include "agip_cpu.h"

namespace agip_cpu {

// Pass A. Returns per-chunk partial sums of (g*M)^2 (fp64; zeros without with_sumsq). With
// with_saliency, adds the top-16-bit histogram of the score of active prunable entries to
// sal_hist and, with regrowth, that of |g| of pruned entries to grow_hist. Score bins
// outside the window [sal_lo, sal_hi] are lumped into bins sal_lo - 1 and sal_hi + 1. The
// Fisher score needs the clip factor, so the driver calls this a second time for it, once
// G^2 is known (without with_sumsq). With cand (int32, any size) and cand_n (int64[1]),
// the keys (fp32 bits) of the scores whose first digit lies in [cand_lo, cand_hi] (inside
// the window) are also written to cand, and cand_n[0] gets their number, or -1 if they did
// not fit: a second digit inside that band then needs no pass over the buckets
// (refine_keys; algorithm.md §2.2).
Tensor stats(Tensor g, Tensor w, Tensor v, Tensor mask,
                    c10::optional<Tensor> ema, int64_t n_prunable, bool with_saliency, bool regrow,
                    int64_t fisher_q, double clip, double beta2, double omb2, double ema_keep, double ema_new,
                    int64_t sal_lo, int64_t sal_hi, Tensor sal_hist, Tensor grow_hist, bool with_sumsq,
                    c10::optional<Tensor> cand, c10::optional<Tensor> cand_n, int64_t cand_lo,
                    int64_t cand_hi) {
  TORCH_CHECK(0 <= sal_lo && sal_lo <= sal_hi && sal_hi < HIST_BINS, "bad saliency window");
  check_bucket(g, "g");
  check_bucket(w, "w");
  check_bucket(v, "v");
  TORCH_CHECK(mask.numel() == n_prunable, "mask must have n_prunable entries");
  check_hist(sal_hist);
  check_hist(grow_hist);
  const int64_t n = g.numel();
  const int64_t nchunks = (n + CHUNK - 1) / CHUNK;
  auto partial = at::zeros({nchunks}, at::dtype(at::kDouble));
  double* part = partial.data_ptr<double>();
  const uint8_t* mk = mask_ptr(mask);
  const float* em = ema.has_value() ? ema->data_ptr<float>() : nullptr;
  int32_t* sh = sal_hist.data_ptr<int32_t>();
  int32_t* gh = grow_hist.data_ptr<int32_t>();
  const ScoreArgs sa = score_args(clip, beta2, omb2, ema_keep, ema_new);
  with_saliency = with_saliency && n_prunable > 0;
  regrow = regrow && n_prunable > 0;
  TORCH_CHECK(!cand.has_value() || with_saliency, "candidates are the saliency's: with_saliency must be set");
  Candidates cands;
  open_candidates(cands, cand, cand_n, std::max(cand_lo, sal_lo), std::min(cand_hi, sal_hi), false);
  Window win{sh, static_cast<uint32_t>(sal_lo), static_cast<uint32_t>(sal_hi), &cands};
  std::mutex mu;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "agip_stats", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    with_score(fisher_q, em != nullptr, [&](auto score, auto has_ema) {
      constexpr int SCORE = decltype(score)::value;
      constexpr bool HAS_EMA = decltype(has_ema)::value;
      at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
        std::optional<WindowLocal> ls;
        LocalHist lg;
        if (with_saliency) ls.emplace();
        if (regrow) lg.init();
        uint32_t keys[TILE], kept[TILE];
        int64_t unused = 0;
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t lo = c * CHUNK, hi = std::min(n, lo + CHUNK), mid = std::clamp(n_prunable, lo, hi);
          if (with_sumsq) part[c] = sumsq<true>(gp, mk, lo, mid) + sumsq<false>(gp, mk, mid, hi);
          if (!with_saliency && !regrow) continue;
          for (int64_t t0 = lo; t0 < mid; t0 += TILE) {
            const int64_t len = std::min(TILE, mid - t0);
            if (with_saliency)
              ls->add(win, keys, len, tile_keys<true, SCORE, HAS_EMA>(wp, gp, vp, mk, em, t0, len, sa, win.lo, win.hi,
                                                                      keys, ls->below, ls->above));
            if (regrow &&
                tile_keys<false, -1, false>(wp, gp, vp, mk, em, t0, len, sa, 0, HIST_BINS - 1, keys, unused, unused))
              lg.count<16>(kept, compact_keys(keys, len, kept));
          }
        }
        if (ls) ls->merge_into(win);
        merge(mu, lg, gh);
      });
    });
  });
  close_candidates(cands, cand_n);
  return partial;
}
}  // namespace agip_cpu
