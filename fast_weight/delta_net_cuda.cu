// CUDA kernels of delta_net_fn (the delta rule, DeltaNet): forward and backward, float32.
//
//   v_old = k_t @ W_{t-1};  W_t = W_{t-1} + outer(k_t, beta_t * (v_t - v_old));  out_t = q_t @ W_t
//
// Design. As for the sum rule, the columns of W never mix: column m only needs k_t, q_t, beta_t and v_t[m]. A group
// of `lanes` threads (a power of two, inside one warp) owns one column, kRowsPerLane rows per thread in registers;
// dot products are shuffle reductions inside the group, so the time loop has no block barrier. A block covers
// several columns of one (batch, head), the grid's y dimension the rest. The vectors of a chunk of time steps are
// staged in shared memory with coalesced loads.
//
// Backward, exactly and without stored or reversed states. With G the gradient of W_t, u_t = beta_t * delta_t and
// delta_t = v_t - v_old (saved by the forward):
//   du_t  = G^T k_t                 where G += q_t do_t^T before and G -= beta_t k_t du_t^T after (columns of G
//                                   never mix either: one scan backward from G = 0, `delta_column_backward_kernel`)
//   dv_t = beta_t du_t,  dbeta_t = du_t . delta_t                     (PyTorch ops)
//   dq_t = W_t do_t,  dk_t = -beta_t W_{t-1} du_t + G u_t            (`delta_row_backward_kernel`)
// Given u and du, the ROWS of W and G evolve independently (W[e, :] += k_t[e] u_t, G[e, :] += q_t[e] do_t -
// beta_t k_t[e] du_t), so dq and dk come from one forward scan over W^T (from W0^T) and one backward scan over G^T
// (from 0) with the same thread layout, rows and columns exchanged.
//
// Supported: float32 tensors on a CUDA device, key size E and value size M from 1 to kMaxSize (256). `supports`
// says false for anything else (float64, half, bfloat16, larger heads): the dispatcher then runs the PyTorch
// reference on the GPU.
#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <string>
#include <vector>

#include "../fast_transformers/column_scan_cuda.cuh"

namespace {

using namespace fwp;

constexpr int kMaxChunk = 16;
constexpr int kStagingBytes = 48 * 1024;  // the dynamic shared memory every GPU grants without opting in

// How a scan over a (rows x cols) matrix is spread over threads, and how many steps are staged at once.
struct ScanLayout {
  int lanes;            // threads per column: a power of two, at most a warp
  int columns;          // columns per block; lanes * columns is a whole number of warps
  int padded_rows;      // lanes * kRowsPerLane >= rows; staged row vectors are zero-padded to it
  int blocks_per_head;  // grid.y
  int chunk;            // time steps staged at once
  int staged_floats;    // shared memory per block, in floats
};

// `row_vectors` and `column_vectors`: how many per-step vectors of each kind the kernel stages (plus beta).
ScanLayout scan_layout(int rows, int cols, int row_vectors, int column_vectors) {
  const int lanes = lanes_for(rows);
  const int columns = columns_per_block(lanes, cols);
  const int padded_rows = lanes * kRowsPerLane;
  const int floats_per_step = row_vectors * padded_rows + column_vectors * columns + 1;
  const int chunk = std::min(kMaxChunk, kStagingBytes / static_cast<int>(sizeof(float)) / floats_per_step);
  return {lanes, columns, padded_rows, (cols + columns - 1) / columns, chunk, chunk * floats_per_step};
}

// One thread's share of a column: rows lane, lane + lanes, ... of it, in registers.
struct ColumnSlice {
  float x[kRowsPerLane];

  // X0[r, c] at x0[r * row_stride + c * col_stride]; zeros when x0 is null or the column is not ours.
  __device__ void load(const float* __restrict__ x0, int row_stride, int col_stride, int col, bool owns_column,
                       int rows, int lane, int lanes) {
#pragma unroll
    for (int j = 0; j < kRowsPerLane; ++j) {
      const int row = lane + j * lanes;
      x[j] = (x0 != nullptr && owns_column && row < rows)
                 ? x0[static_cast<int64_t>(row) * row_stride + static_cast<int64_t>(col) * col_stride]
                 : 0.f;
    }
  }

  // vec . X[:, c] over the whole column (every lane of the group gets it). vec is zero-padded.
  __device__ float dot(const float* vec, int lane, int lanes) const {
    float partial = 0.f;
#pragma unroll
    for (int j = 0; j < kRowsPerLane; ++j) partial = fmaf(vec[lane + j * lanes], x[j], partial);
    return group_sum(partial, lanes);
  }

  // X[:, c] += vec * scale
  __device__ void add_scaled(const float* vec, float scale, int lane, int lanes) {
#pragma unroll
    for (int j = 0; j < kRowsPerLane; ++j) x[j] = fmaf(vec[lane + j * lanes], scale, x[j]);
  }
};

// Where this thread sits in a scan: its (batch, head), its column and its lane in the column's group.
struct ScanThread {
  int64_t head;
  int lane;
  int local_col;
  int first_col;
  int col;
  bool owns_column;
};

__device__ ScanThread scan_thread(const ScanLayout& layout, int cols) {
  ScanThread s;
  s.head = blockIdx.x;
  s.lane = threadIdx.x % layout.lanes;
  s.local_col = threadIdx.x / layout.lanes;
  s.first_col = blockIdx.y * layout.columns;
  s.col = s.first_col + s.local_col;
  s.owns_column = s.col < cols;
  return s;
}

// Forward, one column of W per group. Writes out and delta = v - v_old, both (heads, L, M).
__global__ void __launch_bounds__(kThreadsPerBlock)
delta_forward_kernel(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                     const float* __restrict__ beta, const float* __restrict__ W0, float* __restrict__ out,
                     float* __restrict__ delta, int length, int E, int M, ScanLayout layout) {
  extern __shared__ float staged[];
  float* k_steps = staged;                                    // [chunk][padded_rows]
  float* q_steps = k_steps + layout.chunk * layout.padded_rows;  // [chunk][padded_rows]
  float* v_steps = q_steps + layout.chunk * layout.padded_rows;  // [chunk][columns]
  float* beta_steps = v_steps + layout.chunk * layout.columns;   // [chunk]

  const ScanThread me = scan_thread(layout, M);
  q += me.head * length * E;
  k += me.head * length * E;
  v += me.head * length * M;
  beta += me.head * length;
  out += me.head * length * M;
  delta += me.head * length * M;

  ColumnSlice W;
  W.load(W0 + me.head * E * M, M, 1, me.col, me.owns_column, E, me.lane, layout.lanes);
  for (int first = 0; first < length; first += layout.chunk) {
    const int steps = min(layout.chunk, length - first);
    __syncthreads();  // the previous chunk has been consumed
    stage_steps(k_steps, k, length, false, first, steps, E, 0, layout.padded_rows);
    stage_steps(q_steps, q, length, false, first, steps, E, 0, layout.padded_rows);
    stage_steps(v_steps, v, length, false, first, steps, M, me.first_col, layout.columns);
    stage_steps(beta_steps, beta, length, false, first, steps, 1, 0, 1);
    __syncthreads();
    for (int step = 0; step < steps; ++step) {
      const float* k_t = k_steps + step * layout.padded_rows;
      const float* q_t = q_steps + step * layout.padded_rows;
      const float v_old = W.dot(k_t, me.lane, layout.lanes);
      const float delta_tc = v_steps[step * layout.columns + me.local_col] - v_old;
      W.add_scaled(k_t, beta_steps[step] * delta_tc, me.lane, layout.lanes);
      const float out_tc = W.dot(q_t, me.lane, layout.lanes);
      if (me.owns_column && me.lane == 0) {
        const int64_t at = static_cast<int64_t>(first + step) * M + me.col;
        out[at] = out_tc;
        delta[at] = delta_tc;
      }
    }
  }
}

// du_t = G^T k_t, scanning G (E x M) backward from 0, one column per group. Writes du (heads, L, M).
__global__ void __launch_bounds__(kThreadsPerBlock)
delta_column_backward_kernel(const float* __restrict__ q, const float* __restrict__ k,
                             const float* __restrict__ beta, const float* __restrict__ grad_out,
                             float* __restrict__ du, int length, int E, int M, ScanLayout layout) {
  extern __shared__ float staged[];
  float* k_steps = staged;                                        // [chunk][padded_rows]
  float* q_steps = k_steps + layout.chunk * layout.padded_rows;     // [chunk][padded_rows]
  float* grad_steps = q_steps + layout.chunk * layout.padded_rows;  // [chunk][columns]
  float* beta_steps = grad_steps + layout.chunk * layout.columns;   // [chunk]

  const ScanThread me = scan_thread(layout, M);
  q += me.head * length * E;
  k += me.head * length * E;
  beta += me.head * length;
  grad_out += me.head * length * M;
  du += me.head * length * M;

  ColumnSlice G;
  G.load(nullptr, 0, 0, me.col, me.owns_column, E, me.lane, layout.lanes);
  for (int first = 0; first < length; first += layout.chunk) {
    const int steps = min(layout.chunk, length - first);
    __syncthreads();  // the previous chunk has been consumed
    stage_steps(k_steps, k, length, true, first, steps, E, 0, layout.padded_rows);
    stage_steps(q_steps, q, length, true, first, steps, E, 0, layout.padded_rows);
    stage_steps(grad_steps, grad_out, length, true, first, steps, M, me.first_col, layout.columns);
    stage_steps(beta_steps, beta, length, true, first, steps, 1, 0, 1);
    __syncthreads();
    for (int step = 0; step < steps; ++step) {
      const float* k_t = k_steps + step * layout.padded_rows;
      G.add_scaled(q_steps + step * layout.padded_rows, grad_steps[step * layout.columns + me.local_col], me.lane,
                   layout.lanes);
      const float du_tc = G.dot(k_t, me.lane, layout.lanes);
      G.add_scaled(k_t, -beta_steps[step] * du_tc, me.lane, layout.lanes);
      if (me.owns_column && me.lane == 0) du[static_cast<int64_t>(time_of(first + step, length, true)) * M + me.col] = du_tc;
    }
  }
}

// dq and dk, one row e of W and of G per group (as columns of W^T and G^T, M x E). A forward scan of W^T from W0^T
// writes dq and the W term of dk; a backward scan of G^T from 0 adds the G term. du, u, grad_out: (heads, L, M);
// q, k, dq, dk: (heads, L, E).
__global__ void __launch_bounds__(kThreadsPerBlock)
delta_row_backward_kernel(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ beta,
                          const float* __restrict__ W0, const float* __restrict__ grad_out,
                          const float* __restrict__ u, const float* __restrict__ du, float* __restrict__ dq,
                          float* __restrict__ dk, int length, int E, int M, ScanLayout layout) {
  extern __shared__ float staged[];
  float* grad_steps = staged;                                       // [chunk][padded_rows]
  float* u_steps = grad_steps + layout.chunk * layout.padded_rows;  // [chunk][padded_rows]
  float* du_steps = u_steps + layout.chunk * layout.padded_rows;    // [chunk][padded_rows]
  float* q_steps = du_steps + layout.chunk * layout.padded_rows;    // [chunk][columns]
  float* k_steps = q_steps + layout.chunk * layout.columns;         // [chunk][columns]
  float* beta_steps = k_steps + layout.chunk * layout.columns;      // [chunk]

  const ScanThread me = scan_thread(layout, E);
  q += me.head * length * E;
  k += me.head * length * E;
  dq += me.head * length * E;
  dk += me.head * length * E;
  beta += me.head * length;
  grad_out += me.head * length * M;
  u += me.head * length * M;
  du += me.head * length * M;

  for (int pass = 0; pass < 2; ++pass) {
    const bool reverse = pass == 1;
    // Forward: the columns of W^T, i.e. rows of W, from W0. Backward: the columns of G^T from 0.
    ColumnSlice X;
    X.load(reverse ? nullptr : W0 + me.head * E * M, 1, M, me.col, me.owns_column, M, me.lane, layout.lanes);
    for (int first = 0; first < length; first += layout.chunk) {
      const int steps = min(layout.chunk, length - first);
      __syncthreads();  // the previous chunk has been consumed
      stage_steps(grad_steps, grad_out, length, reverse, first, steps, M, 0, layout.padded_rows);
      stage_steps(u_steps, u, length, reverse, first, steps, M, 0, layout.padded_rows);
      stage_steps(du_steps, du, length, reverse, first, steps, M, 0, layout.padded_rows);
      stage_steps(q_steps, q, length, reverse, first, steps, E, me.first_col, layout.columns);
      stage_steps(k_steps, k, length, reverse, first, steps, E, me.first_col, layout.columns);
      stage_steps(beta_steps, beta, length, reverse, first, steps, 1, 0, 1);
      __syncthreads();
      for (int step = 0; step < steps; ++step) {
        const float* grad_t = grad_steps + step * layout.padded_rows;
        const float* u_t = u_steps + step * layout.padded_rows;
        const float* du_t = du_steps + step * layout.padded_rows;
        const float q_tc = q_steps[step * layout.columns + me.local_col];
        const float k_tc = k_steps[step * layout.columns + me.local_col];
        const float beta_t = beta_steps[step];
        const int64_t at = static_cast<int64_t>(time_of(first + step, length, reverse)) * E + me.col;
        if (!reverse) {
          const float dk_from_W = -beta_t * X.dot(du_t, me.lane, layout.lanes);  // X = W_{t-1}^T
          X.add_scaled(u_t, k_tc, me.lane, layout.lanes);
          const float dq_tc = X.dot(grad_t, me.lane, layout.lanes);  // X = W_t^T
          if (me.owns_column && me.lane == 0) {
            dq[at] = dq_tc;
            dk[at] = dk_from_W;
          }
        } else {
          X.add_scaled(grad_t, q_tc, me.lane, layout.lanes);  // X = G_t^T, the full gradient of W_t
          const float dk_from_G = X.dot(u_t, me.lane, layout.lanes);
          X.add_scaled(du_t, -beta_t * k_tc, me.lane, layout.lanes);
          // The same thread wrote dk[at] in the forward scan.
          if (me.owns_column && me.lane == 0) dk[at] += dk_from_G;
        }
      }
    }
  }
}

void launch_config(const ScanLayout& layout, int64_t heads, dim3* grid, dim3* block, size_t* shared_bytes) {
  *grid = dim3(heads, layout.blocks_per_head);
  *block = dim3(layout.lanes * layout.columns);
  *shared_bytes = sizeof(float) * layout.staged_floats;
}

// Empty when the kernels handle these inputs, else why not.
std::string unsupported_reason(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                               const at::Tensor& W0) {
  const std::string problem = float32_cuda_problem({q, k, v, beta, W0});
  if (!problem.empty()) return problem;
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), E = q.size(3), M = v.size(3);
  if (k.sizes() != q.sizes() || v.sizes() != at::IntArrayRef({B, H, L, M}) ||
      beta.sizes() != at::IntArrayRef({B, H, L, 1}) || W0.sizes() != at::IntArrayRef({B, H, E, M}))
    return "shapes must be q, k (B, H, L, E), v (B, H, L, M), beta (B, H, L, 1), W0 (B, H, E, M)";
  if (E < 1 || E > kMaxSize || M < 1 || M > kMaxSize)
    return "E and M must be between 1 and " + std::to_string(kMaxSize);
  return "";
}

bool supports(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
              const at::Tensor& W0) {
  return unsupported_reason(q, k, v, beta, W0).empty();
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                  const at::Tensor& W0) {
  const std::string reason = unsupported_reason(q, k, v, beta, W0);
  TORCH_CHECK(reason.empty(), "delta_net CUDA kernel: ", reason);
  for (const at::Tensor* t : {&q, &k, &v, &beta, &W0}) TORCH_CHECK(t->is_contiguous(), "inputs must be contiguous");
}

// Returns [out, delta] with delta = v - v_old, which the backward needs.
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                                const at::Tensor& W0) {
  check_inputs(q, k, v, beta, W0);
  const c10::cuda::OptionalCUDAGuard device_guard(q.device());
  at::Tensor out = at::empty_like(v);
  at::Tensor delta = at::empty_like(v);
  const int64_t heads = q.size(0) * q.size(1);
  const int length = q.size(2), E = q.size(3), M = v.size(3);
  if (heads == 0 || length == 0) return {out, delta};
  const ScanLayout layout = scan_layout(E, M, /*row_vectors=*/2, /*column_vectors=*/1);
  dim3 grid, block;
  size_t shared_bytes;
  launch_config(layout, heads, &grid, &block, &shared_bytes);
  delta_forward_kernel<<<grid, block, shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
      q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), beta.data_ptr<float>(), W0.data_ptr<float>(),
      out.data_ptr<float>(), delta.data_ptr<float>(), length, E, M, layout);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, delta};
}

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& beta, const at::Tensor& W0,
                                 const std::vector<at::Tensor>& saved) {
  check_inputs(q, k, v, beta, W0);
  TORCH_CHECK(grad_out.sizes() == v.sizes() && grad_out.is_contiguous() && grad_out.scalar_type() == at::kFloat,
              "grad_out must be a contiguous float32 tensor shaped like v");
  TORCH_CHECK(saved.size() == 1 && saved[0].sizes() == v.sizes() && saved[0].is_contiguous(),
              "saved must be [delta] from forward");
  const c10::cuda::OptionalCUDAGuard device_guard(q.device());
  const at::Tensor& delta = saved[0];
  at::Tensor du = at::empty_like(v);
  at::Tensor dq = at::empty_like(q);
  at::Tensor dk = at::empty_like(k);
  const int64_t heads = q.size(0) * q.size(1);
  const int length = q.size(2), E = q.size(3), M = v.size(3);
  if (heads == 0 || length == 0) return {dq, dk, at::zeros_like(v), at::zeros_like(beta)};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dim3 grid, block;
  size_t shared_bytes;

  const ScanLayout column_layout = scan_layout(E, M, /*row_vectors=*/2, /*column_vectors=*/1);
  launch_config(column_layout, heads, &grid, &block, &shared_bytes);
  delta_column_backward_kernel<<<grid, block, shared_bytes, stream>>>(
      q.data_ptr<float>(), k.data_ptr<float>(), beta.data_ptr<float>(), grad_out.data_ptr<float>(),
      du.data_ptr<float>(), length, E, M, column_layout);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const at::Tensor u = (beta * delta).contiguous();
  const ScanLayout row_layout = scan_layout(M, E, /*row_vectors=*/3, /*column_vectors=*/2);
  launch_config(row_layout, heads, &grid, &block, &shared_bytes);
  delta_row_backward_kernel<<<grid, block, shared_bytes, stream>>>(
      q.data_ptr<float>(), k.data_ptr<float>(), beta.data_ptr<float>(), W0.data_ptr<float>(),
      grad_out.data_ptr<float>(), u.data_ptr<float>(), du.data_ptr<float>(), dq.data_ptr<float>(),
      dk.data_ptr<float>(), length, E, M, row_layout);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor dv = beta * du;
  at::Tensor dbeta = (du * delta).sum(-1, /*keepdim=*/true);
  return {dq, dk, dv, dbeta};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "delta_net (delta rule): float32 CUDA kernels";
  m.def("forward", &forward, "forward(q, k, v, beta, W0) -> [out, delta]");
  m.def("backward", &backward, "backward(grad_out, q, k, v, beta, W0, saved) -> [dq, dk, dv, dbeta]");
  m.def("supports", &supports, "supports(q, k, v, beta, W0) -> whether these kernels handle the inputs");
}
