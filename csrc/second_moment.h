// Shared by the CPU and CUDA implementations of second_moment_: the checks at the door.
#pragma once

#include <torch/extension.h>

namespace nsru {

inline void check_lists(at::TensorList moments, at::TensorList inputs,
                        const c10::List<std::optional<at::Tensor>>& masks) {
  TORCH_CHECK(moments.size() == inputs.size(), "second_moment_: got ", moments.size(), " moments and ",
              inputs.size(), " inputs");
  TORCH_CHECK(masks.size() == 0 || masks.size() == inputs.size(), "second_moment_: got ", masks.size(),
              " masks for ", inputs.size(), " inputs (pass none or one per input)");
}

inline void check_pair(const at::Tensor& moment, const at::Tensor& input, int64_t i) {
  TORCH_CHECK(moment.dim() == 2 && moment.size(0) == moment.size(1),
              "second_moment_: moments[", i, "] must be a square matrix, got shape ", moment.sizes());
  TORCH_CHECK(moment.is_contiguous(), "second_moment_: moments[", i, "] must be contiguous");
  TORCH_CHECK(moment.scalar_type() == at::kFloat || moment.scalar_type() == at::kDouble,
              "second_moment_: moments[", i, "] must be float32 or float64, got ", moment.scalar_type());
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) == moment.size(0),
              "second_moment_: inputs[", i, "] has width ", input.dim() ? input.size(-1) : 0,
              " but moments[", i, "] is ", moment.size(0), "x", moment.size(1));
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble ||
                  input.scalar_type() == at::kBFloat16 || input.scalar_type() == at::kHalf,
              "second_moment_: inputs[", i, "] must be float32, float64, bfloat16 or float16, got ",
              input.scalar_type());
  TORCH_CHECK(input.device() == moment.device(), "second_moment_: inputs[", i, "] is on ", input.device(),
              " but moments[", i, "] is on ", moment.device());
}

// The rows of module i that count: number of rows of `input` viewed as (-1, d), checked against the mask.
inline int64_t check_mask(const at::Tensor& input, int64_t d, const std::optional<at::Tensor>& mask, int64_t i) {
  const int64_t rows = d > 0 ? input.numel() / d : 0;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->numel() == rows, "second_moment_: masks[", i, "] has ", mask->numel(), " entries for ",
                rows, " rows of inputs[", i, "]");
    TORCH_CHECK(mask->device() == input.device(), "second_moment_: masks[", i, "] is on ", mask->device(),
                " but inputs[", i, "] is on ", input.device());
  }
  return rows;
}

}  // namespace nsru
