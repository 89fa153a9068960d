// CUDA kernels of self_ref_v0 (the modern self-referential weight matrix, SRWM): forward and backward, float32.
//
//   y_t = x_t @ W_y;  q_t = softmax(x_t @ W_q);  k_t = softmax(x_t @ W_k);  b_t = sigmoid(x_t @ w_b)  (4 gates)
//   for (W, i) in ((W_y, 0), (W_q, 1), (W_k, 2), (w_b, 3)):  W += outer(k_t, b_t[i] * (q_t @ W - k_t @ W))
//   out_t = y_t
//
// Design. Every step reads all of the matrices, so one block owns one (batch, head) and walks the sequence with
// W_y, W_q, W_k (D x D) and w_b (D x 4) in shared memory. Matrices are read by groups of kLanes threads in two
// layouts: a group per column (lane g walks rows g, g + kLanes, ...: for x @ W) or a group per row (for W @ x); dot
// products are shuffle reductions inside the group. Rows of the D x D matrices are padded to a multiple of 32
// floats and column indices XOR-swizzled per row (`swizzled`), so neither layout has shared-memory bank conflicts.
// Column c of w_b belongs to the group of column c < 4. A forward step is three phases and two barriers: read-outs
// (column layout), the two softmaxes (one warp each) and gates, then the four delta updates (column layout; each
// thread only touches its own entries, so the next step's read-out needs no barrier before it).
//
// Backward. The forward saves, per step, q_t, k_t, b_t and delta_i = q_t @ W_i - k_t @ W_i (old W_i), and all four
// matrices at the end of every kCheckpointEvery steps. The backward walks the chunks from the last: it reloads the
// chunk's final matrices from the checkpoint (bit-identical to the forward's) and undoes the rank-one updates with
// the saved vectors, W_{t-1} = W_t - k_t u_t^T with u_t = b_t[i] delta_i. Reversal errors never feed back into a
// vector (all are saved) and restart from exact matrices every kCheckpointEvery steps, so they stay at a few float32
// roundings of |W| (about 1e-6 relative) for any sequence length. Per step, with G_i the gradient of W_i after step t:
//   du_i = G_i^T k_t (column layout)
//   dk += G_i u_i;  W_i -> W_i,{t-1};  r_i = W_i,{t-1} du_i;  dq += b_i r_i;  dk -= b_i r_i;  db_i = du_i . delta_i;
//   G_i += (q_t - k_t)(b_i du_i)^T (row layout)
//   softmax / sigmoid backward; dx_t = W_y dy + W_q dq_logits + W_k dk_logits + w_b db_logits;
//   G_y += x_t dy^T, G_q += x_t dq_logits^T, ... (row layout)
// and once step 0 is done, G_i is the gradient of the initial W_i (per batch element, like the inputs).
//
// Supported: float32 tensors on a CUDA device, 4 <= D <= kMaxHeadSize (96), and only while the backward's shared
// memory (six D x roundup(D, 32) matrices and some vectors; 102 KB for D = 64) fits the device's per-block limit:
// D <= 39 with 64 KB (sm_75), D <= 59-61 with 96-99 KB (V100, sm_86/89), D <= 69 on A100, D <= 96 on H100 / H200.
// `supports` says false for anything else (float64, half, bfloat16, larger heads): the dispatcher then runs the
// PyTorch reference on the GPU.
#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <string>
#include <vector>

#include "../rec_update_fwm_tanh/shared_matrix_cuda.cuh"

namespace {

using namespace fwp;

constexpr int kSquare = 3;  // W_y, W_q, W_k; w_b (D x kGates) is kept apart
constexpr int kGates = 4;

// Per-step inputs of the backward: x, q, k, delta_y, delta_q, delta_k, grad_out (D each), delta_b, gates (4 each).
__host__ __device__ int step_floats(int D) { return 7 * D + 2 * kGates; }

size_t forward_shared_bytes(int D) {
  return sizeof(float) * (kSquare * D * padded_stride(D) + kGates * D + 6 * D + 2 * kGates);
}
size_t backward_shared_bytes(int D) {
  return sizeof(float) * (2 * (kSquare * D * padded_stride(D) + kGates * D) + 2 * step_floats(D) + 5 * D + kGates);
}

// The three D x D matrices (swizzled, one after another) and w_b (row-major D x kGates), in shared memory.
struct Matrices {
  float* square;  // [kSquare][D * stride]
  float* gates;   // [D * kGates]
};

__device__ Matrices carve_matrices(float* shared, int D, int stride) {
  return {shared, shared + kSquare * D * stride};
}

__device__ int matrices_floats(int D, int stride) { return kSquare * D * stride + kGates * D; }

// The inverse of load_matrix: swizzled shared memory back to a row-major D x D matrix in global memory.
__device__ void store_matrix(float* __restrict__ dst, const float* src, int D, int stride) {
  for (int i = threadIdx.x; i < D * D; i += blockDim.x) dst[i] = src[swizzled(i / D, i % D, stride)];
}

struct SrwmInputs {
  const float* x;                 // (B, H, L, D)
  const float* square[kSquare];   // W_y, W_q, W_k: (B, H, D, D)
  const float* gates;             // w_b: (B, H, D, 4)
};

// What the forward leaves for the backward.
struct SrwmSaved {
  float* q;                    // (B, H, L, D)
  float* k;                    // (B, H, L, D)
  float* delta;                // (B, H, L, 3, D): q_t @ W_i - k_t @ W_i for W_y, W_q, W_k
  float* delta_gates;          // (B, H, L, 4): the same for w_b
  float* gates;                // (B, H, L, 4): b_t
  float* square_checkpoints;   // (B, H, checkpoint_count(L), 3, D, D): after steps kCheckpointEvery - 1, ..., L - 1
  float* gates_checkpoints;    // (B, H, checkpoint_count(L), D, 4)
};

struct SrwmGrads {
  float* dx;                    // (B, H, L, D)
  float* dsquare[kSquare];      // (B, H, D, D)
  float* dgates;                // (B, H, D, 4)
};

// Grid: B * H blocks; block: threads_for(D) threads; dynamic shared memory: forward_shared_bytes(D).
__global__ void __launch_bounds__(kMaxThreads, 1)
srwm_forward_kernel(SrwmInputs in, SrwmSaved saved, float* __restrict__ out, int length, int D) {
  extern __shared__ float shared[];
  const int stride = padded_stride(D);
  const Matrices W = carve_matrices(shared, D, stride);
  float* x_buffers = shared + matrices_floats(D, stride);  // [2][D]: x_t and x_{t+1}
  float* q_logits = x_buffers + 2 * D;
  float* k_logits = q_logits + D;
  float* q = k_logits + D;
  float* k = q + D;
  float* gate_logits = k + D;         // [kGates]
  float* gates = gate_logits + kGates;  // [kGates]

  const int64_t bh = blockIdx.x;
  const int64_t matrix = static_cast<int64_t>(D) * D;
  const int64_t sequence = static_cast<int64_t>(length) * D;
  const int lane = threadIdx.x % kLanes;
  const int col = threadIdx.x / kLanes;  // the column this group owns
  const bool owns_column = col < D;
  const bool owns_gate_column = col < kGates;

#pragma unroll
  for (int i = 0; i < kSquare; ++i) load_matrix(W.square + i * D * stride, in.square[i] + bh * matrix, D, stride);
  for (int i = threadIdx.x; i < D * kGates; i += blockDim.x) W.gates[i] = in.gates[bh * D * kGates + i];
  const float* x = in.x + bh * sequence;
  for (int i = threadIdx.x; i < D; i += blockDim.x) x_buffers[i] = x[i];
  out += bh * sequence;
  float* saved_q = saved.q + bh * sequence;
  float* saved_k = saved.k + bh * sequence;
  float* saved_delta = saved.delta + bh * kSquare * sequence;
  float* saved_delta_gates = saved.delta_gates + bh * length * kGates;
  float* saved_gates = saved.gates + bh * length * kGates;
  float* square_checkpoints = saved.square_checkpoints + bh * checkpoint_count(length) * kSquare * matrix;
  float* gates_checkpoints = saved.gates_checkpoints + bh * checkpoint_count(length) * D * kGates;
  __syncthreads();

  for (int t = 0; t < length; ++t) {
    // Read-outs with the weights before this step's update.
    const float* x_t = x_buffers + (t & 1) * D;
    float read_part[kSquare] = {0.f, 0.f, 0.f};
    float gate_part = 0.f;
    if (owns_column)
      for (int row = lane; row < D; row += kLanes) {
        const float x_r = x_t[row];
        const int at = swizzled(row, col, stride);
#pragma unroll
        for (int i = 0; i < kSquare; ++i) read_part[i] = fmaf(x_r, W.square[i * D * stride + at], read_part[i]);
        if (owns_gate_column) gate_part = fmaf(x_r, W.gates[row * kGates + col], gate_part);
      }
    const float y_c = group_sum(read_part[0]);
    const float q_logit = group_sum(read_part[1]);
    const float k_logit = group_sum(read_part[2]);
    const float gate_logit = group_sum(gate_part);
    if (owns_column && lane == 0) {
      out[t * D + col] = y_c;
      q_logits[col] = q_logit;
      k_logits[col] = k_logit;
      if (owns_gate_column) gate_logits[col] = gate_logit;
    }
    if (t + 1 < length)  // x_{t+1} into the buffer nobody reads in this step
      for (int i = threadIdx.x; i < D; i += blockDim.x) x_buffers[((t + 1) & 1) * D + i] = x[(t + 1) * D + i];
    __syncthreads();

    const int warp = threadIdx.x / kWarpSize;
    for (int which = warp; which < 2; which += blockDim.x / kWarpSize) {
      if (which == 0) warp_softmax(q_logits, q, saved_q + t * D, D);
      else warp_softmax(k_logits, k, saved_k + t * D, D);
    }
    if (threadIdx.x < kGates) {
      const float gate = sigmoid(gate_logits[threadIdx.x]);
      gates[threadIdx.x] = gate;
      saved_gates[t * kGates + threadIdx.x] = gate;
    }
    __syncthreads();

    // The four delta updates; each thread only touches its own entries.
#pragma unroll
    for (int i = 0; i < kSquare; ++i) {
      float* W_i = W.square + i * D * stride;
      float q_part = 0.f, k_part = 0.f;
      if (owns_column)
        for (int row = lane; row < D; row += kLanes) {
          const float w = W_i[swizzled(row, col, stride)];
          q_part = fmaf(q[row], w, q_part);
          k_part = fmaf(k[row], w, k_part);
        }
      const float delta_c = group_sum(q_part) - group_sum(k_part);
      const float u_c = gates[i] * delta_c;
      if (owns_column) {
        for (int row = lane; row < D; row += kLanes) {
          const int at = swizzled(row, col, stride);
          W_i[at] = fmaf(k[row], u_c, W_i[at]);
        }
        if (lane == 0) saved_delta[(t * kSquare + i) * D + col] = delta_c;
      }
    }
    {
      float q_part = 0.f, k_part = 0.f;
      if (owns_gate_column)
        for (int row = lane; row < D; row += kLanes) {
          const float w = W.gates[row * kGates + col];
          q_part = fmaf(q[row], w, q_part);
          k_part = fmaf(k[row], w, k_part);
        }
      const float delta_c = group_sum(q_part) - group_sum(k_part);
      const float u_c = gates[kGates - 1] * delta_c;
      if (owns_gate_column) {
        for (int row = lane; row < D; row += kLanes) W.gates[row * kGates + col] = fmaf(k[row], u_c, W.gates[row * kGates + col]);
        if (lane == 0) saved_delta_gates[t * kGates + col] = delta_c;
      }
    }
    if ((t + 1) % kCheckpointEvery == 0 || t == length - 1) {
      const int64_t n = t / kCheckpointEvery;
      if (owns_column)
        for (int row = lane; row < D; row += kLanes)
          for (int i = 0; i < kSquare; ++i)
            square_checkpoints[(n * kSquare + i) * matrix + row * D + col] =
                W.square[i * D * stride + swizzled(row, col, stride)];
      if (owns_gate_column)
        for (int row = lane; row < D; row += kLanes)
          gates_checkpoints[(n * D + row) * kGates + col] = W.gates[row * kGates + col];
    }
  }
}

// Stages the backward's inputs of step t (layout: see step_floats) into dst.
__device__ void load_step_vectors(float* dst, const float* x, const SrwmSaved& saved, const float* grad_out,
                                  int64_t bh, int t, int length, int D) {
  const int64_t at = (bh * length + t) * D;
  const int64_t at_gates = (bh * length + t) * kGates;
  for (int i = threadIdx.x; i < step_floats(D); i += blockDim.x) {
    float value;
    if (i < D) value = x[at + i];
    else if (i < 2 * D) value = saved.q[at + i - D];
    else if (i < 3 * D) value = saved.k[at + i - 2 * D];
    else if (i < 6 * D) value = saved.delta[at * kSquare + i - 3 * D];
    else if (i < 7 * D) value = grad_out[at + i - 6 * D];
    else if (i < 7 * D + kGates) value = saved.delta_gates[at_gates + i - 7 * D];
    else value = saved.gates[at_gates + i - 7 * D - kGates];
    dst[i] = value;
  }
}

// Grid: B * H blocks; block: threads_for(D) threads; dynamic shared memory: backward_shared_bytes(D).
__global__ void __launch_bounds__(kMaxThreads, 1)
srwm_backward_kernel(SrwmInputs in, SrwmSaved saved, const float* __restrict__ grad_out, SrwmGrads grads,
                     int length, int D) {
  extern __shared__ float shared[];
  const int stride = padded_stride(D);
  const Matrices W = carve_matrices(shared, D, stride);
  const Matrices G = carve_matrices(shared + matrices_floats(D, stride), D, stride);  // gradients of W after step t
  float* step_buffers = shared + 2 * matrices_floats(D, stride);  // [2][step_floats(D)]
  float* dq = step_buffers + 2 * step_floats(D);
  float* dk = dq + D;
  float* du = dk + D;               // [kSquare][D]
  float* du_gates = du + kSquare * D;  // [kGates]

  const int64_t bh = blockIdx.x;
  const int64_t matrix = static_cast<int64_t>(D) * D;
  const int lane = threadIdx.x % kLanes;
  const int group = threadIdx.x / kLanes;  // a column in the column layout, a row in the row layout
  const bool owns_group = group < D;

  for (int i = threadIdx.x; i < matrices_floats(D, stride); i += blockDim.x) G.square[i] = 0.f;  // G.gates follows
  if (length > 0) load_step_vectors(step_buffers + ((length - 1) & 1) * step_floats(D), in.x, saved, grad_out, bh,
                                    length - 1, length, D);
  float* dx = grads.dx + bh * static_cast<int64_t>(length) * D;

  for (int chunk = checkpoint_count(length) - 1; chunk >= 0; --chunk) {
    __syncthreads();  // the previous step is complete
    const int64_t n = bh * checkpoint_count(length) + chunk;
    for (int i = 0; i < kSquare; ++i)
      load_matrix(W.square + i * D * stride, saved.square_checkpoints + (n * kSquare + i) * matrix, D, stride);
    for (int i = threadIdx.x; i < D * kGates; i += blockDim.x) W.gates[i] = saved.gates_checkpoints[n * D * kGates + i];
    __syncthreads();
    const int last = min(length, (chunk + 1) * kCheckpointEvery) - 1;
    for (int t = last; t >= chunk * kCheckpointEvery; --t) {
      const float* x_t = step_buffers + (t & 1) * step_floats(D);
      const float* q_t = x_t + D;
      const float* k_t = q_t + D;
      const float* delta_t = k_t + D;  // [kSquare][D]
      const float* grad_t = delta_t + kSquare * D;
      const float* delta_gates_t = grad_t + D;
      const float* gates_t = delta_gates_t + kGates;

      // Column layout: du_i = G_i^T k_t.
      {
        const int col = group;
#pragma unroll
        for (int i = 0; i < kSquare; ++i) {
          float part = 0.f;
          if (owns_group)
            for (int row = lane; row < D; row += kLanes)
              part = fmaf(G.square[i * D * stride + swizzled(row, col, stride)], k_t[row], part);
          const float du_c = group_sum(part);
          if (owns_group && lane == 0) du[i * D + col] = du_c;
        }
        float part = 0.f;
        if (col < kGates)
          for (int row = lane; row < D; row += kLanes) part = fmaf(G.gates[row * kGates + col], k_t[row], part);
        const float du_c = group_sum(part);
        if (col < kGates && lane == 0) du_gates[col] = du_c;
      }
      __syncthreads();

      // Row layout: undo the updates and push the gradient through them (see the design note).
      float gate_logit_grads[kGates];
      {
        const int row = group;
        const float q_r = owns_group ? q_t[row] : 0.f;
        const float k_r = owns_group ? k_t[row] : 0.f;
        float dk_part = 0.f;
        float read_part[kGates] = {0.f, 0.f, 0.f, 0.f};   // (W_i,{t-1} du_i)[row]
        float gate_part[kGates] = {0.f, 0.f, 0.f, 0.f};   // du_i . delta_i
#pragma unroll
        for (int i = 0; i < kGates; ++i) {
          const bool square = i < kSquare;
          float* W_i = square ? W.square + i * D * stride : W.gates;
          float* G_i = square ? G.square + i * D * stride : G.gates;
          const float* du_i = square ? du + i * D : du_gates;
          const float* delta_i = square ? delta_t + i * D : delta_gates_t;
          const int width = square ? D : kGates;
          const float b_i = gates_t[i];
          for (int col = lane; col < width; col += kLanes) {
            const float du_c = du_i[col];
            const float u_c = b_i * delta_i[col];
            gate_part[i] = fmaf(du_c, delta_i[col], gate_part[i]);
            if (owns_group) {
              const int at = square ? swizzled(row, col, stride) : row * kGates + col;
              const float g = G_i[at];
              dk_part = fmaf(g, u_c, dk_part);
              const float w_previous = fmaf(-k_r, u_c, W_i[at]);
              W_i[at] = w_previous;
              read_part[i] = fmaf(w_previous, du_c, read_part[i]);
              G_i[at] = fmaf(q_r - k_r, b_i * du_c, g);
            }
          }
        }
        float dq_r = 0.f, dk_r = group_sum(dk_part);
#pragma unroll
        for (int i = 0; i < kGates; ++i) {
          const float b_i = gates_t[i];
          const float read_i = group_sum(read_part[i]);
          dq_r = fmaf(b_i, read_i, dq_r);
          dk_r = fmaf(-b_i, read_i, dk_r);
          gate_logit_grads[i] = group_sum(gate_part[i]) * b_i * (1.f - b_i);
        }
        if (owns_group && lane == 0) {
          dq[row] = dq_r;
          dk[row] = dk_r;
        }
      }
      __syncthreads();

      // Row layout: softmax backward, dx_t, and the read-outs' share of G.
      {
        const int row = group;
        float q_dot_part = 0.f, k_dot_part = 0.f;
        for (int col = lane; col < D; col += kLanes) {
          q_dot_part = fmaf(q_t[col], dq[col], q_dot_part);
          k_dot_part = fmaf(k_t[col], dk[col], k_dot_part);
        }
        const float q_dot = group_sum(q_dot_part);
        const float k_dot = group_sum(k_dot_part);
        float dx_part = 0.f;
        if (owns_group) {
          const float x_r = x_t[row];
          for (int col = lane; col < D; col += kLanes) {
            const float logit_grads[kSquare] = {grad_t[col], q_t[col] * (dq[col] - q_dot), k_t[col] * (dk[col] - k_dot)};
            const int at = swizzled(row, col, stride);
#pragma unroll
            for (int i = 0; i < kSquare; ++i) {
              dx_part = fmaf(W.square[i * D * stride + at], logit_grads[i], dx_part);
              G.square[i * D * stride + at] = fmaf(x_r, logit_grads[i], G.square[i * D * stride + at]);
            }
          }
#pragma unroll
          for (int i = 0; i < kGates; ++i)
            if (lane == i) {
              dx_part = fmaf(W.gates[row * kGates + i], gate_logit_grads[i], dx_part);
              G.gates[row * kGates + i] = fmaf(x_r, gate_logit_grads[i], G.gates[row * kGates + i]);
            }
        }
        const float dx_r = group_sum(dx_part);
        if (owns_group && lane == 0) dx[t * D + row] = dx_r;
      }
      if (t > 0) load_step_vectors(step_buffers + ((t - 1) & 1) * step_floats(D), in.x, saved, grad_out, bh, t - 1,
                                   length, D);
      __syncthreads();
    }
  }

  // G now holds the gradients of the initial matrices.
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kSquare; ++i) store_matrix(grads.dsquare[i] + bh * matrix, G.square + i * D * stride, D, stride);
  for (int i = threadIdx.x; i < D * kGates; i += blockDim.x) grads.dgates[bh * D * kGates + i] = G.gates[i];
}

// Empty when the kernels handle these inputs, else why not.
std::string unsupported_reason(const std::vector<at::Tensor>& inputs) {
  const std::string problem = float32_cuda_problem(inputs);
  if (!problem.empty()) return problem;
  const at::Tensor& x = inputs[0];
  const int64_t B = x.size(0), H = x.size(1), D = x.size(3);
  const std::vector<int64_t> square = {B, H, D, D}, gates = {B, H, D, kGates};
  for (int i = 1; i <= kSquare; ++i)
    if (inputs[i].sizes() != at::IntArrayRef(square)) return "W_y, W_q, W_k must be (B, H, D, D)";
  if (inputs[4].sizes() != at::IntArrayRef(gates)) return "w_b must be (B, H, D, 4)";
  if (D < kGates || D > kMaxHeadSize) return "D must be between 4 and " + std::to_string(kMaxHeadSize);
  if (backward_shared_bytes(D) > static_cast<size_t>(max_shared_bytes(x.device())))
    return "D = " + std::to_string(D) + " needs more shared memory than this GPU has per block";
  return "";
}

void check_inputs(const std::vector<at::Tensor>& inputs) {
  const std::string reason = unsupported_reason(inputs);
  TORCH_CHECK(reason.empty(), "self_ref_v0 CUDA kernel: ", reason);
  for (const at::Tensor& t : inputs) TORCH_CHECK(t.is_contiguous(), "inputs must be contiguous");
}

SrwmInputs pointers(const at::Tensor& x, const at::Tensor& W_y, const at::Tensor& W_q, const at::Tensor& W_k,
                    const at::Tensor& w_b) {
  return {x.data_ptr<float>(), {W_y.data_ptr<float>(), W_q.data_ptr<float>(), W_k.data_ptr<float>()},
          w_b.data_ptr<float>()};
}

bool supports(const at::Tensor& x, const at::Tensor& W_y, const at::Tensor& W_q, const at::Tensor& W_k,
              const at::Tensor& w_b) {
  return unsupported_reason({x, W_y, W_q, W_k, w_b}).empty();
}

// Returns [out, q, k, delta, delta_gates, gates, square_checkpoints, gates_checkpoints]; see SrwmSaved.
std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& W_y, const at::Tensor& W_q,
                                const at::Tensor& W_k, const at::Tensor& w_b) {
  check_inputs({x, W_y, W_q, W_k, w_b});
  const c10::cuda::OptionalCUDAGuard device_guard(x.device());
  const int64_t B = x.size(0), H = x.size(1);
  const int L = x.size(2), D = x.size(3);
  const auto options = x.options();
  at::Tensor out = at::empty_like(x), q = at::empty_like(x), k = at::empty_like(x);
  at::Tensor delta = at::empty({B, H, L, kSquare, D}, options);
  at::Tensor delta_gates = at::empty({B, H, L, kGates}, options), gates = at::empty({B, H, L, kGates}, options);
  at::Tensor square_checkpoints = at::empty({B, H, checkpoint_count(L), kSquare, D, D}, options);
  at::Tensor gates_checkpoints = at::empty({B, H, checkpoint_count(L), D, kGates}, options);
  if (B * H > 0 && L > 0) {
    const size_t shared_bytes = forward_shared_bytes(D);
    C10_CUDA_CHECK(cudaFuncSetAttribute(srwm_forward_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(shared_bytes)));
    const SrwmSaved saved{q.data_ptr<float>(), k.data_ptr<float>(), delta.data_ptr<float>(),
                          delta_gates.data_ptr<float>(), gates.data_ptr<float>(), square_checkpoints.data_ptr<float>(),
                          gates_checkpoints.data_ptr<float>()};
    srwm_forward_kernel<<<dim3(B * H), dim3(threads_for(D)), shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
        pointers(x, W_y, W_q, W_k, w_b), saved, out.data_ptr<float>(), L, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out, q, k, delta, delta_gates, gates, square_checkpoints, gates_checkpoints};
}

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& W_y,
                                 const at::Tensor& W_q, const at::Tensor& W_k, const at::Tensor& w_b,
                                 const std::vector<at::Tensor>& saved) {
  check_inputs({x, W_y, W_q, W_k, w_b});
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.is_contiguous() && grad_out.scalar_type() == at::kFloat,
              "grad_out must be a contiguous float32 tensor shaped like x");
  TORCH_CHECK(saved.size() == 7, "saved must be the 7 tensors forward returned after out");
  for (const at::Tensor& t : saved) TORCH_CHECK(t.is_contiguous() && t.scalar_type() == at::kFloat, "bad saved tensor");
  const c10::cuda::OptionalCUDAGuard device_guard(x.device());
  const int64_t B = x.size(0), H = x.size(1);
  const int L = x.size(2), D = x.size(3);
  at::Tensor dx = at::empty_like(x);
  at::Tensor dW_y = at::empty_like(W_y), dW_q = at::empty_like(W_q), dW_k = at::empty_like(W_k);
  at::Tensor dw_b = at::empty_like(w_b);
  if (B * H == 0) return {dx, dW_y, dW_q, dW_k, dw_b};
  const size_t shared_bytes = backward_shared_bytes(D);
  C10_CUDA_CHECK(cudaFuncSetAttribute(srwm_backward_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(shared_bytes)));
  const SrwmSaved saved_pointers{saved[0].data_ptr<float>(), saved[1].data_ptr<float>(), saved[2].data_ptr<float>(),
                                 saved[3].data_ptr<float>(), saved[4].data_ptr<float>(), saved[5].data_ptr<float>(),
                                 saved[6].data_ptr<float>()};
  const SrwmGrads grads{dx.data_ptr<float>(), {dW_y.data_ptr<float>(), dW_q.data_ptr<float>(), dW_k.data_ptr<float>()},
                        dw_b.data_ptr<float>()};
  // Launched for L = 0 too: the kernel then writes zero gradients for the matrices.
  srwm_backward_kernel<<<dim3(B * H), dim3(threads_for(D)), shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
      pointers(x, W_y, W_q, W_k, w_b), saved_pointers, grad_out.data_ptr<float>(), grads, L, D);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, dW_y, dW_q, dW_k, dw_b};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "self_ref_v0 (SRWM): float32 CUDA kernels";
  m.def("forward", &forward, "forward(x, W_y, W_q, W_k, w_b) -> [out, *saved]");
  m.def("backward", &backward, "backward(grad_out, x, W_y, W_q, W_k, w_b, saved) -> [dx, dW_y, dW_q, dW_k, dw_b]");
  m.def("supports", &supports, "supports(x, W_y, W_q, W_k, w_b) -> whether these kernels handle the inputs");
}
