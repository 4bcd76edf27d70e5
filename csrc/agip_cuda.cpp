// Python binding of csrc/agip_cuda.cu for the `cuda` backend. Compiled only against a
// CUDA build of torch (agip/backends/cuda.py refuses otherwise): it needs c10's CUDA
// stream header, which CPU-only wheels lack. Same Python signatures as agip_cpu.cpp.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

extern "C" {
int64_t agip_cuda_stats_blocks(int64_t n);
int agip_cuda_stats(const float* g, const float* w, const float* v, const uint8_t* mask, const float* ema,
                    float* partial, int* sal_hist, int* grow_hist, int64_t n, int64_t n_prunable, const float* score5,
                    int fisher_q, int sal_lo, int sal_hi, int with_saliency, int regrow, cudaStream_t stream);
int agip_cuda_refine(const float* g, const float* w, const float* v, const uint8_t* mask, const float* ema, int* hist,
                     int64_t n_prunable, unsigned prefix, const float* score5, int fisher_q, int with_saliency,
                     cudaStream_t stream);
int agip_cuda_update(float* w, const float* g, float* m, float* v, uint8_t* mask, float* ema, int64_t start,
                     int64_t end, const float* args13, int prunable, int prune_step, int fisher_q,
                     cudaStream_t stream);
}

namespace {

void check(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous(), what, " must be a contiguous CUDA tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, what, " must be float32: the cuda backend runs fp32 buffers "
              "(use backend='triton' for other dtypes)");
}

const uint8_t* mask_ptr(const torch::Tensor& mask) {
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous(), "mask must be a contiguous bool tensor");
  return reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
}

void ok(int err, const char* what) { TORCH_CHECK(err == 0, what, " failed: CUDA error ", err); }

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// {ema_keep, ema_new, clip, beta2, 1 - beta2} as fp32, the order agip_cuda_stats/refine read
struct Score5 {
  float v[5];
  Score5(double clip, double beta2, double omb2, double keep, double fresh)
      : v{static_cast<float>(keep), static_cast<float>(fresh), static_cast<float>(clip), static_cast<float>(beta2),
          static_cast<float>(omb2)} {}
};

torch::Tensor stats(torch::Tensor g, torch::Tensor w, torch::Tensor v, torch::Tensor mask,
                    c10::optional<torch::Tensor> ema, int64_t n_prunable, bool with_saliency, bool regrow,
                    int64_t fisher_q, double clip, double beta2, double omb2, double keep, double fresh,
                    int64_t sal_lo, int64_t sal_hi, torch::Tensor sal_hist, torch::Tensor grow_hist) {
  check(g, "g");
  check(w, "w");
  check(v, "v");
  auto partial = torch::empty({agip_cuda_stats_blocks(g.numel())}, g.options());
  const Score5 sc(clip, beta2, omb2, keep, fresh);
  ok(agip_cuda_stats(g.data_ptr<float>(), w.data_ptr<float>(), v.data_ptr<float>(), mask_ptr(mask),
                     ema.has_value() ? ema->data_ptr<float>() : nullptr, partial.data_ptr<float>(),
                     sal_hist.data_ptr<int>(), grow_hist.data_ptr<int>(), g.numel(), n_prunable, sc.v,
                     static_cast<int>(fisher_q), static_cast<int>(sal_lo), static_cast<int>(sal_hi), with_saliency,
                     regrow, stream()),
     "agip stats");
  return partial;
}

void refine(torch::Tensor g, torch::Tensor w, torch::Tensor v, torch::Tensor mask, c10::optional<torch::Tensor> ema,
            int64_t n_prunable, int64_t prefix, bool with_saliency, int64_t fisher_q, double clip, double beta2,
            double omb2, double keep, double fresh, torch::Tensor hist) {
  check(g, "g");
  check(v, "v");
  const Score5 sc(clip, beta2, omb2, keep, fresh);
  ok(agip_cuda_refine(g.data_ptr<float>(), w.data_ptr<float>(), v.data_ptr<float>(), mask_ptr(mask),
                      ema.has_value() ? ema->data_ptr<float>() : nullptr, hist.data_ptr<int>(), n_prunable,
                      static_cast<unsigned>(prefix), sc.v, static_cast<int>(fisher_q), with_saliency, stream()),
     "agip refine");
}

void update(torch::Tensor w, torch::Tensor g, torch::Tensor m, torch::Tensor v, torch::Tensor mask,
            c10::optional<torch::Tensor> ema, int64_t start, int64_t end, double decay, double lerp_weight,
            double beta2, double step_size, double bc2_sqrt, double eps, double clip, double neg_lr_s, double theta,
            double regrow_theta, double ema_keep, double ema_new, bool prunable, bool prune_step, int64_t fisher_q) {
  check(w, "w");
  TORCH_CHECK(0 <= start && start <= end && end <= w.numel(), "bad range");
  const float args[13] = {static_cast<float>(decay), static_cast<float>(lerp_weight), static_cast<float>(beta2),
                          static_cast<float>(1.0 - beta2), static_cast<float>(step_size), static_cast<float>(bc2_sqrt),
                          static_cast<float>(eps), static_cast<float>(clip), static_cast<float>(neg_lr_s),
                          static_cast<float>(theta), static_cast<float>(regrow_theta), static_cast<float>(ema_keep),
                          static_cast<float>(ema_new)};
  ok(agip_cuda_update(w.data_ptr<float>(), g.data_ptr<float>(), m.data_ptr<float>(), v.data_ptr<float>(),
                      const_cast<uint8_t*>(mask_ptr(mask)),
                      (prunable && ema.has_value()) ? ema->data_ptr<float>() : nullptr, start, end, args, prunable,
                      prune_step, static_cast<int>(fisher_q), stream()),
     "agip update");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("stats", &stats, "AGIP pass A on CUDA");
  mod.def("refine", &refine, "AGIP pass B on CUDA");
  mod.def("update", &update, "AGIP pass C on CUDA");
}
