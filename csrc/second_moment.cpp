// Grouped second-moment accumulation: moments[i] += X_iᵀ X_i over the unmasked rows of X_i.
#include <torch/extension.h>

#include <vector>

namespace nsru {

namespace {

void check_pair(const at::Tensor& moment, const at::Tensor& input, int64_t i) {
  TORCH_CHECK(moment.dim() == 2 && moment.size(0) == moment.size(1),
              "second_moment_: moments[", i, "] must be a square matrix, got shape ", moment.sizes());
  TORCH_CHECK(moment.is_contiguous(), "second_moment_: moments[", i, "] must be contiguous");
  TORCH_CHECK(moment.scalar_type() == at::kFloat || moment.scalar_type() == at::kDouble,
              "second_moment_: moments[", i, "] must be float32 or float64, got ", moment.scalar_type());
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) == moment.size(0),
              "second_moment_: inputs[", i, "] has width ", input.dim() ? input.size(-1) : 0,
              " but moments[", i, "] is ", moment.size(0), "x", moment.size(1));
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "second_moment_: inputs[", i, "] must be floating point, got ", input.scalar_type());
  TORCH_CHECK(input.device() == moment.device(), "second_moment_: inputs[", i, "] is on ", input.device(),
              " but moments[", i, "] is on ", moment.device());
}

}  // namespace

void second_moment_cpu(at::TensorList moments, at::TensorList inputs,
                       const c10::List<std::optional<at::Tensor>>& masks) {
  TORCH_CHECK(moments.size() == inputs.size(), "second_moment_: got ", moments.size(), " moments and ",
              inputs.size(), " inputs");
  TORCH_CHECK(masks.size() == 0 || masks.size() == inputs.size(), "second_moment_: got ", masks.size(),
              " masks for ", inputs.size(), " inputs (pass none or one per input)");
  for (size_t i = 0; i < moments.size(); ++i) {
    at::Tensor moment = moments[i];
    check_pair(moment, inputs[i], static_cast<int64_t>(i));
    at::Tensor x = inputs[i].reshape({-1, moment.size(0)});
    if (masks.size() > 0) {
      std::optional<at::Tensor> mask = masks.get(i);
      if (mask.has_value() && mask->defined()) {
        TORCH_CHECK(mask->numel() == x.size(0), "second_moment_: masks[", i, "] has ", mask->numel(),
                    " entries for ", x.size(0), " rows of inputs[", i, "]");
        x = x.index({mask->reshape({-1}).to(at::kBool)});
      }
    }
    if (x.size(0) == 0) continue;
    x = x.to(moment.scalar_type());
    moment.addmm_(x.t(), x);
  }
}

}  // namespace nsru

TORCH_LIBRARY(nsru, m) {
  m.def("second_moment_(Tensor(a!)[] moments, Tensor[] inputs, Tensor?[] masks) -> ()");
}

TORCH_LIBRARY_IMPL(nsru, CPU, m) { m.impl("second_moment_", &nsru::second_moment_cpu); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "NSRU C++/CUDA operators (registered under torch.ops.nsru)"; }
