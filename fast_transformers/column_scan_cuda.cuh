// Helpers of the column-scan kernels of the sum and delta rules (fast_weight_sum_cuda.cu, delta_net_cuda.cu): a
// group of `lanes` threads owns one column of the fast weight matrix, kRowsPerLane rows per thread in registers.
#pragma once

#include <algorithm>
#include <cstdint>

#include "fwp_cuda_common.cuh"

namespace fwp {

constexpr int kRowsPerLane = 8;
constexpr int kMaxSize = kRowsPerLane * kWarpSize;
constexpr int kThreadsPerBlock = 256;

// Threads per column: the smallest power of two whose kRowsPerLane rows each cover `rows`.
inline int lanes_for(int rows) {
  int lanes = 1;
  while (lanes * kRowsPerLane < rows) lanes *= 2;
  return lanes;
}

// Columns per block: as many as kThreadsPerBlock allows, but no more than `cols` rounded up to whole warps (the
// shuffles use the full mask).
inline int columns_per_block(int lanes, int cols) {
  const int columns_per_warp = kWarpSize / lanes;
  const int columns_rounded_to_warps = (cols + columns_per_warp - 1) / columns_per_warp * columns_per_warp;
  return std::min(kThreadsPerBlock / lanes, columns_rounded_to_warps);
}

__device__ __forceinline__ int time_of(int step, int length, bool reverse) {
  return reverse ? length - 1 - step : step;
}

// Copies entries [offset, offset + dst_width) of the vectors of `steps` time steps (in processing order, from
// `first_step`) of a (length, src_width) time-major matrix into dst[step][dst_width], zero past src_width.
__device__ inline void stage_steps(float* dst, const float* __restrict__ src, int length, bool reverse,
                                   int first_step, int steps, int src_width, int offset, int dst_width) {
  for (int i = threadIdx.x; i < steps * dst_width; i += blockDim.x) {
    const int step = i / dst_width;
    const int col = offset + i % dst_width;
    const int64_t t = time_of(first_step + step, length, reverse);
    dst[i] = col < src_width ? src[t * src_width + col] : 0.f;
  }
}

}  // namespace fwp
