// CUDA kernels of rec_delta_fn (Recurrent Delta): forward and backward, float32.
//
//   s_t = tanh(state_{t-1});  q_t = softmax(qx_t + s_t R_q);  k_t = softmax(kx_t + s_t R_k);  v_t = vx_t + s_t R_v
//   beta_t = sigmoid(bx_t + s_t . r_b);  v_old = k_t @ W_{t-1};  W_t = W_{t-1} + outer(k_t, beta_t (v_t - v_old))
//   out_t = state_t = q_t @ W_t
//
// Design. The recurrence couples every entry of a step to every other, so one block owns one (batch, head) and walks
// the sequence, with W and R_q, R_k, R_v in shared memory. Matrices are read by groups of kLanes threads in two
// layouts: a group per column (lane g walks rows g, g + kLanes, ...: for x @ W) or a group per row (for W @ x); the
// dot products are shuffle reductions inside the group. Rows are padded to a multiple of 32 floats and column
// indices XOR-swizzled per row (`swizzled`), which makes both layouts free of shared-memory bank conflicts. A step
// of the forward is three phases separated by barriers: logits / value / gate (column layout), the two softmaxes
// (one warp each), then the delta update and read-out (column layout).
//
// Backward. The forward saves, per step, s_t, q_t, k_t, delta_t = v_t - v_old and beta_t, and W at the end of every
// kCheckpointEvery steps. The backward walks the chunks from the last: it reloads the chunk's final W from its
// checkpoint (bit-identical to the forward's) and recovers earlier states within the chunk by undoing the rank-one
// updates with the saved vectors, W_{t-1} = W_t - k_t u_t^T. Errors of that reversal do not feed back into any
// vector (all are saved) and restart from an exact matrix every kCheckpointEvery steps, so they stay at the level of
// a few float32 roundings of |W| (about 1e-6 relative), independent of the sequence length. Per step (G = gradient
// of W_t, dh = grad_out_t + the gradient reaching state_t through s_{t+1}):
//   G += q_t dh^T;  du = G^T k_t (column layout);  dq = W_t dh;  dk = G u_t - beta_t W_{t-1} du;
//   G -= beta_t k_t du^T (row layout);  softmax / sigmoid backward; ds = R_q dqx + R_k dkx + R_v dvx + dbx r_b (row
//   layout), and (1 - s_t^2) ds flows into step t-1.
// The batch-shared parameters need no reduction inside the kernel: dR_q = sum over batch and time of s_t dqx_t^T,
// etc., which are matrix products of tensors the kernels already produce (at::matmul, then a sum over the batch).
//
// Supported: float32 tensors on a CUDA device, head size D from 1 to kMaxHeadSize (96), and only while the
// backward's shared memory (five D x roundup(D, 32) matrices and some vectors; 84 KB for D = 64) fits the device's
// per-block limit: D <= 48 with 64 KB (sm_75), D <= 64 with 96-99 KB (V100, sm_86/89), D <= 84 on A100, D <= 96 on
// H100 / H200. `supports` says false for anything else (float64, half, bfloat16, larger heads): the dispatcher then
// runs the PyTorch reference on the GPU.
#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <string>
#include <vector>

#include "shared_matrix_cuda.cuh"

namespace {

using namespace fwp;

constexpr int kStepVectors = 5;  // s, q, k, delta, grad_out: the per-step inputs of the backward

size_t forward_shared_bytes(int D) { return sizeof(float) * (4 * D * padded_stride(D) + 6 * D); }
size_t backward_shared_bytes(int D) {
  return sizeof(float) * (5 * D * padded_stride(D) + D + 2 * (kStepVectors * D + 1) + 5 * D);
}

struct RecInputs {
  const float* qx;   // (B, H, L, D)
  const float* kx;
  const float* vx;
  const float* bx;   // (B, H, L, 1)
  const float* R_q;  // (1, H, D, D)
  const float* R_k;
  const float* R_v;
  const float* r_b;  // (1, H, 1, D)
  const float* W0;   // (B, H, D, D)
  const float* h0;   // (B, H, 1, D)
};

// What the forward leaves for the backward.
struct RecSaved {
  float* s;            // (B, H, L, D): tanh of the previous state
  float* q;            // (B, H, L, D)
  float* k;            // (B, H, L, D)
  float* delta;        // (B, H, L, D): v_t - v_old
  float* beta;         // (B, H, L, 1)
  float* checkpoints;  // (B, H, checkpoint_count(L), D, D): W after steps kCheckpointEvery - 1, 2 kCheckpointEvery - 1, ..., L - 1
};

struct RecGrads {
  float* dqx;  // (B, H, L, D)
  float* dkx;
  float* dvx;
  float* dbx;  // (B, H, L, 1)
};

// Grid: B * H blocks; block: threads_for(D) threads; dynamic shared memory: forward_shared_bytes(D).
__global__ void __launch_bounds__(kMaxThreads, 1)
rec_forward_kernel(RecInputs in, RecSaved saved, float* __restrict__ out, int H, int length, int D) {
  extern __shared__ float shared[];
  const int stride = padded_stride(D);
  float* W = shared;
  float* R_q = W + D * stride;
  float* R_k = R_q + D * stride;
  float* R_v = R_k + D * stride;
  float* r_b = R_v + D * stride;
  float* s = r_b + D;
  float* q_logits = s + D;
  float* k_logits = q_logits + D;
  float* q = k_logits + D;
  float* k = q + D;

  const int64_t bh = blockIdx.x;
  const int64_t head = bh % H;
  const int64_t matrix = static_cast<int64_t>(D) * D;
  const int64_t sequence = static_cast<int64_t>(length) * D;
  const int lane = threadIdx.x % kLanes;
  const int group = threadIdx.x / kLanes;  // the column this group owns
  const bool owns_column = group < D;

  load_matrix(W, in.W0 + bh * matrix, D, stride);
  load_matrix(R_q, in.R_q + head * matrix, D, stride);
  load_matrix(R_k, in.R_k + head * matrix, D, stride);
  load_matrix(R_v, in.R_v + head * matrix, D, stride);
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    r_b[i] = in.r_b[head * D + i];
    s[i] = tanhf(in.h0[bh * D + i]);
  }
  out += bh * sequence;
  const float* qx = in.qx + bh * sequence;
  const float* kx = in.kx + bh * sequence;
  const float* vx = in.vx + bh * sequence;
  const float* bx = in.bx + bh * length;
  float* saved_s = saved.s + bh * sequence;
  float* saved_q = saved.q + bh * sequence;
  float* saved_k = saved.k + bh * sequence;
  float* saved_delta = saved.delta + bh * sequence;
  float* saved_beta = saved.beta + bh * length;
  float* checkpoints = saved.checkpoints + bh * checkpoint_count(length) * matrix;
  __syncthreads();

  const int col = group;
  for (int t = 0; t < length; ++t) {
    // Logits, value and gate: x_t + s_t R for this column; s_t . r_b is summed by every group alike.
    float q_part = 0.f, k_part = 0.f, v_part = 0.f, gate_part = 0.f;
    for (int row = lane; row < D; row += kLanes) {
      const float s_r = s[row];
      gate_part = fmaf(s_r, r_b[row], gate_part);
      if (owns_column) {
        const int at = swizzled(row, col, stride);
        q_part = fmaf(s_r, R_q[at], q_part);
        k_part = fmaf(s_r, R_k[at], k_part);
        v_part = fmaf(s_r, R_v[at], v_part);
      }
    }
    q_part = group_sum(q_part);
    k_part = group_sum(k_part);
    v_part = group_sum(v_part);
    const float beta = sigmoid(bx[t] + group_sum(gate_part));
    float v_c = 0.f;
    if (owns_column) {
      v_c = vx[t * D + col] + v_part;
      if (lane == 0) {
        q_logits[col] = qx[t * D + col] + q_part;
        k_logits[col] = kx[t * D + col] + k_part;
        saved_s[t * D + col] = s[col];
      }
    }
    __syncthreads();

    const int warp = threadIdx.x / kWarpSize;
    for (int which = warp; which < 2; which += blockDim.x / kWarpSize) {
      if (which == 0) warp_softmax(q_logits, q, saved_q + t * D, D);
      else warp_softmax(k_logits, k, saved_k + t * D, D);
    }
    __syncthreads();

    // Delta update of this column and read-out.
    float old_part = 0.f;
    if (owns_column)
      for (int row = lane; row < D; row += kLanes) old_part = fmaf(k[row], W[swizzled(row, col, stride)], old_part);
    const float delta_c = v_c - group_sum(old_part);
    const float u_c = beta * delta_c;
    float out_part = 0.f;
    if (owns_column)
      for (int row = lane; row < D; row += kLanes) {
        const int at = swizzled(row, col, stride);
        const float w = fmaf(k[row], u_c, W[at]);
        W[at] = w;
        out_part = fmaf(q[row], w, out_part);
      }
    const float out_c = group_sum(out_part);
    if (owns_column) {
      if (lane == 0) {
        out[t * D + col] = out_c;
        s[col] = tanhf(out_c);  // everyone has read s_t (barriers since)
        saved_delta[t * D + col] = delta_c;
        if (col == 0) saved_beta[t] = beta;
      }
      if ((t + 1) % kCheckpointEvery == 0 || t == length - 1) {
        float* checkpoint = checkpoints + (t / kCheckpointEvery) * matrix;
        for (int row = lane; row < D; row += kLanes) checkpoint[row * D + col] = W[swizzled(row, col, stride)];
      }
    }
    __syncthreads();
  }
}

// Per-step inputs of the backward, staged in shared memory one step ahead: [s | q | k | delta | grad_out | beta].
// (A branch per source rather than an array of pointers: an indexed array would live in local memory.)
__device__ void load_step_vectors(float* dst, const RecSaved& saved, const float* grad_out, int64_t bh, int t,
                                  int length, int D) {
  const int64_t at = (bh * length + t) * D;
  for (int i = threadIdx.x; i < kStepVectors * D + 1; i += blockDim.x) {
    const int which = i / D, entry = i % D;
    float value;
    if (which == 0) value = saved.s[at + entry];
    else if (which == 1) value = saved.q[at + entry];
    else if (which == 2) value = saved.k[at + entry];
    else if (which == 3) value = saved.delta[at + entry];
    else if (which == 4) value = grad_out[at + entry];
    else value = saved.beta[bh * length + t];
    dst[i] = value;
  }
}

// Grid: B * H blocks; block: threads_for(D) threads; dynamic shared memory: backward_shared_bytes(D).
__global__ void __launch_bounds__(kMaxThreads, 1)
rec_backward_kernel(RecInputs in, RecSaved saved, const float* __restrict__ grad_out, RecGrads grads, int H,
                    int length, int D) {
  extern __shared__ float shared[];
  const int stride = padded_stride(D);
  float* W = shared;
  float* G = W + D * stride;
  float* R_q = G + D * stride;
  float* R_k = R_q + D * stride;
  float* R_v = R_k + D * stride;
  float* r_b = R_v + D * stride;
  float* step_buffers = r_b + D;  // [2][kStepVectors * D + 1]
  float* dh = step_buffers + 2 * (kStepVectors * D + 1);
  float* du = dh + D;
  float* dq = du + D;
  float* dk = dq + D;
  float* carry = dk + D;  // gradient reaching state_{t-1} through s_t

  const int64_t bh = blockIdx.x;
  const int64_t head = bh % H;
  const int64_t matrix = static_cast<int64_t>(D) * D;
  const int lane = threadIdx.x % kLanes;
  const int group = threadIdx.x / kLanes;  // a column in the column layout, a row in the row layout
  const bool owns_group = group < D;

  load_matrix(R_q, in.R_q + head * matrix, D, stride);
  load_matrix(R_k, in.R_k + head * matrix, D, stride);
  load_matrix(R_v, in.R_v + head * matrix, D, stride);
  for (int i = threadIdx.x; i < D * stride; i += blockDim.x) G[i] = 0.f;
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    r_b[i] = in.r_b[head * D + i];
    carry[i] = 0.f;
  }
  if (length > 0) load_step_vectors(step_buffers + ((length - 1) & 1) * (kStepVectors * D + 1), saved, grad_out, bh,
                                    length - 1, length, D);
  const float* checkpoints = saved.checkpoints + bh * checkpoint_count(length) * matrix;
  const int64_t sequence = static_cast<int64_t>(length) * D;
  float* dqx = grads.dqx + bh * sequence;
  float* dkx = grads.dkx + bh * sequence;
  float* dvx = grads.dvx + bh * sequence;
  float* dbx = grads.dbx + bh * length;

  for (int chunk = checkpoint_count(length) - 1; chunk >= 0; --chunk) {
    __syncthreads();  // the previous step is complete
    load_matrix(W, checkpoints + chunk * matrix, D, stride);  // W at the chunk's last step, as the forward had it
    __syncthreads();
    const int last = min(length, (chunk + 1) * kCheckpointEvery) - 1;
    for (int t = last; t >= chunk * kCheckpointEvery; --t) {
      const float* step = step_buffers + (t & 1) * (kStepVectors * D + 1);
      const float* s_t = step;
      const float* q_t = s_t + D;
      const float* k_t = q_t + D;
      const float* delta_t = k_t + D;
      const float* grad_t = delta_t + D;
      const float beta = grad_t[D];

      // Column layout: G += q_t dh^T, then du = G^T k_t.
      {
        const int col = group;
        const float dh_c = owns_group ? grad_t[col] + carry[col] : 0.f;
        float du_part = 0.f;
        if (owns_group)
          for (int row = lane; row < D; row += kLanes) {
            const int at = swizzled(row, col, stride);
            const float g = fmaf(q_t[row], dh_c, G[at]);
            G[at] = g;
            du_part = fmaf(g, k_t[row], du_part);
          }
        const float du_c = group_sum(du_part);
        if (owns_group && lane == 0) {
          du[col] = du_c;
          dh[col] = dh_c;
        }
      }
      __syncthreads();

      // Row layout: dq = W_t dh; W_t -> W_{t-1}; dk = G u - beta W_{t-1} du; G -> G - beta k du^T. dbeta = du . delta.
      float dbeta;
      {
        const int row = group;
        const float k_r = owns_group ? k_t[row] : 0.f;
        float dq_part = 0.f, dk_part = 0.f, dbeta_part = 0.f;
        for (int col = lane; col < D; col += kLanes) {
          const float du_c = du[col];
          const float u_c = beta * delta_t[col];
          dbeta_part = fmaf(du_c, delta_t[col], dbeta_part);
          if (owns_group) {
            const int at = swizzled(row, col, stride);
            const float w = W[at];
            dq_part = fmaf(w, dh[col], dq_part);
            const float w_previous = fmaf(-k_r, u_c, w);
            W[at] = w_previous;
            const float g = G[at];
            dk_part = fmaf(g, u_c, fmaf(-beta * w_previous, du_c, dk_part));
            G[at] = fmaf(-beta * k_r, du_c, g);
          }
        }
        const float dq_r = group_sum(dq_part);
        const float dk_r = group_sum(dk_part);
        dbeta = group_sum(dbeta_part);
        if (owns_group && lane == 0) {
          dq[row] = dq_r;
          dk[row] = dk_r;
        }
      }
      __syncthreads();

      // Row layout over R: softmax and sigmoid backward, ds = R_q dqx + R_k dkx + R_v dvx + dbx r_b, and the carry.
      {
        const int row = group;
        float q_dot_part = 0.f, k_dot_part = 0.f;
        for (int col = lane; col < D; col += kLanes) {
          q_dot_part = fmaf(q_t[col], dq[col], q_dot_part);
          k_dot_part = fmaf(k_t[col], dk[col], k_dot_part);
        }
        const float q_dot = group_sum(q_dot_part);
        const float k_dot = group_sum(k_dot_part);
        const float dz = dbeta * beta * (1.f - beta);
        float ds_part = 0.f;
        if (owns_group)
          for (int col = lane; col < D; col += kLanes) {
            const int at = swizzled(row, col, stride);
            const float dqx_c = q_t[col] * (dq[col] - q_dot);
            const float dkx_c = k_t[col] * (dk[col] - k_dot);
            ds_part = fmaf(R_q[at], dqx_c, fmaf(R_k[at], dkx_c, fmaf(R_v[at], beta * du[col], ds_part)));
          }
        const float ds_r = group_sum(ds_part);
        if (owns_group && lane == 0) {
          carry[row] = (1.f - s_t[row] * s_t[row]) * fmaf(dz, r_b[row], ds_r);
          dqx[t * D + row] = q_t[row] * (dq[row] - q_dot);
          dkx[t * D + row] = k_t[row] * (dk[row] - k_dot);
          dvx[t * D + row] = beta * du[row];
          if (row == 0) dbx[t] = dz;
        }
      }
      if (t > 0) load_step_vectors(step_buffers + ((t - 1) & 1) * (kStepVectors * D + 1), saved, grad_out, bh, t - 1,
                                   length, D);
      __syncthreads();
    }
  }
}

// Empty when the kernels handle these inputs, else why not.
std::string unsupported_reason(const std::vector<at::Tensor>& inputs) {
  const std::string problem = float32_cuda_problem(inputs);
  if (!problem.empty()) return problem;
  const at::Tensor& qx = inputs[0];
  const int64_t B = qx.size(0), H = qx.size(1), L = qx.size(2), D = qx.size(3);
  const std::vector<std::vector<int64_t>> expected = {{B, H, L, D}, {B, H, L, D}, {B, H, L, D}, {B, H, L, 1},
                                                      {1, H, D, D}, {1, H, D, D}, {1, H, D, D}, {1, H, 1, D},
                                                      {B, H, D, D}, {B, H, 1, D}};
  for (size_t i = 0; i < inputs.size(); ++i)
    if (inputs[i].sizes() != at::IntArrayRef(expected[i]))
      return "shapes must be qx, kx, vx (B, H, L, D), bx (B, H, L, 1), R_* (1, H, D, D), r_b (1, H, 1, D), "
             "W0 (B, H, D, D), h0 (B, H, 1, D)";
  if (D < 1 || D > kMaxHeadSize) return "D must be between 1 and " + std::to_string(kMaxHeadSize);
  if (backward_shared_bytes(D) > static_cast<size_t>(max_shared_bytes(qx.device())))
    return "D = " + std::to_string(D) + " needs more shared memory than this GPU has per block";
  return "";
}

void check_inputs(const std::vector<at::Tensor>& inputs) {
  TORCH_CHECK(inputs.size() == 10, "rec_delta takes 10 inputs");
  const std::string reason = unsupported_reason(inputs);
  TORCH_CHECK(reason.empty(), "rec_delta CUDA kernel: ", reason);
  for (const at::Tensor& t : inputs) TORCH_CHECK(t.is_contiguous(), "inputs must be contiguous");
}

RecInputs pointers(const std::vector<at::Tensor>& x) {
  return {x[0].data_ptr<float>(), x[1].data_ptr<float>(), x[2].data_ptr<float>(), x[3].data_ptr<float>(),
          x[4].data_ptr<float>(), x[5].data_ptr<float>(), x[6].data_ptr<float>(), x[7].data_ptr<float>(),
          x[8].data_ptr<float>(), x[9].data_ptr<float>()};
}

bool supports(const at::Tensor& qx, const at::Tensor& kx, const at::Tensor& vx, const at::Tensor& bx,
              const at::Tensor& R_q, const at::Tensor& R_k, const at::Tensor& R_v, const at::Tensor& r_b,
              const at::Tensor& W0, const at::Tensor& h0) {
  return unsupported_reason({qx, kx, vx, bx, R_q, R_k, R_v, r_b, W0, h0}).empty();
}

// Returns [out, s, q, k, delta, beta, checkpoints]; see RecSaved.
std::vector<at::Tensor> forward(const at::Tensor& qx, const at::Tensor& kx, const at::Tensor& vx, const at::Tensor& bx,
                                const at::Tensor& R_q, const at::Tensor& R_k, const at::Tensor& R_v,
                                const at::Tensor& r_b, const at::Tensor& W0, const at::Tensor& h0) {
  const std::vector<at::Tensor> inputs = {qx, kx, vx, bx, R_q, R_k, R_v, r_b, W0, h0};
  check_inputs(inputs);
  const c10::cuda::OptionalCUDAGuard device_guard(qx.device());
  const int64_t B = qx.size(0), H = qx.size(1);
  const int L = qx.size(2), D = qx.size(3);
  at::Tensor out = at::empty_like(qx);
  at::Tensor s = at::empty_like(qx), q = at::empty_like(qx), k = at::empty_like(qx), delta = at::empty_like(qx);
  at::Tensor beta = at::empty_like(bx);
  at::Tensor checkpoints = at::empty({B, H, checkpoint_count(L), D, D}, qx.options());
  if (B * H > 0 && L > 0) {
    const size_t shared_bytes = forward_shared_bytes(D);
    C10_CUDA_CHECK(cudaFuncSetAttribute(rec_forward_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(shared_bytes)));
    const RecSaved saved{s.data_ptr<float>(), q.data_ptr<float>(), k.data_ptr<float>(), delta.data_ptr<float>(),
                         beta.data_ptr<float>(), checkpoints.data_ptr<float>()};
    rec_forward_kernel<<<dim3(B * H), dim3(threads_for(D)), shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
        pointers(inputs), saved, out.data_ptr<float>(), H, L, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out, s, q, k, delta, beta, checkpoints};
}

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& qx, const at::Tensor& kx,
                                 const at::Tensor& vx, const at::Tensor& bx, const at::Tensor& R_q,
                                 const at::Tensor& R_k, const at::Tensor& R_v, const at::Tensor& r_b,
                                 const at::Tensor& W0, const at::Tensor& h0, const std::vector<at::Tensor>& saved) {
  const std::vector<at::Tensor> inputs = {qx, kx, vx, bx, R_q, R_k, R_v, r_b, W0, h0};
  check_inputs(inputs);
  TORCH_CHECK(grad_out.sizes() == qx.sizes() && grad_out.is_contiguous() && grad_out.scalar_type() == at::kFloat,
              "grad_out must be a contiguous float32 tensor shaped like qx");
  TORCH_CHECK(saved.size() == 6, "saved must be the 6 tensors forward returned after out");
  for (const at::Tensor& t : saved) TORCH_CHECK(t.is_contiguous() && t.scalar_type() == at::kFloat, "bad saved tensor");
  const c10::cuda::OptionalCUDAGuard device_guard(qx.device());
  const int64_t B = qx.size(0), H = qx.size(1);
  const int L = qx.size(2), D = qx.size(3);
  at::Tensor dqx = at::empty_like(qx), dkx = at::empty_like(qx), dvx = at::empty_like(qx), dbx = at::empty_like(bx);
  if (B * H > 0 && L > 0) {
    const size_t shared_bytes = backward_shared_bytes(D);
    C10_CUDA_CHECK(cudaFuncSetAttribute(rec_backward_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(shared_bytes)));
    const RecSaved saved_pointers{saved[0].data_ptr<float>(), saved[1].data_ptr<float>(), saved[2].data_ptr<float>(),
                                  saved[3].data_ptr<float>(), saved[4].data_ptr<float>(), saved[5].data_ptr<float>()};
    const RecGrads grads{dqx.data_ptr<float>(), dkx.data_ptr<float>(), dvx.data_ptr<float>(), dbx.data_ptr<float>()};
    rec_backward_kernel<<<dim3(B * H), dim3(threads_for(D)), shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
        pointers(inputs), saved_pointers, grad_out.data_ptr<float>(), grads, H, L, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    for (at::Tensor* t : {&dqx, &dkx, &dvx, &dbx}) t->zero_();
  }
  // Batch-shared parameters: sums over batch and time of s_t (per-step gradient)^T.
  const at::Tensor s_transposed = saved[0].transpose(2, 3);
  at::Tensor dR_q = at::matmul(s_transposed, dqx).sum(0, /*keepdim=*/true);
  at::Tensor dR_k = at::matmul(s_transposed, dkx).sum(0, /*keepdim=*/true);
  at::Tensor dR_v = at::matmul(s_transposed, dvx).sum(0, /*keepdim=*/true);
  at::Tensor dr_b = at::matmul(dbx.transpose(2, 3), saved[0]).sum(0, /*keepdim=*/true);
  return {dqx, dkx, dvx, dbx, dR_q, dR_k, dR_v, dr_b};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rec_delta (Recurrent Delta): float32 CUDA kernels";
  m.def("forward", &forward, "forward(qx, kx, vx, bx, R_q, R_k, R_v, r_b, W0, h0) -> [out, *saved]");
  m.def("backward", &backward,
        "backward(grad_out, qx, kx, vx, bx, R_q, R_k, R_v, r_b, W0, h0, saved) -> "
        "[dqx, dkx, dvx, dbx, dR_q, dR_k, dR_v, dr_b]");
  m.def("supports", &supports, "supports(qx, kx, vx, bx, R_q, R_k, R_v, r_b, W0, h0) -> whether these kernels handle the inputs");
}
