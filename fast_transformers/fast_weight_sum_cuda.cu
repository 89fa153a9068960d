// CUDA kernels of fast_weight_sum (linear attention, sum update rule): forward and backward, float32.
//
//   W_t = W_{t-1} + outer(k_t, v_t)  (W_{-1} = W0);  out_t = q_t @ W_t
//
// Design. The columns of the fast weight matrix never mix: W[:, m] += k_t * v_t[m] and out_t[m] = q_t . W[:, m].
// So a group of `lanes` threads (a power of two, inside one warp) owns one column, each thread kRowsPerLane of its
// rows in registers, and the dot product is a shuffle reduction inside the group: the time loop needs no block
// barrier and no shared-memory traffic for W. A block covers up to kThreadsPerBlock / lanes columns of one
// (batch, head); the grid's y dimension covers the other columns, so small batches still fill the GPU. The vectors
// of kChunk time steps are staged in shared memory with coalesced loads (rows of a time-major tensor are
// contiguous).
//
// The backward stores nothing and reverses nothing: each gradient is the same kind of scan, with G_t = sum_{s>=t}
// q_s do_s^T the gradient of W_t,
//   dq_t = W_t do_t     scan over W^T (rows m, columns e) forward from W0^T, adding v_t k_t[e], read with do_t
//   dk_t = G_t v_t      scan over G^T backward from 0, adding do_t q_t[e], read with v_t
//   dv_t = G_t^T k_t    scan over G backward from 0, adding q_t do_t[m], read with k_t
// so one kernel does all four passes: X[:, c] += a_t * b_t[c]; result_t[c] = z_t . X[:, c]. Every gradient is
// exact (the W0 term of dq included) and computed with the forward's own operation order.
//
// Supported: float32 tensors on a CUDA device, key size E and value size M from 1 to kMaxSize (256). `supports`
// says false for anything else (float64, half, bfloat16, larger heads): the dispatcher then runs the PyTorch
// reference on the GPU.
#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <string>
#include <vector>

#include "column_scan_cuda.cuh"

namespace {

using namespace fwp;

constexpr int kChunk = 16;

// How one scan over a (rows x cols) matrix is spread over threads.
struct ScanLayout {
  int lanes;             // threads per column: a power of two, at most a warp
  int columns;           // columns per block; lanes * columns is a whole number of warps
  int padded_rows;       // lanes * kRowsPerLane >= rows; the staged row vectors are zero-padded to it
  int blocks_per_head;   // grid.y
};

ScanLayout scan_layout(int rows, int cols) {
  const int lanes = lanes_for(rows);
  const int columns = columns_per_block(lanes, cols);
  return {lanes, columns, lanes * kRowsPerLane, (cols + columns - 1) / columns};
}

// X[:, c] = X0[:, c] (or 0); for each step t in order: X[:, c] += a_t * b_t[c]; result_t[c] = z_t . X[:, c].
// a, z: (heads, L, rows); b, result: (heads, L, cols); X0[r, c] at x0[head * rows * cols + r * x0_row_stride +
// c * x0_col_stride]. Grid: (heads, layout.blocks_per_head); block: layout.lanes * layout.columns threads.
__global__ void __launch_bounds__(kThreadsPerBlock)
outer_product_scan_kernel(const float* __restrict__ a, const float* __restrict__ b, const float* __restrict__ z,
                          const float* __restrict__ x0, int x0_row_stride, int x0_col_stride,
                          float* __restrict__ result, int length, int rows, int cols, bool reverse,
                          ScanLayout layout) {
  extern __shared__ float staged[];
  float* a_steps = staged;                                 // [kChunk][padded_rows]
  float* z_steps = a_steps + kChunk * layout.padded_rows;  // [kChunk][padded_rows]
  float* b_steps = z_steps + kChunk * layout.padded_rows;  // [kChunk][columns]

  const int64_t head = blockIdx.x;
  const int lanes = layout.lanes;
  const int lane = threadIdx.x % lanes;
  const int local_col = threadIdx.x / lanes;
  const int first_col = blockIdx.y * layout.columns;
  const int col = first_col + local_col;
  const bool owns_column = col < cols;
  a += head * length * rows;
  z += head * length * rows;
  b += head * length * cols;
  result += head * length * cols;

  float x[kRowsPerLane];
#pragma unroll
  for (int j = 0; j < kRowsPerLane; ++j) {
    const int row = lane + j * lanes;
    x[j] = (x0 != nullptr && owns_column && row < rows)
               ? x0[head * rows * cols + static_cast<int64_t>(row) * x0_row_stride +
                    static_cast<int64_t>(col) * x0_col_stride]
               : 0.f;
  }

  for (int first = 0; first < length; first += kChunk) {
    const int steps = min(kChunk, length - first);
    __syncthreads();  // the previous chunk has been consumed
    stage_steps(a_steps, a, length, reverse, first, steps, rows, 0, layout.padded_rows);
    stage_steps(z_steps, z, length, reverse, first, steps, rows, 0, layout.padded_rows);
    stage_steps(b_steps, b, length, reverse, first, steps, cols, first_col, layout.columns);
    __syncthreads();
    for (int step = 0; step < steps; ++step) {
      const float* a_t = a_steps + step * layout.padded_rows;
      const float* z_t = z_steps + step * layout.padded_rows;
      const float b_tc = b_steps[step * layout.columns + local_col];
      float partial = 0.f;
#pragma unroll
      for (int j = 0; j < kRowsPerLane; ++j) {
        const int row = lane + j * lanes;
        x[j] = fmaf(a_t[row], b_tc, x[j]);
        partial = fmaf(z_t[row], x[j], partial);
      }
      const float total = group_sum(partial, lanes);
      if (owns_column && lane == 0) result[static_cast<int64_t>(time_of(first + step, length, reverse)) * cols + col] = total;
    }
  }
}

// The initial matrix of a scan: none (zeros), W0 as it is, or W0 transposed.
struct InitialMatrix {
  const float* data;
  int row_stride;
  int col_stride;
};

// a, z: (B, H, L, rows); b: (B, H, L, cols); returns (B, H, L, cols).
at::Tensor outer_product_scan(const at::Tensor& a, const at::Tensor& b, const at::Tensor& z, InitialMatrix x0,
                              bool reverse) {
  const int64_t heads = a.size(0) * a.size(1);
  const int length = a.size(2), rows = a.size(3), cols = b.size(3);
  at::Tensor result = at::empty_like(b);
  if (heads == 0 || length == 0) return result;
  const ScanLayout layout = scan_layout(rows, cols);
  const size_t shared_bytes = sizeof(float) * kChunk * (2 * layout.padded_rows + layout.columns);
  const dim3 grid(heads, layout.blocks_per_head);
  const dim3 block(layout.lanes * layout.columns);
  outer_product_scan_kernel<<<grid, block, shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
      a.data_ptr<float>(), b.data_ptr<float>(), z.data_ptr<float>(), x0.data, x0.row_stride, x0.col_stride,
      result.data_ptr<float>(), length, rows, cols, reverse, layout);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return result;
}

// Empty when the kernels handle these inputs, else why not.
std::string unsupported_reason(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& W0) {
  const std::string problem = float32_cuda_problem({q, k, v, W0});
  if (!problem.empty()) return problem;
  const int64_t E = q.size(3), M = v.size(3);
  if (k.sizes() != q.sizes() || v.sizes().slice(0, 3) != q.sizes().slice(0, 3) ||
      W0.sizes() != at::IntArrayRef({q.size(0), q.size(1), E, M}))
    return "shapes must be q, k (B, H, L, E), v (B, H, L, M), W0 (B, H, E, M)";
  if (E < 1 || E > kMaxSize || M < 1 || M > kMaxSize)
    return "E and M must be between 1 and " + std::to_string(kMaxSize);
  return "";
}

bool supports(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& W0) {
  return unsupported_reason(q, k, v, W0).empty();
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& W0) {
  const std::string reason = unsupported_reason(q, k, v, W0);
  TORCH_CHECK(reason.empty(), "fast_weight_sum CUDA kernel: ", reason);
  for (const at::Tensor* t : {&q, &k, &v, &W0}) TORCH_CHECK(t->is_contiguous(), "inputs must be contiguous");
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& W0) {
  check_inputs(q, k, v, W0);
  const c10::cuda::OptionalCUDAGuard device_guard(q.device());
  const int M = v.size(3);
  return {outer_product_scan(k, v, q, {W0.data_ptr<float>(), M, 1}, /*reverse=*/false)};
}

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& W0, const std::vector<at::Tensor>& saved) {
  check_inputs(q, k, v, W0);
  TORCH_CHECK(grad_out.sizes() == v.sizes() && grad_out.is_contiguous() && grad_out.scalar_type() == at::kFloat,
              "grad_out must be a contiguous float32 tensor shaped like v");
  TORCH_CHECK(saved.empty(), "fast_weight_sum saves nothing for backward");
  const c10::cuda::OptionalCUDAGuard device_guard(q.device());
  const int M = v.size(3);
  const InitialMatrix zeros{nullptr, 0, 0};
  at::Tensor dq = outer_product_scan(v, k, grad_out, {W0.data_ptr<float>(), 1, M}, /*reverse=*/false);
  at::Tensor dk = outer_product_scan(grad_out, q, v, zeros, /*reverse=*/true);
  at::Tensor dv = outer_product_scan(q, grad_out, k, zeros, /*reverse=*/true);
  return {dq, dk, dv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fast_weight_sum (linear attention, sum rule): float32 CUDA kernels";
  m.def("forward", &forward, "forward(q, k, v, W0) -> [out]");
  m.def("backward", &backward, "backward(grad_out, q, k, v, W0, saved) -> [dq, dk, dv]");
  m.def("supports", &supports, "supports(q, k, v, W0) -> whether these kernels handle the inputs");
}
