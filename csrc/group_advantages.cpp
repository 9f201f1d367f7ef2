// Grouped advantage normalisation: the op's schema, its input checks and the CPU kernel.
//
// For group g of G rewards r_i with weight w_g (1 when no weights are given):
//   A_i = w_g * (r_i - mean_g) / (std + eps)
// where std is the group's population std (scale "group"), the population std
// of every reward of the valid groups (scale "batch"), or no division at all
// (scale "none"). A group holding a non-finite reward or weight is invalid
// (A = 0, valid = false) and left out of the batch statistics; a group whose
// rewards are all equal (G = 1 included) gets A = 0 exactly, never 0/0.
//
// Outputs: advantages (rewards' shape; float32, or float64 for float64 rewards),
// valid [B] bool, zero_std [B] bool, stats [2] = (mean, population std) of the
// valid groups' rewards (0, 0 when there is none).
//
// CPU: one pass over the groups (at::parallel_reduce) computes each group's
// mean, its sum of squared deviations (two-pass inside the group, which sits in
// cache) and, for scales "group" and "none", the advantages. The batch std
// comes from the group means and M2s (a pass over B values, not over the
// rewards); scale "batch" then writes the advantages in a second pass.
// Everything is accumulated in double.

#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <string>

#include "group_advantages.h"

extern "C" {
// `import shala._C` loads this library, which runs the TORCH_LIBRARY
// registrations below; the module itself holds nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "SHALA's compiled ops, registered as torch.ops.shala.*",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

namespace shala {
namespace {

// Error messages are built from strings only: streaming numbers through c10::str
// goes through the ostream locale facets, which crashed (SIGSEGV) in a build whose
// compiler's libstdc++ was newer than the one loaded at run time.
std::string num(int64_t v) { return std::to_string(v); }

std::string num(double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}

std::string shape(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(sizes[i]);
  }
  return out + "]";
}

}  // namespace

AdvantageInputs check_advantage_inputs(
    const at::Tensor& rewards,
    int64_t group_size,
    const std::optional<at::Tensor>& weights,
    std::string_view scale,
    double eps) {
  const auto dtype = rewards.scalar_type();
  TORCH_CHECK(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      "group_advantages: rewards must be a floating tensor (float16, bfloat16, float32, float64), got ",
      std::string(c10::toString(dtype)));
  TORCH_CHECK(group_size >= 1, "group_advantages: group_size must be >= 1, got ", num(group_size));
  int64_t num_groups = 0;
  if (rewards.dim() == 1) {
    const int64_t n = rewards.size(0);
    TORCH_CHECK(
        n % group_size == 0, "group_advantages: rewards has ", num(n),
        " entries, not divisible by group_size=", num(group_size),
        ": expected B*G rewards, G consecutive per prompt");
    num_groups = n / group_size;
  } else if (rewards.dim() == 2) {
    TORCH_CHECK(
        rewards.size(1) == group_size, "group_advantages: rewards has shape ", shape(rewards.sizes()),
        " but group_size=", num(group_size), ": a [B, G] tensor needs G == group_size");
    num_groups = rewards.size(0);
  } else {
    TORCH_CHECK(false, "group_advantages: rewards must be 1-D [B*G] or 2-D [B, G], got shape ", shape(rewards.sizes()));
  }
  Scale mode;
  if (scale == "group") {
    mode = Scale::kGroup;
  } else if (scale == "batch") {
    mode = Scale::kBatch;
  } else if (scale == "none") {
    mode = Scale::kNone;
  } else {
    TORCH_CHECK(false, "group_advantages: scale must be one of ['group', 'batch', 'none'], got '", std::string(scale), "'");
  }
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "group_advantages: eps must be a finite number >= 0, got ", num(eps));

  const auto out_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  std::optional<at::Tensor> w;
  if (weights.has_value()) {
    const auto& wt = *weights;
    TORCH_CHECK(
        at::isFloatingType(wt.scalar_type()), "group_advantages: weights must be a floating tensor, got ",
        std::string(c10::toString(wt.scalar_type())));
    TORCH_CHECK(
        wt.dim() == 1 && wt.size(0) == num_groups, "group_advantages: weights must have shape [", num(num_groups),
        "] (one per group of ", num(group_size), "), got ", shape(wt.sizes()));
    TORCH_CHECK(
        wt.device() == rewards.device(), "group_advantages: weights are on ", wt.device().str(), " but rewards are on ",
        rewards.device().str());
    // Cast before the finiteness test, as the reference does: a float64 weight
    // too large for float32 makes its group invalid in a float32 computation.
    w = wt.to(out_dtype).contiguous();
  }
  return AdvantageInputs{rewards.contiguous(), w, num_groups, group_size, mode, eps, out_dtype};
}

AdvantageOutputs empty_advantage_outputs(const AdvantageInputs& in) {
  const auto& r = in.rewards;
  auto fopts = r.options().dtype(in.out_dtype);
  auto bopts = r.options().dtype(at::kBool);
  return {
      at::empty(r.sizes(), fopts),
      at::empty({in.num_groups}, bopts),
      at::empty({in.num_groups}, bopts),
      at::empty({2}, fopts),
  };
}

namespace {

// One group's statistics; `weight` is w_g (1 without weights).
struct GroupStats {
  bool valid;
  bool zero_std;
  double mean;
  double m2;  // sum of squared deviations from the mean
  double weight;
};

template <typename in_t, typename w_t>
GroupStats group_stats(const in_t* r, const w_t* weights, int64_t g, int64_t G) {
  const in_t* rg = r + g * G;
  double sum = 0.0;
  bool finite = true;
  double lo = static_cast<double>(rg[0]);
  double hi = lo;
  for (int64_t i = 0; i < G; ++i) {
    const double v = static_cast<double>(rg[i]);
    finite &= std::isfinite(v);
    sum += v;
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  const double w = weights ? static_cast<double>(weights[g]) : 1.0;
  if (!(finite && std::isfinite(w))) return {false, false, 0.0, 0.0, 0.0};
  const double mean = sum / static_cast<double>(G);
  double m2 = 0.0;
  for (int64_t i = 0; i < G; ++i) {
    const double d = static_cast<double>(rg[i]) - mean;
    m2 += d * d;
  }
  return {true, hi == lo, mean, m2, w};
}

// A_i = (r_i - mean) * factor with factor = w / denom, or 0 when `keep` is false.
// One division per group; the product differs from (r_i - mean) / denom * w by
// an ulp of double, far below float32 output precision.
template <typename in_t, typename out_t>
void write_group(const in_t* r, out_t* adv, int64_t g, int64_t G, bool keep, double mean, double factor) {
  const in_t* rg = r + g * G;
  out_t* ag = adv + g * G;
  if (!keep) {
    std::fill(ag, ag + G, out_t(0));
    return;
  }
  for (int64_t i = 0; i < G; ++i) {
    ag[i] = static_cast<out_t>((static_cast<double>(rg[i]) - mean) * factor);
  }
}

// Per-thread sums over valid groups: additions only, so no long dependency chain.
struct Sums {
  int64_t groups = 0;
  double mean_sum = 0.0;  // sum of group means
  double m2_sum = 0.0;    // sum of within-group squared deviations
};

Sums add(const Sums& a, const Sums& b) {
  return {a.groups + b.groups, a.mean_sum + b.mean_sum, a.m2_sum + b.m2_sum};
}

template <typename in_t, typename out_t>
void group_advantages_cpu_kernel(const AdvantageInputs& in, const AdvantageOutputs& outs) {
  const int64_t B = in.num_groups;
  const int64_t G = in.group_size;
  const in_t* r = in.rewards.const_data_ptr<in_t>();
  const out_t* w = in.weights ? in.weights->const_data_ptr<out_t>() : nullptr;
  out_t* adv = std::get<0>(outs).mutable_data_ptr<out_t>();
  bool* valid = std::get<1>(outs).mutable_data_ptr<bool>();
  bool* zero_std = std::get<2>(outs).mutable_data_ptr<bool>();
  out_t* stats = std::get<3>(outs).mutable_data_ptr<out_t>();
  const double eps = in.eps;
  const Scale scale = in.scale;
  // Group means, kept for the batch moments and for scale "batch".
  at::Tensor mean_buffer = at::empty({B}, in.rewards.options().dtype(at::kDouble));
  double* means = mean_buffer.mutable_data_ptr<double>();
  // About 16K rewards per task: enough work to amortise a thread's start.
  const int64_t grain = std::max<int64_t>(1, 16384 / G);

  const Sums sums = at::parallel_reduce(
      0, B, grain, Sums{},
      [&](int64_t begin, int64_t end, Sums acc) {
        for (int64_t g = begin; g < end; ++g) {
          const GroupStats s = group_stats(r, w, g, G);
          valid[g] = s.valid;
          zero_std[g] = s.zero_std;
          means[g] = s.mean;
          if (s.valid) {
            acc.groups += 1;
            acc.mean_sum += s.mean;
            acc.m2_sum += s.m2;
          }
          if (scale != Scale::kBatch) {
            const double denom = scale == Scale::kGroup ? std::sqrt(s.m2 / static_cast<double>(G)) + eps : 1.0;
            write_group(r, adv, g, G, s.valid && !s.zero_std, s.mean, s.weight / denom);
          }
        }
        return acc;
      },
      add);

  // Batch moments over the valid groups' rewards, all groups being of size G:
  // mean = mean of the group means; M2 = sum of within-group M2 + G * sum of
  // squared deviations of the group means (a second, exact pass over B values).
  const double batch_mean = sums.groups > 0 ? sums.mean_sum / static_cast<double>(sums.groups) : 0.0;
  const double between = at::parallel_reduce(
      0, B, 4 * grain, 0.0,
      [&](int64_t begin, int64_t end, double acc) {
        for (int64_t g = begin; g < end; ++g) {
          const double d = valid[g] ? means[g] - batch_mean : 0.0;
          acc += d * d;
        }
        return acc;
      },
      std::plus<double>());
  const double count = static_cast<double>(sums.groups * G);
  const double batch_std = sums.groups > 0 ? std::sqrt((sums.m2_sum + static_cast<double>(G) * between) / count) : 0.0;
  stats[0] = static_cast<out_t>(batch_mean);
  stats[1] = static_cast<out_t>(batch_std);
  if (scale == Scale::kBatch) {
    const double inv_denom = 1.0 / (batch_std + eps);
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        const double wg = w ? static_cast<double>(w[g]) : 1.0;
        write_group(r, adv, g, G, valid[g] && !zero_std[g], means[g], wg * inv_denom);
      }
    });
  }
}

AdvantageOutputs group_advantages_cpu(
    const at::Tensor& rewards,
    int64_t group_size,
    const std::optional<at::Tensor>& weights,
    std::string_view scale,
    double eps) {
  const AdvantageInputs in = check_advantage_inputs(rewards, group_size, weights, scale, eps);
  AdvantageOutputs outs = empty_advantage_outputs(in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.rewards.scalar_type(), "group_advantages_cpu", [&] {
    using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    group_advantages_cpu_kernel<scalar_t, out_t>(in, outs);
  });
  return outs;
}

}  // namespace

TORCH_LIBRARY(shala, m) {
  m.def(
      "group_advantages(Tensor rewards, int group_size, Tensor? weights, str scale, float eps)"
      " -> (Tensor advantages, Tensor valid, Tensor zero_std, Tensor stats)");
}

TORCH_LIBRARY_IMPL(shala, CPU, m) {
  m.impl("group_advantages", &group_advantages_cpu);
}

}  // namespace shala
