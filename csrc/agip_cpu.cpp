// The C++ CPU backend of AGIP, bound to Python (agip/backends/cpp.py builds it on first use):
// one file per pass around the shared agip_cpu.h and agip_math.h.
#include <torch/extension.h>

#include "agip_cpu.h"

using namespace agip_cpu;


PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("stats", &stats, "AGIP pass A: G^2 chunk sums and first-digit histograms");
  mod.def("refine", &refine, "AGIP pass B: second-digit histogram inside one bin");
  mod.def("refine_keys", &refine_keys, "AGIP pass B over the candidate keys pass A collected");
  mod.def("update", &update, "AGIP pass C: clip, AdamW, TA, new mask, w/m/v * M'");
  mod.attr("HIST_BINS") = HIST_BINS;
}
