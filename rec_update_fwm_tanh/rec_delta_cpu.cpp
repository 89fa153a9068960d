// Recurrent Delta rule (rec_delta_fn): fused CPU forward and backward over time.
//
// Every (batch, head) item is an independent sequential recurrence, so items run in parallel and each keeps its
// fast weight matrix (and, in backward, its gradient) in a private buffer that stays in cache for all L steps.
// Matrix rows are padded with zeros to whole 64-byte vectors, and every pass over a matrix walks column blocks of
// at most four vectors whose accumulators stay in registers (see for_column_blocks).
//
// Backward needs W_{t-1} at every step in reverse order. Storing all of them costs L*D*D per item, and undoing the
// updates in reverse drifts in float32, so the forward saves W every `chunk` steps (as many steps as fit a cache
// budget) plus the small per-step vectors; the backward rebuilds each chunk's matrices from its checkpoint with the
// same rank-1 updates. Backward only ever multiplies W_{t-1} by vectors from the right, so it rebuilds the
// transpose, which turns those products into sums of rows. The output is saved too: s_t = tanh(out_{t-1}) is
// recomputed from it rather than stored.
//
// The gradients of the shared R_q, R_k, R_v, r_b are sums over batch and time of outer(s_t, dz_t), dz_t being the
// gradient of the pre-activations (which is the gradient of qx, kx, vx, bx). Each item accumulates its own share in
// cache in the same pass that sends dz_t back to s_t. Items are processed in fixed groups of batch elements of one
// head, each group owning an accumulator; the groups' sums are added after the parallel loop (no races, and the
// result does not depend on the number of threads).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "recurrence_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using namespace fwp_recurrence_cpu;

// What the forward saves per step, side by side: [q | k | v - v_old | beta].
struct StepLayout {
  int64_t D;
  int64_t size() const { return 3 * D + 1; }
  int64_t q() const { return 0; }
  int64_t k() const { return D; }
  int64_t diff() const { return 2 * D; }
  int64_t beta() const { return 3 * D; }
  // The write vector u = beta * (v - v_old) into u[0, D); forward and rebuild share it so that the rebuilt
  // matrices repeat the forward's arithmetic exactly.
  template <typename T>
  FWP_INLINE void write_vector(const T* step, T* u) const {
    const T b = step[beta()];
    const T* d = step + diff();
    for (int64_t m = 0; m < D; ++m) u[m] = b * d[m];
  }
};

// W is (D, D_pad); the concatenated recurrent weights R_cat = [R_q | R_k | R_v | r_b^T] have N = 3D+1 meaningful
// columns, padded to N_pad.
template <typename T>
Dims dims_of(int64_t L, int64_t D) {
  return Dims::of<T>(L, D, 3 * D + 1, D);
}

template <typename T>
struct ForwardScratch {
  std::vector<T> buffer;
  T *W, *z, *s, *v_old, *u, *read;
  explicit ForwardScratch(const Dims& d) : buffer(d.D * d.D_pad + d.N_pad + 4 * d.D_pad, T(0)) {
    W = buffer.data();
    z = W + d.D * d.D_pad;
    s = z + d.N_pad;
    v_old = s + d.D_pad;
    u = v_old + d.D_pad;
    read = u + d.D_pad;
  }
};

// One (batch, head) item: qx, kx, vx and out are (L, D), bx (L), R_cat (D, N_pad), W0 (D, D), h0 (D),
// steps (L, 3D+1), ckpt (num_chunks, D, D_pad).
template <int Bytes, typename T>
FWP_INLINE void forward_item(const T* qx, const T* kx, const T* vx, const T* bx, const T* R_cat,
                                   const T* W0, const T* h0, T* out, T* steps, T* ckpt, const Dims& dims,
                                   ForwardScratch<T>& sc) {
  const int64_t L = dims.L, D = dims.D, D_pad = dims.D_pad;
  const StepLayout lay{D};
  // Local copies of the scratch pointers: loads through `sc` could alias the stores and stop vectorisation.
  T* const W = sc.W;
  T* const z = sc.z;
  T* const s = sc.s;
  T* const v_old = sc.v_old;
  T* const u = sc.u;
  T* const read = sc.read;
  for (int64_t e = 0; e < D; ++e) std::copy(W0 + e * D, W0 + (e + 1) * D, W + e * D_pad);  // padding stays 0
  const T* state = h0;
  for (int64_t t = 0; t < L; ++t) {
    save_checkpoint_if_due(W, t, dims, ckpt);
    T* step = steps + t * lay.size();
    T* q = step + lay.q();
    T* k = step + lay.k();
    T* diff = step + lay.diff();
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) s[d] = tanh_vectorisable(state[d]);

    // z = [qx_t, kx_t, vx_t, bx_t] + s @ R_cat
    std::copy(qx + t * D, qx + (t + 1) * D, z);
    std::copy(kx + t * D, kx + (t + 1) * D, z + D);
    std::copy(vx + t * D, vx + (t + 1) * D, z + 2 * D);
    z[3 * D] = bx[t];
    add_vec_mat<Bytes>(s, R_cat, D, dims.N_pad, z);
    softmax(z, q, D);
    softmax(z + D, k, D);
    step[lay.beta()] = sigmoid_vectorisable(z[3 * D]);

    std::fill(v_old, v_old + D_pad, T(0));
    add_vec_mat<Bytes>(k, W, D, D_pad, v_old);
    for (int64_t m = 0; m < D; ++m) diff[m] = z[2 * D + m] - v_old[m];
    lay.write_vector(step, u);

    // W += outer(k, u) and read = q @ W (the updated W) in one pass.
    update_and_read<Bytes>(W, D, D_pad, k, u, [&](int64_t e) FWP_LAMBDA_INLINE { return q[e]; }, read);
    std::copy(read, read + D, out + t * D);
    state = out + t * D;
  }
}

template <typename T>
struct BackwardScratch {
  std::vector<T> buffer;
  // W_T_chunk[j]: transpose of the W that step (chunk start + j) reads before its update, (D, D_pad).
  T *W_T_chunk, *dW, *g, *u, *k_pad, *s, *du, *dv, *k_prev, *dv_prev, *dq, *dk, *dk_from_W, *ds;
  explicit BackwardScratch(const Dims& d) : buffer((d.chunk + 1) * d.D * d.D_pad + 12 * d.D_pad, T(0)) {
    W_T_chunk = buffer.data();
    dW = W_T_chunk + d.chunk * d.D * d.D_pad;
    T* next = dW + d.D * d.D_pad;
    for (T** vec : {&g, &u, &k_pad, &s, &du, &dv, &k_prev, &dv_prev, &dq, &dk, &dk_from_W, &ds}) {
      *vec = next;
      next += d.D_pad;
    }
  }
};

// ds = dz @ M and dM += outer(dz, s) in one pass over the rows of M and dM (rows x cols, cols a multiple of
// kVector<T>); the ds accumulators stay in registers while the rows stream through.
template <int Bytes, typename T>
FWP_INLINE void project_and_add_outer(const T* dz, const T* M, int64_t rows, int64_t cols, const T* s, T* ds,
                                      T* dM) {
  using V = typename fwp::Simd<T, Bytes>::vec;
  constexpr int64_t vw = fwp::Simd<T, Bytes>::width;
  for_column_blocks<Bytes, T>(cols, [&](int64_t col, auto width) FWP_LAMBDA_INLINE {
    constexpr int64_t n = decltype(width)::value / vw;
    V ds_acc[n], s_v[n];
    FWP_FOR_VECTORS(i, n) {
      ds_acc[i] = V{};
      s_v[i] = load_vector<V>(s + col + i * vw);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const T dz_r = dz[r];
      const T* row = M + r * cols + col;
      T* d_row = dM + r * cols + col;
      FWP_FOR_VECTORS(i, n) {
        ds_acc[i] += dz_r * load_vector<V>(row + i * vw);
        store_vector(d_row + i * vw, load_vector<V>(d_row + i * vw) + dz_r * s_v[i]);
      }
    }
    FWP_FOR_VECTORS(i, n) store_vector(ds + col + i * vw, ds_acc[i]);
  });
}

// dz_out receives, per step, [d qx_t | d kx_t | d vx_t | d bx_t] (N). R_cat_T is (N, D_pad): R_cat transposed, so
// the gradient flowing back into s is a sum of rows; this item's share of its gradient is added to dR_cat_T
// (N, D_pad).
template <int Bytes, typename T>
FWP_INLINE void backward_item(const T* grad_out, const T* out, const T* h0, const T* steps, const T* ckpt,
                                    const T* R_cat_T, T* dz_out, T* dR_cat_T, const Dims& dims,
                                    BackwardScratch<T>& sc) {
  const int64_t D = dims.D, D_pad = dims.D_pad, N = dims.N;
  const StepLayout lay{D};
  // Local copies of the scratch pointers: loads through `sc` could alias the stores and stop vectorisation.
  T* const dW = sc.dW;
  T* const g = sc.g;
  T* const u = sc.u;
  T* const s = sc.s;
  T* const du = sc.du;
  T* const dv = sc.dv;
  T* const k_prev = sc.k_prev;
  T* const dv_prev = sc.dv_prev;
  T* const dq = sc.dq;
  T* const dk = sc.dk;
  T* const dk_from_W = sc.dk_from_W;
  T* const ds = sc.ds;
  std::fill(dW, dW + D * D_pad, T(0));
  std::fill(ds, ds + D_pad, T(0));  // gradient reaching out_t through s_{t+1}; none after the last step
  // The last term of step t+1's gradient w.r.t. W_t, outer(k_{t+1}, -dv_{t+1}), is added in step t's first pass.
  std::fill(dv_prev, dv_prev + D_pad, T(0));
  std::fill(k_prev, k_prev + D_pad, T(0));
  for_steps_backward(lay, steps, ckpt, dims, sc.W_T_chunk, u, sc.k_pad,
                     [&](int64_t t, const T* W_T_prev, const T* step) FWP_LAMBDA_INLINE {
    const T* q = step + lay.q();
    const T* k = step + lay.k();
    const T* diff = step + lay.diff();
    const T beta = step[lay.beta()];
    const T* state = t == 0 ? h0 : out + (t - 1) * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) s[d] = tanh_vectorisable(state[d]);  // as in forward
    lay.write_vector(step, u);
    for (int64_t m = 0; m < D; ++m) g[m] = grad_out[t * D + m] + ds[m];  // gradient w.r.t. out_t

    // out_t = q @ W_t, W_t = W_prev + outer(k, u): dW becomes the gradient w.r.t. W_t; then du = k @ dW and
    // dk = dW @ u.
    update_gradient_and_project<Bytes>(
        dW, D, D_pad,
        [&](int64_t e) FWP_LAMBDA_INLINE { return RowCoefficients<T>{q[e], -k_prev[e], k[e]}; }, g, dv_prev, u,
        du, dk);
    // u = beta * (v - v_old), v_old = k @ W_prev: dv = beta du, d v_old = -dv.
    const T d_beta = dot(du, diff, D);
    for (int64_t m = 0; m < D; ++m) dv[m] = beta * du[m];
    // dq = W_t @ g = W_prev @ g + k (u . g), and dk gets -W_prev @ dv: sums of the rows of W_prev^T.
    std::fill(dq, dq + D_pad, T(0));
    std::fill(dk_from_W, dk_from_W + D_pad, T(0));
    add_vecs_mat<Bytes, 2, T>({g, dv}, W_T_prev, D, D_pad, {dq, dk_from_W});
    const T u_dot_g = dot(u, g, D);
    for (int64_t e = 0; e < D; ++e) {
      dq[e] += k[e] * u_dot_g;
      dk[e] -= dk_from_W[e];
    }
    std::copy(k, k + D, k_prev);
    std::copy(dv, dv + D, dv_prev);

    // Back through the nonlinearities to the pre-activations dz = [dzq | dzk | dv | dzb].
    softmax_backward_inplace(q, dq, D);
    softmax_backward_inplace(k, dk, D);
    T* const dz_t = dz_out + t * N;
    std::copy(dq, dq + D, dz_t);
    std::copy(dk, dk + D, dz_t + D);
    std::copy(dv, dv + D, dz_t + 2 * D);
    dz_t[3 * D] = d_beta * beta * (T(1) - beta);
    // ... and through z = x_cat + s @ R_cat to s (ds = R_cat @ dz) and R_cat (dR_cat += outer(s, dz)).
    project_and_add_outer<Bytes>(dz_t, R_cat_T, N, D_pad, s, ds, dR_cat_T);
    for (int64_t d = 0; d < D; ++d) ds[d] *= T(1) - s[d] * s[d];  // s = tanh(out_{t-1})
  });
}

void check_inputs(const std::vector<at::Tensor>& inputs) {
  const at::Tensor& qx = inputs[0];
  TORCH_CHECK(qx.dim() == 4, "rec_delta: qx must be (B, H, L, D)");
  const int64_t B = qx.size(0), H = qx.size(1), L = qx.size(2), D = qx.size(3);
  TORCH_CHECK(L > 0 && D > 0, "rec_delta: the sequence length and the head dimension must be positive");
  const std::vector<std::vector<int64_t>> shapes = {{B, H, L, D}, {B, H, L, D}, {B, H, L, D}, {B, H, L, 1},
                                                    {1, H, D, D},  {1, H, D, D},  {1, H, D, D},  {1, H, 1, D},
                                                    {B, H, D, D},  {B, H, 1, D}};
  check_shapes("rec_delta", inputs, shapes, {"qx", "kx", "vx", "bx", "R_q", "R_k", "R_v", "r_b", "W0", "h0"});
}

// (1, H, D, 3D+1): [R_q | R_k | R_v | r_b^T] along the last dimension.
at::Tensor concat_recurrent_weights(const at::Tensor& R_q, const at::Tensor& R_k, const at::Tensor& R_v,
                                    const at::Tensor& r_b) {
  return at::cat({R_q, R_k, R_v, r_b.transpose(-1, -2)}, -1);
}

// The last dimension zero-padded to `size`, contiguous.
at::Tensor pad_last_dim(const at::Tensor& tensor, int64_t size) {
  return at::constant_pad_nd(tensor, {0, size - tensor.size(-1)}).contiguous();
}

std::vector<at::Tensor> rec_delta_forward(const at::Tensor& qx, const at::Tensor& kx, const at::Tensor& vx,
                                          const at::Tensor& bx, const at::Tensor& R_q, const at::Tensor& R_k,
                                          const at::Tensor& R_v, const at::Tensor& r_b, const at::Tensor& W0,
                                          const at::Tensor& h0) {
  check_inputs({qx, kx, vx, bx, R_q, R_k, R_v, r_b, W0, h0});
  const int64_t B = qx.size(0), H = qx.size(1), L = qx.size(2), D = qx.size(3);
  at::Tensor out = at::empty({B, H, L, D}, qx.options());
  at::Tensor steps = at::empty({B, H, L, StepLayout{D}.size()}, qx.options());
  at::Tensor ckpt;
  AT_DISPATCH_FLOATING_TYPES(qx.scalar_type(), "rec_delta_forward", [&] {
    using T = scalar_t;
    const Dims dims = dims_of<T>(L, D);
    const at::Tensor R_cat = pad_last_dim(concat_recurrent_weights(R_q, R_k, R_v, r_b), dims.N_pad);
    ckpt = at::empty({B, H, dims.num_chunks, D, dims.D_pad}, qx.options());
    parallel_items<ForwardScratch<T>>(B * H, dims, [&](int64_t i, ForwardScratch<T>& scratch) {
      fwp::dispatch([&](auto width) FWP_LAMBDA_INLINE {
      forward_item<decltype(width)::value, T>(item_ptr<T>(qx, i, L * D), item_ptr<T>(kx, i, L * D), item_ptr<T>(vx, i, L * D),
                      item_ptr<T>(bx, i, L), item_ptr<T>(R_cat, i % H, D * dims.N_pad), item_ptr<T>(W0, i, D * D),
                      item_ptr<T>(h0, i, D), item_ptr<T>(out, i, L * D),
                      item_ptr<T>(steps, i, L * StepLayout{D}.size()),
                      item_ptr<T>(ckpt, i, dims.num_chunks * dims.matrix_size()), dims, scratch);
      });
    });
  });
  return {out, /*saved:*/ out, steps, ckpt};
}

// Backward items come in groups of up to kGroupItems batch elements of one head; each group sums its items' shares
// of the R_cat gradient in its own accumulator.
constexpr int64_t kGroupItems = 8;

std::vector<at::Tensor> rec_delta_backward(const at::Tensor& grad_out, const at::Tensor& qx, const at::Tensor& kx,
                                           const at::Tensor& vx, const at::Tensor& bx, const at::Tensor& R_q,
                                           const at::Tensor& R_k, const at::Tensor& R_v, const at::Tensor& r_b,
                                           const at::Tensor& W0, const at::Tensor& h0,
                                           const std::vector<at::Tensor>& saved) {
  TORCH_CHECK(saved.size() == 3, "rec_delta backward: expected the 3 tensors saved by forward");
  TORCH_CHECK(grad_out.sizes() == qx.sizes() && grad_out.is_contiguous(), "rec_delta backward: bad grad_out");
  const at::Tensor& out = saved[0];
  const at::Tensor& steps = saved[1];
  const at::Tensor& ckpt = saved[2];
  const int64_t B = qx.size(0), H = qx.size(1), L = qx.size(2), D = qx.size(3);
  const int64_t N = 3 * D + 1;
  const int64_t groups_per_head = (B + kGroupItems - 1) / kGroupItems;
  at::Tensor dz = at::empty({B, H, L, N}, qx.options());
  at::Tensor dR_cat;
  AT_DISPATCH_FLOATING_TYPES(qx.scalar_type(), "rec_delta_backward", [&] {
    using T = scalar_t;
    const Dims dims = dims_of<T>(L, D);
    const at::Tensor R_cat_T = pad_last_dim(concat_recurrent_weights(R_q, R_k, R_v, r_b).transpose(-1, -2), dims.D_pad);
    at::Tensor dR_cat_T_groups = at::zeros({groups_per_head, H, N, dims.D_pad}, qx.options());
    parallel_items<BackwardScratch<T>>(H * groups_per_head, dims, [&](int64_t group, BackwardScratch<T>& scratch) {
      const int64_t h = group / groups_per_head, first_b = (group % groups_per_head) * kGroupItems;
      T* dR_cat_T = item_ptr<T>(dR_cat_T_groups, (group % groups_per_head) * H + h, N * dims.D_pad);
      for (int64_t b = first_b; b < std::min(B, first_b + kGroupItems); ++b) {
        const int64_t i = b * H + h;
        fwp::dispatch([&](auto width) FWP_LAMBDA_INLINE {
        backward_item<decltype(width)::value, T>(item_ptr<T>(grad_out, i, L * D), item_ptr<T>(out, i, L * D), item_ptr<T>(h0, i, D),
                         item_ptr<T>(steps, i, L * StepLayout{D}.size()),
                         item_ptr<T>(ckpt, i, dims.num_chunks * dims.matrix_size()),
                         item_ptr<T>(R_cat_T, h, N * dims.D_pad), item_ptr<T>(dz, i, L * N), dR_cat_T, dims, scratch);
        });
      }
    });
    dR_cat = dR_cat_T_groups.sum(0, /*keepdim=*/true).narrow(-1, 0, D).transpose(-1, -2);  // (1, H, D, N)
  });
  return {dz.narrow(-1, 0, D),
          dz.narrow(-1, D, D),
          dz.narrow(-1, 2 * D, D),
          dz.narrow(-1, 3 * D, 1),
          dR_cat.narrow(-1, 0, D).contiguous(),
          dR_cat.narrow(-1, D, D).contiguous(),
          dR_cat.narrow(-1, 2 * D, D).contiguous(),
          dR_cat.narrow(-1, 3 * D, 1).transpose(-1, -2).contiguous()};
}

}  // namespace

// Other dtypes (half, bfloat16) run through the reference; the dispatcher asks here first.
bool rec_delta_supports(const at::Tensor& qx, const at::Tensor& kx, const at::Tensor& vx, const at::Tensor& bx,
                        const at::Tensor& R_q, const at::Tensor& R_k, const at::Tensor& R_v, const at::Tensor& r_b,
                        const at::Tensor& W0, const at::Tensor& h0) {
  return qx.scalar_type() == at::kFloat || qx.scalar_type() == at::kDouble;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("isa", [] { return std::string(fwp::isa_name(fwp::active_isa())); }, "the instruction set the kernels run");
  m.def("supports", &rec_delta_supports, "whether the kernel handles these inputs (float32 and float64 do)");
  m.def("forward", &rec_delta_forward, "Recurrent Delta rule, forward (CPU)");
  m.def("backward", &rec_delta_backward, "Recurrent Delta rule, backward (CPU)");
}
