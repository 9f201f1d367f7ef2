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
// cache) and the advantages; the per-group (count, mean, M2) triples are merged
// with Chan's formula, so the batch std needs no second pass over the rewards.
// Scale "batch" needs that std first, so it writes the advantages in a second
// pass. Everything is accumulated in double.

#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
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
      dtype);
  TORCH_CHECK(group_size >= 1, "group_advantages: group_size must be >= 1, got ", group_size);
  int64_t num_groups = 0;
  if (rewards.dim() == 1) {
    const int64_t n = rewards.size(0);
    TORCH_CHECK(
        n % group_size == 0, "group_advantages: rewards has ", n,
        " entries, not divisible by group_size=", group_size,
        ": expected B*G rewards, G consecutive per prompt");
    num_groups = n / group_size;
  } else if (rewards.dim() == 2) {
    TORCH_CHECK(
        rewards.size(1) == group_size, "group_advantages: rewards has shape ", rewards.sizes(),
        " but group_size=", group_size, ": a [B, G] tensor needs G == group_size");
    num_groups = rewards.size(0);
  } else {
    TORCH_CHECK(false, "group_advantages: rewards must be 1-D [B*G] or 2-D [B, G], got shape ", rewards.sizes());
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
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "group_advantages: eps must be a finite number >= 0, got ", eps);

  const auto out_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  std::optional<at::Tensor> w;
  if (weights.has_value()) {
    const auto& wt = *weights;
    TORCH_CHECK(
        at::isFloatingType(wt.scalar_type()), "group_advantages: weights must be a floating tensor, got ",
        wt.scalar_type());
    TORCH_CHECK(
        wt.dim() == 1 && wt.size(0) == num_groups, "group_advantages: weights must have shape [", num_groups,
        "] (one per group of ", group_size, "), got ", wt.sizes());
    TORCH_CHECK(
        wt.device() == rewards.device(), "group_advantages: weights are on ", wt.device(), " but rewards are on ",
        rewards.device());
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

// Count, mean and sum of squared deviations of a set of rewards.
struct Moments {
  int64_t n = 0;
  double mean = 0.0;
  double m2 = 0.0;
};

// Chan et al.'s pairwise merge: exact in exact arithmetic and stable in floating point.
Moments merge(const Moments& a, const Moments& b) {
  if (a.n == 0) return b;
  if (b.n == 0) return a;
  const int64_t n = a.n + b.n;
  const double delta = b.mean - a.mean;
  const double fb = static_cast<double>(b.n) / static_cast<double>(n);
  return {n, a.mean + delta * fb, a.m2 + b.m2 + delta * delta * static_cast<double>(a.n) * fb};
}

// One group's statistics; `weight` is w_g (1 without weights).
struct GroupStats {
  bool valid;
  bool zero_std;
  double mean;
  double m2;
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
    finite = finite && std::isfinite(v);
    sum += v;
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  const double w = weights ? static_cast<double>(weights[g]) : 1.0;
  const bool valid = finite && std::isfinite(w);
  if (!valid) return {false, false, 0.0, 0.0, 0.0};
  const double mean = sum / static_cast<double>(G);
  double m2 = 0.0;
  for (int64_t i = 0; i < G; ++i) {
    const double d = static_cast<double>(rg[i]) - mean;
    m2 += d * d;
  }
  return {true, hi == lo, mean, m2, w};
}

template <typename in_t, typename out_t>
void write_group(const in_t* r, out_t* adv, int64_t g, int64_t G, const GroupStats& s, double denom) {
  const in_t* rg = r + g * G;
  out_t* ag = adv + g * G;
  if (!s.valid || s.zero_std) {
    std::fill(ag, ag + G, out_t(0));
    return;
  }
  for (int64_t i = 0; i < G; ++i) {
    ag[i] = static_cast<out_t>((static_cast<double>(rg[i]) - s.mean) / denom * s.weight);
  }
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
  // About 16K rewards per task: enough work to amortise a thread's start.
  const int64_t grain = std::max<int64_t>(1, 16384 / G);

  const Moments batch = at::parallel_reduce(
      0, B, grain, Moments{},
      [&](int64_t begin, int64_t end, Moments acc) {
        for (int64_t g = begin; g < end; ++g) {
          const GroupStats s = group_stats(r, w, g, G);
          valid[g] = s.valid;
          zero_std[g] = s.zero_std;
          if (s.valid) acc = merge(acc, Moments{G, s.mean, s.m2});
          if (scale == Scale::kGroup) {
            write_group(r, adv, g, G, s, std::sqrt(s.m2 / static_cast<double>(G)) + eps);
          } else if (scale == Scale::kNone) {
            write_group(r, adv, g, G, s, 1.0);
          }
        }
        return acc;
      },
      merge);

  const double batch_std = batch.n > 0 ? std::sqrt(batch.m2 / static_cast<double>(batch.n)) : 0.0;
  stats[0] = static_cast<out_t>(batch.mean);
  stats[1] = static_cast<out_t>(batch_std);
  if (scale == Scale::kBatch) {
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        write_group(r, adv, g, G, group_stats(r, w, g, G), batch_std + eps);
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
