// Modern self-referential weight matrix (self_ref_v0): fused CPU forward and backward over time.
//
// Per (batch, head) item the four matrices W_y, W_q, W_k (D x D) and w_b (D x 4) are kept side by side as one
// D x (3D+4) matrix W = [W_y | W_q | W_k | w_b], so a step is three passes over W:
//   z = x_t @ W = [y_t | zq | zk | zb] (before the update),  r = (q - k) @ W = q @ W - k @ W,
//   W += outer(k, g * r) with g = [b0 (D times) | b1 (D) | b2 (D) | b3 (4)] the learning rates per column;
// the update pass also computes the next step's z. Items run in parallel, each with W in a private buffer that
// stays in cache for all L steps. Rows are padded with zeros to whole 64-byte vectors, and every pass walks
// column blocks of at most four vectors whose accumulators stay in registers (see for_column_blocks).
//
// Backward needs each step's W in reverse order. Storing all of them costs L*D*(3D+4) per item, and undoing the
// updates in reverse drifts in float32, so the forward saves W every `chunk` steps (as many steps as fit a cache
// budget) plus the small per-step vectors; the backward rebuilds each chunk's matrices from its checkpoint with
// the same rank-1 updates. Backward only multiplies them by vectors from the right, so it rebuilds the
// transposes, which turns those products into sums of rows.
//
// The model passes W_y, W_q, W_k, w_b expanded over the batch; their gradients here are per batch element and
// autograd sums them.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "../rec_update_fwm_tanh/recurrence_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using namespace fwp_recurrence_cpu;

// W is (D, N_pad) with N = 3D+4 meaningful columns; its transpose, rebuilt in backward, is (N, D_pad).
template <typename T>
Dims dims_of(int64_t L, int64_t D) {
  const int64_t N = 3 * D + 4;
  return Dims::of<T>(L, D, N, N);
}

// What the forward saves per step, side by side: [q | k | b (4) | r (N)].
struct StepLayout {
  int64_t D;
  int64_t size() const { return 5 * D + 8; }
  int64_t q() const { return 0; }
  int64_t k() const { return D; }
  int64_t b() const { return 2 * D; }
  int64_t r() const { return 2 * D + 4; }
  // The write vector u = g * r into u[0, N) (g: the learning rate of each column); forward and rebuild share it
  // so that the rebuilt matrices repeat the forward's arithmetic exactly.
  template <typename T>
  FWP_INLINE void write_vector(const T* step, T* u) const {
    const T* rates = step + b();
    const T* r_ = step + r();
    for (int64_t i = 0; i < 3; ++i) {
      const T rate = rates[i];
#pragma omp simd
      for (int64_t m = i * D; m < (i + 1) * D; ++m) u[m] = rate * r_[m];
    }
    for (int64_t m = 3 * D; m < 3 * D + 4; ++m) u[m] = rates[3] * r_[m];
  }
};

// The four matrices of one item, as stored in the inputs (and in the gradients).
template <typename T>
struct ItemMatrices {
  T *W_y, *W_q, *W_k, *w_b;
};

// W (D, N_pad) <- [W_y | W_q | W_k | w_b | 0], or the reverse split (padding dropped).
template <typename T>
FWP_INLINE void join_matrices(const ItemMatrices<T>& parts, int64_t D, int64_t N_pad, T* W) {
  for (int64_t e = 0; e < D; ++e) {
    T* row = W + e * N_pad;
    std::copy(parts.W_y + e * D, parts.W_y + (e + 1) * D, row);
    std::copy(parts.W_q + e * D, parts.W_q + (e + 1) * D, row + D);
    std::copy(parts.W_k + e * D, parts.W_k + (e + 1) * D, row + 2 * D);
    std::copy(parts.w_b + e * 4, parts.w_b + (e + 1) * 4, row + 3 * D);
  }
}

template <typename T>
FWP_INLINE void split_matrix(const T* W, int64_t D, int64_t N_pad, const ItemMatrices<T>& parts) {
  for (int64_t e = 0; e < D; ++e) {
    const T* row = W + e * N_pad;
    std::copy(row, row + D, parts.W_y + e * D);
    std::copy(row + D, row + 2 * D, parts.W_q + e * D);
    std::copy(row + 2 * D, row + 3 * D, parts.W_k + e * D);
    std::copy(row + 3 * D, row + 3 * D + 4, parts.w_b + e * 4);
  }
}

template <typename T>
struct ForwardScratch {
  std::vector<T> buffer;
  T *W, *z, *r, *u, *a;
  explicit ForwardScratch(const Dims& d) : buffer(d.D * d.N_pad + 3 * d.N_pad + d.D, T(0)) {
    W = buffer.data();
    z = W + d.D * d.N_pad;
    r = z + d.N_pad;
    u = r + d.N_pad;
    a = u + d.N_pad;
  }
};

// One (batch, head) item: x and out are (L, D), steps (L, 5D+8), ckpt (num_chunks, D, N_pad).
template <int Bytes, typename T>
FWP_INLINE void forward_item(const T* x, const ItemMatrices<T> W_in, T* out, T* steps, T* ckpt,
                                   const Dims& dims, ForwardScratch<T>& sc) {
  const int64_t L = dims.L, D = dims.D, N = dims.N, N_pad = dims.N_pad;
  const StepLayout lay{D};
  // Local copies of the scratch pointers: loads through `sc` could alias the stores and stop vectorisation.
  T* const W = sc.W;
  T* const z = sc.z;
  T* const r = sc.r;
  T* const u = sc.u;
  T* const a = sc.a;
  join_matrices(W_in, D, N_pad, W);  // the padding columns stay 0
  std::fill(z, z + N_pad, T(0));
  add_vec_mat<Bytes>(x, W, D, N_pad, z);
  for (int64_t t = 0; t < L; ++t) {
    save_checkpoint_if_due(W, t, dims, ckpt);
    T* step = steps + t * lay.size();
    T* q = step + lay.q();
    T* k = step + lay.k();
    T* b = step + lay.b();
    std::copy(z, z + D, out + t * D);  // y_t = x_t @ W_y, read before the update
    softmax(z + D, q, D);
    softmax(z + 2 * D, k, D);
    for (int64_t i = 0; i < 4; ++i) b[i] = sigmoid_vectorisable(z[3 * D + i]);

    for (int64_t e = 0; e < D; ++e) a[e] = q[e] - k[e];
    std::fill(r, r + N_pad, T(0));
    add_vec_mat<Bytes>(a, W, D, N_pad, r);
    std::copy(r, r + N, step + lay.r());
    lay.write_vector(step, u);

    // W += outer(k, u) and z = x_{t+1} @ W (the updated W) in one pass.
    const T* x_next = t + 1 < L ? x + (t + 1) * D : nullptr;
    update_and_read<Bytes>(
        W, D, N_pad, k, u, [&](int64_t e) FWP_LAMBDA_INLINE { return x_next ? x_next[e] : T(0); }, z);
  }
}

template <typename T>
struct BackwardScratch {
  std::vector<T> buffer;
  // W_T_chunk[j]: transpose of the W that step (chunk start + j) reads, (N, D_pad).
  T *W_T_chunk, *dW, *u, *u_prev, *k_pad, *du, *dr, *dz, *da, *dx, *dk_from_dW;
  explicit BackwardScratch(const Dims& d)
      : buffer(d.chunk * d.N * d.D_pad + d.D * d.N_pad + 5 * d.N_pad + 4 * d.D_pad, T(0)) {
    W_T_chunk = buffer.data();
    dW = W_T_chunk + d.chunk * d.N * d.D_pad;
    T* next = dW + d.D * d.N_pad;
    for (T** vec : {&u, &u_prev, &du, &dr, &dz}) {
      *vec = next;
      next += d.N_pad;
    }
    for (T** vec : {&k_pad, &da, &dx, &dk_from_dW}) {
      *vec = next;
      next += d.D_pad;
    }
  }
};

// result = W @ coefficient, W given by its transpose W_T (N, D_pad): the sum of the rows of W_T weighted by
// coefficient.
template <int Bytes, typename T>
FWP_INLINE void mat_vec_by_rows(const T* W_T, const T* coefficient, int64_t N, int64_t D_pad, T* result) {
  std::fill(result, result + D_pad, T(0));
  add_vec_mat<Bytes>(coefficient, W_T, N, D_pad, result);
}

// dx (L, D) and the gradients of the four matrices receive this item's gradients.
template <int Bytes, typename T>
FWP_INLINE void backward_item(const T* grad_out, const T* x, const T* steps, const T* ckpt, T* dx_out,
                                    const ItemMatrices<T> dW_out, const Dims& dims, BackwardScratch<T>& sc) {
  const int64_t D = dims.D, D_pad = dims.D_pad, N = dims.N, N_pad = dims.N_pad;
  const StepLayout lay{D};
  // Local copies of the scratch pointers: loads through `sc` could alias the stores and stop vectorisation.
  T* const dW = sc.dW;
  T* const u = sc.u;
  T* const u_prev = sc.u_prev;
  T* const du = sc.du;
  T* const dr = sc.dr;
  T* const dz = sc.dz;
  T* const da = sc.da;
  T* const dx = sc.dx;
  T* const dk_from_dW = sc.dk_from_dW;
  // du = k_t @ dW and dk_from_dW = dW @ u_t, dW being the gradient w.r.t. the W after step t's update; both are
  // produced by the pass that finishes that gradient (zero after the last step).
  std::fill(dW, dW + D * N_pad, T(0));
  std::fill(du, du + N_pad, T(0));
  std::fill(dk_from_dW, dk_from_dW + D_pad, T(0));
  for_steps_backward(lay, steps, ckpt, dims, sc.W_T_chunk, u, sc.k_pad,
                     [&](int64_t t, const T* W_T, const T* step) FWP_LAMBDA_INLINE {
    const T* q = step + lay.q();
    const T* k = step + lay.k();
    const T* b = step + lay.b();
    const T* r = step + lay.r();
    const T* x_t = x + t * D;

    // u = g * r: dr = g * du, and the learning rates get the sums of du * r over their columns.
    const T d_rate[4] = {dot(du, r, D), dot(du + D, r + D, D), dot(du + 2 * D, r + 2 * D, D),
                         dot(du + 3 * D, r + 3 * D, 4)};
    for (int64_t i = 0; i < 3; ++i) {
#pragma omp simd
      for (int64_t n = i * D; n < (i + 1) * D; ++n) dr[n] = b[i] * du[n];
    }
    for (int64_t n = 3 * D; n < N; ++n) dr[n] = b[3] * du[n];
    // r = (q - k) @ W: d(q - k) = W @ dr.
    mat_vec_by_rows<Bytes>(W_T, dr, N, D_pad, da);
    // dz = gradient of z = x_t @ W = [y | zq | zk | zb].
    std::copy(grad_out + t * D, grad_out + (t + 1) * D, dz);
    for (int64_t e = 0; e < D; ++e) {
      dz[D + e] = da[e];
      dz[2 * D + e] = dk_from_dW[e] - da[e];
    }
    softmax_backward_inplace(q, dz + D, D);
    softmax_backward_inplace(k, dz + 2 * D, D);
    for (int64_t i = 0; i < 4; ++i) dz[3 * D + i] = d_rate[i] * b[i] * (T(1) - b[i]);
    mat_vec_by_rows<Bytes>(W_T, dz, N, D_pad, dx);
    std::copy(dx, dx + D, dx_out + t * D);

    // dW (w.r.t. the W step t reads) += outer(q - k, dr) + outer(x_t, dz); in the same pass, du and
    // dk_from_dW for step t-1.
    const T* k_prev = t > 0 ? k - lay.size() : nullptr;
    if (k_prev) lay.write_vector(step - lay.size(), u_prev);
    update_gradient_and_project<Bytes>(
        dW, D, N_pad,
        [&](int64_t e) FWP_LAMBDA_INLINE {
          return RowCoefficients<T>{q[e] - k[e], x_t[e], k_prev ? k_prev[e] : T(0)};
        },
        dr, dz, u_prev, du, dk_from_dW);
  });
  split_matrix(dW, D, N_pad, dW_out);
}

void check_inputs(const std::vector<at::Tensor>& inputs) {
  const at::Tensor& x = inputs[0];
  TORCH_CHECK(x.dim() == 4, "self_ref_v0: x must be (B, H, L, D)");
  const int64_t B = x.size(0), H = x.size(1), L = x.size(2), D = x.size(3);
  TORCH_CHECK(L > 0 && D > 0, "self_ref_v0: the sequence length and the head dimension must be positive");
  const std::vector<std::vector<int64_t>> shapes = {{B, H, L, D}, {B, H, D, D}, {B, H, D, D}, {B, H, D, D},
                                                    {B, H, D, 4}};
  check_shapes("self_ref_v0", inputs, shapes, {"x", "W_y", "W_q", "W_k", "w_b"});
}

template <typename T>
ItemMatrices<T> item_matrices(const at::Tensor& W_y, const at::Tensor& W_q, const at::Tensor& W_k,
                              const at::Tensor& w_b, int64_t item) {
  const int64_t D = W_y.size(-1);
  return {item_ptr<T>(W_y, item, D * D), item_ptr<T>(W_q, item, D * D), item_ptr<T>(W_k, item, D * D),
          item_ptr<T>(w_b, item, D * 4)};
}

std::vector<at::Tensor> self_ref_v0_forward(const at::Tensor& x, const at::Tensor& W_y, const at::Tensor& W_q,
                                            const at::Tensor& W_k, const at::Tensor& w_b) {
  check_inputs({x, W_y, W_q, W_k, w_b});
  const int64_t B = x.size(0), H = x.size(1), L = x.size(2), D = x.size(3);
  at::Tensor out = at::empty({B, H, L, D}, x.options());
  at::Tensor steps = at::empty({B, H, L, StepLayout{D}.size()}, x.options());
  at::Tensor ckpt;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "self_ref_v0_forward", [&] {
    using T = scalar_t;
    const Dims dims = dims_of<T>(L, D);
    ckpt = at::empty({B, H, dims.num_chunks, D, dims.N_pad}, x.options());
    parallel_items<ForwardScratch<T>>(B * H, dims, [&](int64_t i, ForwardScratch<T>& scratch) {
      fwp::dispatch([&](auto width) FWP_LAMBDA_INLINE {
      forward_item<decltype(width)::value, T>(item_ptr<T>(x, i, L * D), item_matrices<T>(W_y, W_q, W_k, w_b, i), item_ptr<T>(out, i, L * D),
                      item_ptr<T>(steps, i, L * StepLayout{D}.size()),
                      item_ptr<T>(ckpt, i, dims.num_chunks * dims.matrix_size()), dims, scratch);
      });
    });
  });
  return {out, /*saved:*/ steps, ckpt};
}

std::vector<at::Tensor> self_ref_v0_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& W_y,
                                             const at::Tensor& W_q, const at::Tensor& W_k, const at::Tensor& w_b,
                                             const std::vector<at::Tensor>& saved) {
  TORCH_CHECK(saved.size() == 2, "self_ref_v0 backward: expected the 2 tensors saved by forward");
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.is_contiguous(), "self_ref_v0 backward: bad grad_out");
  const at::Tensor& steps = saved[0];
  const at::Tensor& ckpt = saved[1];
  const int64_t B = x.size(0), H = x.size(1), L = x.size(2), D = x.size(3);
  at::Tensor dx = at::empty_like(x);
  at::Tensor dW_y = at::empty_like(W_y), dW_q = at::empty_like(W_q), dW_k = at::empty_like(W_k);
  at::Tensor dw_b = at::empty_like(w_b);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "self_ref_v0_backward", [&] {
    using T = scalar_t;
    const Dims dims = dims_of<T>(L, D);
    parallel_items<BackwardScratch<T>>(B * H, dims, [&](int64_t i, BackwardScratch<T>& scratch) {
      fwp::dispatch([&](auto width) FWP_LAMBDA_INLINE {
      backward_item<decltype(width)::value, T>(item_ptr<T>(grad_out, i, L * D), item_ptr<T>(x, i, L * D),
                       item_ptr<T>(steps, i, L * StepLayout{D}.size()),
                       item_ptr<T>(ckpt, i, dims.num_chunks * dims.matrix_size()), item_ptr<T>(dx, i, L * D),
                       item_matrices<T>(dW_y, dW_q, dW_k, dw_b, i), dims, scratch);
      });
    });
  });
  return {dx, dW_y, dW_q, dW_k, dw_b};
}

}  // namespace

// Other dtypes (half, bfloat16) run through the reference; the dispatcher asks here first.
bool self_ref_v0_supports(const at::Tensor& x, const at::Tensor& W_y, const at::Tensor& W_q, const at::Tensor& W_k,
                          const at::Tensor& w_b) {
  return x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("isa", [] { return std::string(fwp::isa_name(fwp::active_isa())); }, "the instruction set the kernels run");
  m.def("supports", &self_ref_v0_supports, "whether the kernel handles these inputs (float32 and float64 do)");
  m.def("forward", &self_ref_v0_forward, "Self-referential weight matrix, forward (CPU)");
  m.def("backward", &self_ref_v0_backward, "Self-referential weight matrix, backward (CPU)");
}
