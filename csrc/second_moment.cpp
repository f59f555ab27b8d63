// Grouped second-moment accumulation, CPU: moments[i] += X_iᵀ X_i over the kept rows of X_i.
//
// Only the upper triangle is computed. Each module's statistic is cut into row panels
// C[r0:r1, r0:d] += X[:, r0:r1]ᵀ X[:, r0:d] (the diagonal block of a panel is computed in full,
// the rest of the lower triangle is never touched), so a module costs about half a GEMM.
// The panels of all modules form one task list that the threads drain largest first, each task
// one single-threaded GEMM: many small modules keep every core busy, and the wide panels keep
// each GEMM near peak. Measured on 2 busy Xeon (AVX-512) cores, 4096 tokens, fp32: panels of 256 rows
// ran 1.4-1.7x a per-module addmm_ at width 1024-2048 (ideal: 1.6-1.8x); 128-row panels, or the
// diagonal blocks split once more, lost as much GEMM efficiency as they saved work.
//
// bf16/fp16 inputs with an fp32 statistic go straight to MKL's mixed-precision GEMM
// (bf16 x bf16 -> fp32, AMX on recent Xeons) when torch's MKL exports it; otherwise, and for
// masks, other strides or an fp64 statistic, the kept rows are gathered and converted, a few
// modules at a time, into buffers of bounded total size (see second_moment_cpu).
#include <torch/extension.h>

#include "second_moment.h"

#include <ATen/Parallel.h>
#include <ATen/ops/addmm_cpu_dispatch.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <vector>

// MKL's mixed-precision CBLAS, exported by torch's x86 builds (which link MKL statically). Weak, so
// that the extension still loads against a torch without MKL; the converting path is used then.
#if defined(__GNUC__) && !defined(_WIN32)
#define NSRU_WEAK __attribute__((weak))
extern "C" {
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c,
                            int ldc) NSRU_WEAK;
void cblas_gemm_f16f16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                          const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c,
                          int ldc) NSRU_WEAK;
}
#else  // no weak symbols: always convert
using nsru_mixed_gemm = void (*)(int, int, int, int, int, int, float, const uint16_t*, int, const uint16_t*, int,
                                 float, float*, int);
static constexpr nsru_mixed_gemm cblas_gemm_bf16bf16f32 = nullptr;
static constexpr nsru_mixed_gemm cblas_gemm_f16f16f32 = nullptr;
#endif

namespace nsru {

namespace {

constexpr int kCblasRowMajor = 101;
constexpr int kCblasNoTrans = 111;
constexpr int kCblasTrans = 112;
constexpr int64_t kPanel = 256;       // rows of C per task
constexpr int64_t kPassBytes = int64_t{32} << 20;  // converted rows held at once, at least

// How the GEMM of a module reads its rows.
enum class Gemm { kFloat, kDouble, kBF16, kHalf };

struct Module {
  at::Tensor moment;  // (d, d), contiguous
  at::Tensor rows;    // (n_all, d) view of the input
  at::Tensor index;   // int64 kept rows, or undefined for all rows
  int64_t d = 0;
  int64_t n = 0;           // kept rows
  Gemm gemm = Gemm::kFloat;
  bool direct = false;     // the GEMM reads `rows` in place
  at::ScalarType buffer_type = at::kFloat;
  // Per pass: the operand the GEMM reads, rows [lo, hi) of the kept rows.
  at::Tensor operand;
};

bool mixed_gemm_available(at::ScalarType t) {
  if (t == at::kBFloat16) return cblas_gemm_bf16bf16f32 != nullptr;
  if (t == at::kHalf) return cblas_gemm_f16f16f32 != nullptr;
  return false;
}

Module plan_module(const at::Tensor& moment, const at::Tensor& input, const std::optional<at::Tensor>& mask,
                   int64_t i) {
  Module m;
  m.moment = moment;
  m.d = moment.size(0);
  m.rows = input.reshape({check_mask(input, m.d, mask, i), m.d});
  m.n = m.rows.size(0);
  if (mask.has_value() && mask->defined()) {
    m.index = at::nonzero(mask->reshape({-1})).reshape({-1});
    m.n = m.index.size(0);
  }
  const at::ScalarType in = input.scalar_type();
  if (moment.scalar_type() == at::kDouble) {
    m.gemm = Gemm::kDouble;
    m.buffer_type = at::kDouble;
  } else if ((in == at::kBFloat16 || in == at::kHalf) && mixed_gemm_available(in)) {
    m.gemm = in == at::kBFloat16 ? Gemm::kBF16 : Gemm::kHalf;
    m.buffer_type = in;
  } else {
    m.gemm = Gemm::kFloat;
    m.buffer_type = at::kFloat;
  }
  const bool blas_layout = m.rows.stride(1) == 1 && (m.rows.size(0) <= 1 || m.rows.stride(0) >= m.d);
  m.direct = !m.index.defined() && in == m.buffer_type && blas_layout;
  return m;
}

// One GEMM: C[r0:r0+h, r0:d] += X[:, r0:r0+h]ᵀ X[:, r0:d] over the rows of `x`.
struct Task {
  int32_t module;
  int64_t r0;
  int64_t h;
  double cost;
};

void run_task(const Module& m, const Task& t) {
  const at::Tensor& x = m.operand;
  const int64_t k = x.size(0);
  const int64_t w = m.d - t.r0;
  if (k == 0) return;
  if (m.gemm == Gemm::kBF16 || m.gemm == Gemm::kHalf) {
    // CBLAS takes int sizes: rows in slices of at most 2^30.
    constexpr int64_t kSlice = int64_t{1} << 30;
    const int64_t ld = std::max<int64_t>(x.stride(0), 1);
    TORCH_CHECK(ld <= INT32_MAX && m.d <= INT32_MAX, "second_moment_: a row stride of ", ld, " is too large");
    auto fn = m.gemm == Gemm::kBF16 ? cblas_gemm_bf16bf16f32 : cblas_gemm_f16f16f32;
    float* c = m.moment.data_ptr<float>() + t.r0 * m.d + t.r0;
    for (int64_t k0 = 0; k0 < k; k0 += kSlice) {
      const auto* a = reinterpret_cast<const uint16_t*>(x.const_data_ptr()) + k0 * ld + t.r0;
      fn(kCblasRowMajor, kCblasTrans, kCblasNoTrans, static_cast<int>(t.h), static_cast<int>(w),
         static_cast<int>(std::min(kSlice, k - k0)), 1.0f, a, static_cast<int>(ld), a, static_cast<int>(ld), 1.0f,
         c, static_cast<int>(m.d));
    }
    return;
  }
  at::Tensor c = m.moment.narrow(0, t.r0, t.h).narrow(1, t.r0, w);
  at::cpu::addmm_(c, x.narrow(1, t.r0, t.h).t(), x.narrow(1, t.r0, w));
}

// The panels of every module, largest first (so that the last tasks to start are the short ones).
std::vector<Task> make_tasks(const std::vector<Module>& modules, const std::vector<int32_t>& active) {
  std::vector<Task> tasks;
  for (int32_t i : active) {
    const Module& m = modules[i];
    const int64_t k = m.operand.size(0);
    if (k == 0) continue;
    // A module narrower than two panels is one full GEMM: splitting it saves too little.
    const int64_t panel = m.d < 2 * kPanel ? m.d : kPanel;
    for (int64_t r0 = 0; r0 < m.d; r0 += panel) {
      const int64_t h = std::min(panel, m.d - r0);
      tasks.push_back({i, r0, h, static_cast<double>(h) * static_cast<double>(m.d - r0) * static_cast<double>(k)});
    }
  }
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
  return tasks;
}

void run_tasks(const std::vector<Module>& modules, const std::vector<Task>& tasks) {
  if (tasks.empty()) return;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(tasks.size()));
  if (threads <= 1) {
    for (const Task& t : tasks) run_task(modules[t.module], t);
    return;
  }
  // One chunk per thread; inside, threads take the next task from a shared counter. The GEMMs run
  // single-threaded inside the parallel region (BLAS does not nest), so each core owns one GEMM.
  std::atomic<int64_t> next{0};
  const int64_t count = static_cast<int64_t>(tasks.size());
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t j = next.fetch_add(1); j < count; j = next.fetch_add(1)) run_task(modules[tasks[j].module], tasks[j]);
  });
}

}  // namespace

void second_moment_cpu(at::TensorList moments, at::TensorList inputs,
                       const c10::List<std::optional<at::Tensor>>& masks) {
  check_lists(moments, inputs, masks);
  at::NoGradGuard no_grad;
  std::vector<Module> modules;
  modules.reserve(moments.size());
  for (size_t i = 0; i < moments.size(); ++i) {
    check_pair(moments[i], inputs[i], static_cast<int64_t>(i));
    TORCH_CHECK(moments[i].device().is_cpu(), "second_moment_: moments[", i, "] must be a CPU tensor here");
    std::optional<at::Tensor> mask = masks.size() > 0 ? masks.get(i) : std::nullopt;
    if (moments[i].size(0) == 0) {
      check_mask(inputs[i], 0, mask, static_cast<int64_t>(i));
      continue;
    }
    modules.push_back(plan_module(moments[i], inputs[i], mask, static_cast<int64_t>(i)));
  }

  // Modules read in place join the first pass; the others are gathered and converted whole (full
  // rows keep the GEMMs long), in passes whose buffers together stay under a budget: the largest
  // single conversion (what a per-module loop needs anyway) or kPassBytes, whichever is larger.
  // Fewer passes matter on a busy machine: each pass ends in a barrier of all threads.
  std::vector<int32_t> pass;
  std::vector<std::vector<int32_t>> later;
  int64_t budget = kPassBytes;
  for (const Module& m : modules) {
    if (!m.direct) budget = std::max(budget, m.n * m.d * static_cast<int64_t>(at::elementSize(m.buffer_type)));
  }
  int64_t used = 0;
  for (size_t i = 0; i < modules.size(); ++i) {
    Module& m = modules[i];
    if (m.n == 0 || m.d == 0) continue;
    if (m.direct) {
      m.operand = m.rows;
      pass.push_back(static_cast<int32_t>(i));
      continue;
    }
    const int64_t bytes = m.n * m.d * static_cast<int64_t>(at::elementSize(m.buffer_type));
    if (later.empty() || used + bytes > budget) {
      later.emplace_back();
      used = 0;
    }
    later.back().push_back(static_cast<int32_t>(i));
    used += bytes;
  }
  for (size_t p = 0; p < std::max<size_t>(later.size(), 1); ++p) {
    if (p < later.size()) {
      for (int32_t i : later[p]) {
        Module& m = modules[i];
        at::Tensor src = m.index.defined() ? m.rows.index_select(0, m.index) : m.rows;
        m.operand = src.to(m.buffer_type).contiguous();
        pass.push_back(i);
      }
    }
    run_tasks(modules, make_tasks(modules, pass));
    for (int32_t i : pass) modules[i].operand = at::Tensor();
    pass.clear();
  }
}

}  // namespace nsru

TORCH_LIBRARY(nsru, m) {
  m.def("second_moment_(Tensor(a!)[] moments, Tensor[] inputs, Tensor?[] masks) -> ()");
}

TORCH_LIBRARY_IMPL(nsru, CPU, m) { m.impl("second_moment_", &nsru::second_moment_cpu); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "NSRU C++/CUDA operators (registered under torch.ops.nsru)"; }
