// CUDA binding of the grouped advantage op: checks the tensors, allocates the
// outputs and the scratch space, and launches the kernels of
// group_advantages_kernel.cu on the current stream. Compiled in the CUDA build only.
#ifdef SHALA_WITH_CUDA

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "group_advantages.h"
#include "group_advantages_kernel.h"

namespace shala {
namespace {

RewardType reward_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return RewardType::kFloat32;
    case at::kDouble: return RewardType::kFloat64;
    case at::kHalf: return RewardType::kFloat16;
    case at::kBFloat16: return RewardType::kBFloat16;
    default: TORCH_CHECK(false, "group_advantages: unsupported rewards dtype ", std::string(c10::toString(dtype)));
  }
}

AdvantageOutputs group_advantages_cuda(
    const at::Tensor& rewards,
    int64_t group_size,
    const std::optional<at::Tensor>& weights,
    std::string_view scale,
    double eps) {
  const AdvantageInputs in = check_advantage_inputs(rewards, group_size, weights, scale, eps);
  const c10::cuda::CUDAGuard guard(in.rewards.device());
  AdvantageOutputs outs = empty_advantage_outputs(in);
  const RewardType type = reward_type(in.rewards.scalar_type());
  const size_t bytes = group_advantages_workspace_bytes(in.num_groups, in.group_size, type);
  // The caching allocator hands out 512-byte aligned, stream-ordered blocks.
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, in.rewards.options().dtype(at::kByte));
  C10_CUDA_CHECK(launch_group_advantages(
      in.rewards.const_data_ptr(),
      type,
      in.weights ? in.weights->const_data_ptr() : nullptr,
      in.num_groups,
      in.group_size,
      in.scale,
      in.eps,
      std::get<0>(outs).mutable_data_ptr(),
      std::get<1>(outs).mutable_data_ptr<bool>(),
      std::get<2>(outs).mutable_data_ptr<bool>(),
      std::get<3>(outs).mutable_data_ptr(),
      workspace.mutable_data_ptr(),
      c10::cuda::getCurrentCUDAStream()));
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(shala, CUDA, m) {
  m.impl("group_advantages", &group_advantages_cuda);
}

}  // namespace shala

#endif  // SHALA_WITH_CUDA
