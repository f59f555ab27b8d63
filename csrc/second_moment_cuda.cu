// Grouped second-moment accumulation, CUDA: moments[i] += X_iᵀ X_i over the kept rows of X_i.
//
// cuBLAS on the upper-triangle panels C[r0:r1, r0:d] += X[:, r0:r1]ᵀ X[:, r0:d], as on the CPU but
// with wider panels (a GPU GEMM wants large tiles). Masked rows are zeroed with `where` (no host
// sync, unlike a gather) and rows are converted to the statistic's dtype in chunks of bounded size.
// All work is queued on the current stream; nothing here synchronises with the host.
#include <torch/extension.h>

#include <c10/core/DeviceGuard.h>

#include <algorithm>

#include "second_moment.h"

namespace nsru {

namespace {

constexpr int64_t kPanel = 1024;                   // rows of C per GEMM
constexpr int64_t kChunkBytes = int64_t{256} << 20;  // converted rows held at once

void accumulate_panels(at::Tensor& moment, const at::Tensor& x) {
  const int64_t d = moment.size(0);
  const int64_t panel = d < 2 * kPanel ? d : kPanel;
  for (int64_t r0 = 0; r0 < d; r0 += panel) {
    const int64_t h = std::min(panel, d - r0);
    at::Tensor c = moment.narrow(0, r0, h).narrow(1, r0, d - r0);
    c.addmm_(x.narrow(1, r0, h).t(), x.narrow(1, r0, d - r0));
  }
}

}  // namespace

void second_moment_cuda(at::TensorList moments, at::TensorList inputs,
                        const c10::List<std::optional<at::Tensor>>& masks) {
  check_lists(moments, inputs, masks);
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < moments.size(); ++i) {
    const auto idx = static_cast<int64_t>(i);
    at::Tensor moment = moments[i];
    check_pair(moment, inputs[i], idx);
    TORCH_CHECK(moment.is_cuda(), "second_moment_: moments[", i, "] must be a CUDA tensor here");
    std::optional<at::Tensor> mask = masks.size() > 0 ? masks.get(i) : std::nullopt;
    const int64_t d = moment.size(0);
    const int64_t n = check_mask(inputs[i], d, mask, idx);
    if (d == 0 || n == 0) continue;
    c10::DeviceGuard guard(moment.device());

    at::Tensor x = inputs[i].reshape({n, d});
    at::Tensor keep;
    if (mask.has_value() && mask->defined()) keep = mask->reshape({n, 1}).ne(0);
    const bool as_is = !keep.defined() && x.scalar_type() == moment.scalar_type() && x.stride(1) == 1 &&
                       (n == 1 || x.stride(0) >= d);
    if (as_is) {
      accumulate_panels(moment, x);
      continue;
    }
    const int64_t row_bytes = d * static_cast<int64_t>(moment.element_size());
    const int64_t chunk = std::max<int64_t>(1, kChunkBytes / row_bytes);
    for (int64_t lo = 0; lo < n; lo += chunk) {
      const int64_t rows = std::min(chunk, n - lo);
      at::Tensor part = x.narrow(0, lo, rows);
      if (keep.defined()) part = at::where(keep.narrow(0, lo, rows), part, at::Scalar(0.0));
      part = part.to(moment.scalar_type()).contiguous();
      accumulate_panels(moment, part);
    }
  }
}

}  // namespace nsru

TORCH_LIBRARY_IMPL(nsru, CUDA, m) { m.impl("second_moment_", &nsru::second_moment_cuda); }
