// Helpers shared by the CUDA kernels of the four fast-weight operators (header only, included by source path, like
// simd_cpu.h for the CPU kernels). Each extension is a single .cu file, so the helpers live here rather than in a
// separately compiled unit.
#pragma once

#include <torch/extension.h>

#include <string>
#include <vector>

namespace fwp {

constexpr int kWarpSize = 32;

// Sum over a group of `lanes` adjacent lanes (a power of two, at most a warp); every lane of the group gets it. The
// full mask is right because all kernels launch whole warps and call this outside divergent code.
__device__ __forceinline__ float group_sum(float value, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// The input conditions every kernel shares: empty when they hold, else why not (the caller adds shape checks).
inline std::string float32_cuda_problem(const std::vector<at::Tensor>& inputs) {
  for (const at::Tensor& t : inputs) {
    if (!t.is_cuda()) return "inputs must be CUDA tensors";
    if (t.scalar_type() != at::kFloat) return "only float32 is implemented";
    if (t.dim() != 4) return "inputs must have 4 dimensions";
    if (t.device() != inputs[0].device()) return "inputs must be on one device";
  }
  return "";
}

}  // namespace fwp
