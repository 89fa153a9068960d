// Helpers of the kernels that keep whole D x D matrices in shared memory, one block per (batch, head): Recurrent
// Delta (rec_delta_cuda.cu) and SRWM (self_ref_v0_cuda.cu). Matrices are read by groups of kLanes threads, one group
// per row or per column.
#pragma once

#include <c10/cuda/CUDAException.h>

#include <cmath>

#include "../fast_transformers/fwp_cuda_common.cuh"

namespace fwp {

constexpr int kLanes = 8;  // threads per matrix row or column
// No GPU has the shared memory for the backward beyond D = 96 (227 KB per block at most). Capping the block at
// kLanes * 96 threads, with one block per SM (`__launch_bounds__(kMaxThreads, 1)`), lets the compiler give each
// thread 80 registers: the kernels then need no local memory (without the 1, ptxas on sm_80 chose 40 and spilled).
constexpr int kMaxHeadSize = 96;
constexpr int kMaxThreads = kLanes * kMaxHeadSize;
constexpr int kCheckpointEvery = 32;

__host__ __device__ inline int padded_stride(int D) { return (D + kWarpSize - 1) / kWarpSize * kWarpSize; }
// One group of kLanes threads per row or column, in whole warps (the shuffles use the full mask).
inline int threads_for(int D) {
  constexpr int kGroupsPerWarp = kWarpSize / kLanes;
  return kLanes * ((D + kGroupsPerWarp - 1) / kGroupsPerWarp * kGroupsPerWarp);
}
__host__ __device__ inline int checkpoint_count(int length) {
  return (length + kCheckpointEvery - 1) / kCheckpointEvery;
}

// Index of entry (row, col) of a D x D matrix in shared memory. A warp holds 4 groups of 8 lanes: in the column
// layout lane g reads rows with row % 8 == g of 4 adjacent columns, in the row layout 4 adjacent rows at 8 adjacent
// columns. XOR-ing the column with ((row & 3) << 3) | (row & 4) (which stays inside the row's 32-float block) puts
// the 32 reads of either layout into 32 different banks.
__device__ __forceinline__ int swizzled(int row, int col, int stride) {
  return row * stride + (col ^ (((row & 3) << 3) | (row & 4)));
}

__device__ __forceinline__ float group_sum(float value) { return group_sum(value, kLanes); }

__device__ __forceinline__ float warp_sum(float value) { return group_sum(value, kWarpSize); }

__device__ __forceinline__ float warp_max(float value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// probs = softmax(logits[0..D)), computed by the whole calling warp; also written to `saved` (global memory).
__device__ inline void warp_softmax(const float* logits, float* probs, float* saved, int D) {
  const int lane = threadIdx.x % kWarpSize;
  float largest = -INFINITY;
  for (int i = lane; i < D; i += kWarpSize) largest = fmaxf(largest, logits[i]);
  largest = warp_max(largest);
  float total = 0.f;
  for (int i = lane; i < D; i += kWarpSize) total += expf(logits[i] - largest);
  total = warp_sum(total);
  for (int i = lane; i < D; i += kWarpSize) {
    const float p = expf(logits[i] - largest) / total;
    probs[i] = p;
    saved[i] = p;
  }
}

// Copies a row-major D x D matrix from global memory into swizzled shared memory (coalesced reads).
__device__ inline void load_matrix(float* dst, const float* __restrict__ src, int D, int stride) {
  for (int i = threadIdx.x; i < D * D; i += blockDim.x) dst[swizzled(i / D, i % D, stride)] = src[i];
}

// The most dynamic shared memory one block may opt in to on `device`: what decides the largest supported D.
inline int max_shared_bytes(const at::Device& device) {
  int bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device.index()));
  return bytes;
}

}  // namespace fwp
