// Torch-side declarations shared by the CPU op and the CUDA binding.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "group_advantages_common.h"

namespace shala {

using AdvantageOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Checked, contiguous inputs of the op.
struct AdvantageInputs {
  at::Tensor rewards;           // contiguous, original dtype, original shape
  std::optional<at::Tensor> weights;  // contiguous [B], cast to out_dtype
  int64_t num_groups;           // B
  int64_t group_size;           // G
  Scale scale;
  double eps;
  at::ScalarType out_dtype;     // float64 for float64 rewards, float32 otherwise
};

// TORCH_CHECKs every argument (shape, dtype, device, scale, eps) with a message
// naming the argument; returns them ready for raw-pointer access.
AdvantageInputs check_advantage_inputs(
    const at::Tensor& rewards,
    int64_t group_size,
    const std::optional<at::Tensor>& weights,
    std::string_view scale,
    double eps);

// Uninitialised outputs: advantages (rewards' shape), valid [B], zero_std [B], stats [2].
AdvantageOutputs empty_advantage_outputs(const AdvantageInputs& in);

}  // namespace shala
