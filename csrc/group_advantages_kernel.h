// Launcher of the CUDA grouped-advantage kernels. Torch-free: raw device
// pointers and a stream, so group_advantages_kernel.cu compiles with nvcc alone.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "group_advantages_common.h"

namespace shala {

// Bytes of device scratch memory launch_group_advantages needs.
size_t group_advantages_workspace_bytes(int64_t num_groups, int64_t group_size, RewardType type);

// Computes the op on `stream`, with no host synchronisation.
//   rewards     [num_groups * group_size], element type `type`, contiguous
//   weights     [num_groups] or nullptr
//   advantages  [num_groups * group_size]
//   valid, zero_std [num_groups]
//   stats       [2]: mean and population std of the valid groups' rewards
// weights, advantages and stats are double when `type` is kFloat64 and float
// otherwise; arithmetic is done in that type. `workspace` holds at least
// group_advantages_workspace_bytes(...) bytes, 16-byte aligned.
// Returns the first launch error, or cudaSuccess.
cudaError_t launch_group_advantages(
    const void* rewards,
    RewardType type,
    const void* weights,
    int64_t num_groups,
    int64_t group_size,
    Scale scale,
    double eps,
    void* advantages,
    bool* valid,
    bool* zero_std,
    void* stats,
    void* workspace,
    cudaStream_t stream);

}  // namespace shala
