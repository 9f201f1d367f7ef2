// Definitions shared by the torch-side code and the torch-free CUDA kernel file.
#pragma once

namespace shala {

// How centred rewards are scaled; the op's `scale` string maps onto these.
enum class Scale : int {
  kGroup = 0,  // divide by the group's population std + eps
  kBatch = 1,  // divide by the batch's population std + eps
  kNone = 2,   // no division (Dr. GRPO)
};

// Element type of the rewards handed to the CUDA launcher.
enum class RewardType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

}  // namespace shala
