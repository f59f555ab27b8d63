// Symmetric eigendecomposition of many statistics at once, CPU: for each upper triangle, the
// eigenvalues (ascending) and eigenvectors of the full symmetric matrix, in float64.
//
// torch.linalg.eigh on a batch runs one LAPACK call after another, each threaded inside. LAPACK's
// eigensolvers scale poorly on few cores (on 2 cores a 1024-wide eigh ran 0.2 s on one thread and
// 0.6-2 s on two while other processes were busy), so here the matrices are spread over the
// threads instead, each eigh single-threaded, largest first; a lone matrix keeps every thread.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <numeric>
#include <tuple>
#include <vector>

namespace nsru {

namespace {

at::Tensor full_from_upper(const at::Tensor& moment) {
  at::Tensor c = moment.to(at::kDouble);
  return at::triu(c) + at::triu(c, 1).t();
}

}  // namespace

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> symeig_upper_cpu(at::TensorList moments) {
  const int64_t count = static_cast<int64_t>(moments.size());
  for (int64_t i = 0; i < count; ++i) {
    const at::Tensor& c = moments[i];
    TORCH_CHECK(c.dim() == 2 && c.size(0) == c.size(1), "symeig_upper: moments[", i,
                "] must be a square matrix, got shape ", c.sizes());
    TORCH_CHECK(at::isFloatingType(c.scalar_type()), "symeig_upper: moments[", i, "] must be floating point, got ",
                c.scalar_type());
    TORCH_CHECK(c.device().is_cpu(), "symeig_upper: moments[", i, "] must be a CPU tensor here");
  }
  std::vector<at::Tensor> values(count), vectors(count);
  std::vector<int64_t> order(count);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return moments[a].size(0) > moments[b].size(0); });
  auto solve = [&](int64_t i) {
    at::NoGradGuard no_grad;
    std::tie(values[i], vectors[i]) = at::linalg_eigh(full_from_upper(moments[i]));
  };
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), count);
  if (threads <= 1) {
    for (int64_t j = 0; j < count; ++j) solve(order[j]);
  } else {
    std::atomic<int64_t> next{0};
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      for (int64_t j = next.fetch_add(1); j < count; j = next.fetch_add(1)) solve(order[j]);
    });
  }
  return {values, vectors};
}

}  // namespace nsru

TORCH_LIBRARY_FRAGMENT(nsru, m) {
  m.def("symeig_upper(Tensor[] moments) -> (Tensor[] eigenvalues, Tensor[] eigenvectors)");
}

TORCH_LIBRARY_IMPL(nsru, CPU, m) { m.impl("symeig_upper", &nsru::symeig_upper_cpu); }
