// Fused CPU kernel of the delta rule (DeltaNet):
//     v_old_t = k_t @ W_{t-1},  d_t = v_t - v_old_t,  u_t = beta_t d_t,
//     W_t = W_{t-1} + outer(k_t, u_t),  out_t = q_t @ W_t,  W_{-1} = W0.
// Each (batch, head) sequence keeps its E x M fast weight in a local buffer (it stays in L1/L2 cache) and is
// processed by one thread; sequences are spread over threads with at::parallel_for.
//
// Backward, with G = dL/dW_s accumulated from the end (s = L-1 ... 0):
//     G += outer(k_{s+1}, dv_old_{s+1});  dk_{s+1} += W_s dv_old_{s+1}       (v_old_{s+1} read W_s)
//     G += outer(q_s, dout_s);            dq_s = W_s dout_s                   (out_s read W_s)
//     du_s = G^T k_s;  dk_s = G u_s;  dv_s = beta_s du_s;  dv_old_s = -beta_s du_s;  dbeta_s = du_s . d_s
// and finally dk_0 += W0 dv_old_0. Every step touches W_s only, so each step is one sweep over W_s and G, and the
// same sweep undoes step s's update (W_{s-1} = W_s - outer(k_s, u_s)) for the next one. Undoing updates over a
// whole sequence would let rounding errors pile up, so the forward saves W every kCheckpointInterval steps (and
// at the end) and the backward restarts from the saved W at every interval: each W it uses is at most 32
// subtractions away from an exactly saved one, an error of the order of the forward's own rounding.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "../fast_transformers/simd_cpu.h"

namespace {

using fwp::AlignedArray;
using fwp::Simd;

// Independent accumulators per row sum: enough to hide the FMA latency, few enough that the sweeps' accumulators
// (three per slot in the backward) and operands fit the register file (16 ymm on AVX2, 32 zmm on AVX-512).
template <typename S>
constexpr int kAccumulators = S::registers == 32 ? 4 : 2;

// Steps between saved fast weights: bounds how many undone updates separate a backward W from a saved one.
constexpr int64_t kCheckpointInterval = 32;

int64_t num_intervals(int64_t length) { return (length + kCheckpointInterval - 1) / kCheckpointInterval; }

// W before each interval, then the final W (the W after each interval is the next one's entry).
int64_t num_checkpoints(int64_t length) { return num_intervals(length) + 1; }

// One sequence (one batch element and head); pointers are at t = 0, time-major rows of E or M values.
template <typename T>
struct DeltaSequence {
  const T *q, *k, *v, *beta, *W0;
  int64_t length, E, M;
};

// Forward outputs of one sequence: out (L x M), d = v - v_old (L x M), checkpoints of W^T (ceil(L/32) + 1, M, E).
template <typename T>
struct DeltaForwardResult {
  T *out, *d, *checkpoints;
};

template <typename T, int Bytes>
struct DeltaForwardWorkspace {
  using S = Simd<T, Bytes>;
  using V = typename S::vec;
  AlignedArray<V> weight, value, update, v_old, result;  // E x Mv fast weight; v_t, u_t, v_old, out_t: Mv each
  DeltaForwardWorkspace(int64_t E, int64_t M)
      : weight(E * S::vectors_for(M)),
        value(S::vectors_for(M)),
        update(S::vectors_for(M)),
        v_old(S::vectors_for(M)),
        result(S::vectors_for(M)) {}
};

// Forward in time. Step t sweeps the columns of W once: it writes the update, reads out_t, and already reads
// v_old for step t+1 from the freshly updated rows. Row sums are split over four accumulators so consecutive
// rows do not wait on each other's add.
template <typename T, int Bytes>
FWP_INLINE void run_delta_forward(const DeltaSequence<T>& s, const DeltaForwardResult<T>& r,
                                  DeltaForwardWorkspace<T, Bytes>& ws) {
  using S = Simd<T, Bytes>;
  using V = typename S::vec;
  constexpr int slots = kAccumulators<S>;
  const int64_t L = s.length, E = s.E, M = s.M, Mv = S::vectors_for(M);
  V *W = ws.weight.data(), *v_t = ws.value.data(), *u_t = ws.update.data(), *v_old = ws.v_old.data();
  V* out_t = ws.result.data();
  if (L == 0) return;
  fwp::load_matrix_padded(s.W0, E, M, M, 1, Mv * S::width, reinterpret_cast<T*>(W));
  for (int64_t j = 0; j < Mv; ++j) {
    V sum = {};
    for (int64_t e = 0; e < E; ++e) sum += s.k[e] * W[e * Mv + j];
    v_old[j] = sum;
  }
  // Saved transposed, the layout the backward works in: the transposition happens here, reading W from L1,
  // instead of as strided reads of main memory in the backward.
  auto save_checkpoint = [&](int64_t index) {
    T* checkpoint = r.checkpoints + index * M * E;
    const T* W_scalars = reinterpret_cast<const T*>(W);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t e = 0; e < E; ++e) checkpoint[m * E + e] = W_scalars[e * Mv * S::width + m];
  };
  for (int64_t t = 0; t < L; ++t) {
    if (t % kCheckpointInterval == 0) save_checkpoint(t / kCheckpointInterval);
    const T *q_t = s.q + t * E, *k_t = s.k + t * E;
    const T* k_next = t + 1 < L ? k_t + E : k_t;  // the last step's look-ahead read is discarded
    const T beta_t = s.beta[t];
    fwp::load_padded(s.v + t * M, M, v_t);
    for (int64_t j = 0; j < Mv; ++j) {
      v_t[j] -= v_old[j];  // now d_t
      u_t[j] = beta_t * v_t[j];
    }
    fwp::store_unpadded(v_t, M, r.d + t * M);
    for (int64_t j = 0; j < Mv; ++j) {
      const V uj = u_t[j];
      V* column = W + j;
      V out_acc[slots] = {}, v_old_acc[slots] = {};
      auto visit_row = [&](int64_t e, int slot) {
        const V row = column[e * Mv] + k_t[e] * uj;
        column[e * Mv] = row;
        out_acc[slot] += q_t[e] * row;
        v_old_acc[slot] += k_next[e] * row;
      };
      int64_t e = 0;
      for (; e + slots <= E; e += slots)
        for (int slot = 0; slot < slots; ++slot) visit_row(e + slot, slot);
      for (; e < E; ++e) visit_row(e, 0);
      out_t[j] = fwp::sum_of<slots>(out_acc);
      v_old[j] = fwp::sum_of<slots>(v_old_acc);
    }
    fwp::store_unpadded(out_t, M, r.out + t * M);
  }
  save_checkpoint(num_intervals(L));
}

// Inputs of the backward of one sequence beyond the forward's: dout and what the forward saved.
template <typename T>
struct DeltaBackwardInputs {
  const T *grad_out, *d, *checkpoints;
};

template <typename T>
struct DeltaGradients {
  T *dq, *dk, *dv, *dbeta;
};

// Backward buffers. Matrices are kept transposed (M rows of E values) so that the E-long results dq and dk are
// row accumulations; only du needs a sum along a row.
template <typename T, int Bytes>
struct DeltaBackwardWorkspace {
  using S = Simd<T, Bytes>;
  using V = typename S::vec;
  int64_t Ev;
  AlignedArray<V> weight;          // W_s^T: M x Ev
  AlignedArray<V> grad_weight;     // G^T: M x Ev
  AlignedArray<V> du_partial;      // per row of G^T, the vector whose lanes sum to du[m]: M
  AlignedArray<V> q_s, k_s, k_next, dq_s, dk_s, dk_next, dk_later;  // Ev each
  AlignedArray<V> d_s, u_s, dv_old, du;                             // Mv each (zero padded)
  DeltaBackwardWorkspace(int64_t E, int64_t M)
      : Ev(S::vectors_for(E)),
        weight(M * Ev),
        grad_weight(M * Ev),
        du_partial(M),
        q_s(Ev), k_s(Ev), k_next(Ev), dq_s(Ev), dk_s(Ev), dk_next(Ev), dk_later(Ev),
        d_s(S::vectors_for(M)), u_s(S::vectors_for(M)), dv_old(S::vectors_for(M)),
        du(S::vectors_for(M)) {}
};

// One reverse step over W_s^T and G^T (see the header), leaving W_{s-1}^T in place of W_s^T. Without `with_step`
// only the first line runs: the final W0 dv_old_0 term of dk_0, where there is no step s = -1.
template <bool with_step, typename T, int Bytes>
FWP_INLINE void backward_sweep(const T* dout_s, DeltaBackwardWorkspace<T, Bytes>& ws, int64_t M) {
  using V = typename Simd<T, Bytes>::vec;
  constexpr int slots = kAccumulators<Simd<T, Bytes>>;
  const int64_t Ev = ws.Ev;
  V *Wt = ws.weight.data(), *Gt = ws.grad_weight.data();
  V* du_partial = ws.du_partial.data();
  const T* dv_old = reinterpret_cast<const T*>(ws.dv_old.data());
  const T* u_s = reinterpret_cast<const T*>(ws.u_s.data());
  if (with_step) std::memset(static_cast<void*>(du_partial), 0, M * sizeof(V));
  for (int64_t j = 0; j < Ev; ++j) {
    const V kn = ws.k_next.data()[j];
    const V qs = with_step ? ws.q_s.data()[j] : V{};
    const V ks = with_step ? ws.k_s.data()[j] : V{};
    V dk_next_acc[slots] = {}, dq_acc[slots] = {}, dk_acc[slots] = {};
    auto visit_row = [&](int64_t m, int slot) {
      const V w = Wt[m * Ev + j];
      V g = Gt[m * Ev + j] + dv_old[m] * kn;
      dk_next_acc[slot] += dv_old[m] * w;
      if (with_step) {
        g += dout_s[m] * qs;
        dq_acc[slot] += dout_s[m] * w;
        dk_acc[slot] += u_s[m] * g;
        du_partial[m] += g * ks;
        Wt[m * Ev + j] = w - u_s[m] * ks;
      }
      Gt[m * Ev + j] = g;
    };
    int64_t m = 0;
    for (; m + slots <= M; m += slots)
      for (int slot = 0; slot < slots; ++slot) visit_row(m + slot, slot);
    for (; m < M; ++m) visit_row(m, 0);
    ws.dk_next.data()[j] = fwp::sum_of<slots>(dk_next_acc);
    if (with_step) {
      ws.dq_s.data()[j] = fwp::sum_of<slots>(dq_acc);
      ws.dk_s.data()[j] = fwp::sum_of<slots>(dk_acc);
    }
  }
  if (with_step) {
    T* du = reinterpret_cast<T*>(ws.du.data());
    for (int64_t i = 0; i < M; ++i) du[i] = fwp::horizontal_sum(du_partial[i]);
  }
}

template <typename T, int Bytes>
FWP_INLINE void run_delta_backward(const DeltaSequence<T>& s, const DeltaBackwardInputs<T>& in,
                                   const DeltaGradients<T>& grads, DeltaBackwardWorkspace<T, Bytes>& ws) {
  using S = Simd<T, Bytes>;
  using V = typename S::vec;
  const int64_t L = s.length, E = s.E, M = s.M, Ev = ws.Ev, Mv = S::vectors_for(M);
  if (L == 0) return;
  std::memset(static_cast<void*>(ws.grad_weight.data()), 0, M * Ev * sizeof(V));
  std::memset(static_cast<void*>(ws.dv_old.data()), 0, Mv * sizeof(V));
  std::memset(static_cast<void*>(ws.du.data()), 0, Mv * sizeof(V));
  std::memset(static_cast<void*>(ws.k_next.data()), 0, Ev * sizeof(V));
  std::memset(static_cast<void*>(ws.dk_later.data()), 0, Ev * sizeof(V));
  auto load_checkpoint = [&](int64_t index) {
    fwp::load_matrix_padded(in.checkpoints + index * M * E, M, E, E, 1, Ev * S::width,
                            reinterpret_cast<T*>(ws.weight.data()));
  };
  // Adds dk_s's part computed at step s (G u_s, in dk_later) to its part computed at step s-1 (W dv_old).
  auto finish_dk = [&](int64_t t) {
    for (int64_t j = 0; j < Ev; ++j) ws.dk_next.data()[j] += ws.dk_later.data()[j];
    fwp::store_unpadded(ws.dk_next.data(), E, grads.dk + t * E);
  };
  // Everything interval c reads; requested one interval ahead of use (the last interval can be short, so the
  // two last ones are requested at the start).
  auto prefetch_interval = [&](int64_t c) {
    const int64_t first = c * kCheckpointInterval, end = std::min(L, first + kCheckpointInterval);
    fwp::prefetch(in.checkpoints, (c + 1) * M * E, (c + 2) * M * E);
    fwp::prefetch(s.q, first * E, end * E);
    fwp::prefetch(s.k, first * E, end * E);
    fwp::prefetch(in.d, first * M, end * M);
    fwp::prefetch(in.grad_out, first * M, end * M);
  };
  prefetch_interval(num_intervals(L) - 1);
  if (num_intervals(L) > 1) prefetch_interval(num_intervals(L) - 2);
  for (int64_t c = num_intervals(L) - 1; c >= 0; --c) {
    const int64_t first = c * kCheckpointInterval, end = std::min(L, first + kCheckpointInterval);
    if (c > 1) prefetch_interval(c - 2);
    load_checkpoint(c + 1);  // W after the interval's last step
    for (int64_t t = end - 1; t >= first; --t) {
      const T beta_t = s.beta[t];
      V *d_s = ws.d_s.data(), *u_s = ws.u_s.data(), *du = ws.du.data(), *dv_old = ws.dv_old.data();
      fwp::load_padded(s.q + t * E, E, ws.q_s.data());
      fwp::load_padded(s.k + t * E, E, ws.k_s.data());
      fwp::load_padded(in.d + t * M, M, d_s);
      for (int64_t j = 0; j < Mv; ++j) u_s[j] = beta_t * d_s[j];  // the forward's u_t, bit for bit
      backward_sweep<true>(in.grad_out + t * M, ws, M);
      if (t + 1 < L) finish_dk(t + 1);
      fwp::store_unpadded(ws.dq_s.data(), E, grads.dq + t * E);
      ws.dk_later.swap(ws.dk_s);
      V dbeta = {};
      for (int64_t j = 0; j < Mv; ++j) {
        dbeta += du[j] * d_s[j];
        dv_old[j] = -beta_t * du[j];
        du[j] *= beta_t;  // now dv_t
      }
      fwp::store_unpadded(du, M, grads.dv + t * M);
      grads.dbeta[t] = fwp::horizontal_sum(dbeta);
      ws.k_next.swap(ws.k_s);
    }
  }
  load_checkpoint(0);  // W0^T, exactly
  backward_sweep<false>(static_cast<const T*>(nullptr), ws, M);
  finish_dk(0);
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                  const at::Tensor& W0) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && beta.dim() == 4 && W0.dim() == 4,
              "delta_net_fn: q, k, v, beta, W0 must be 4-D");
  TORCH_CHECK(k.sizes() == q.sizes(), "delta_net_fn: k must have the shape of q (B, H, L, E)");
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2),
              "delta_net_fn: v must be (B, H, L, M) like q");
  TORCH_CHECK(beta.size(0) == q.size(0) && beta.size(1) == q.size(1) && beta.size(2) == q.size(2) &&
                  beta.size(3) == 1,
              "delta_net_fn: beta must be (B, H, L, 1)");
  TORCH_CHECK(W0.size(0) == q.size(0) && W0.size(1) == q.size(1) && W0.size(2) == q.size(3) &&
                  W0.size(3) == v.size(3),
              "delta_net_fn: W0 must be (B, H, E, M)");
  for (const auto* t : {&k, &v, &beta, &W0})
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "delta_net_fn: all inputs must have the same dtype");
  for (const auto* t : {&q, &k, &v, &beta, &W0})
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), "delta_net_fn: inputs must be contiguous CPU tensors");
}

}  // namespace

// Returns {out, d = v - v_old (B, H, L, M), checkpoints of W^T (B, H, ceil(L/32) + 1, M, E)}.
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& beta, const at::Tensor& W0) {
  check_inputs(q, k, v, beta, W0);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), E = q.size(3), M = v.size(3);
  const int64_t C = num_checkpoints(L);
  auto out = at::empty({B, H, L, M}, q.options());
  auto d = at::empty({B, H, L, M}, q.options());
  auto checkpoints = at::empty({B, H, C, M, E}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "delta_net_forward", [&] {
    const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
    const scalar_t *bp = beta.data_ptr<scalar_t>(), *w0p = W0.data_ptr<scalar_t>();
    scalar_t *outp = out.data_ptr<scalar_t>(), *dp = d.data_ptr<scalar_t>(), *cp = checkpoints.data_ptr<scalar_t>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      fwp::dispatch([&](auto width) FWP_LAMBDA_INLINE {
      DeltaForwardWorkspace<scalar_t, decltype(width)::value> ws(E, M);
      for (int64_t i = begin; i < end; ++i) {
        const DeltaSequence<scalar_t> seq{qp + i * L * E, kp + i * L * E, vp + i * L * M, bp + i * L,
                                          w0p + i * E * M, L, E, M};
        run_delta_forward(seq, DeltaForwardResult<scalar_t>{outp + i * L * M, dp + i * L * M, cp + i * C * E * M},
                          ws);
      }
      });
    });
  });
  return {out, d, checkpoints};
}

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& beta, const at::Tensor& W0,
                                 std::vector<at::Tensor> saved) {
  check_inputs(q, k, v, beta, W0);
  TORCH_CHECK(grad_out.sizes() == v.sizes() && grad_out.is_contiguous() && grad_out.scalar_type() == q.scalar_type(),
              "delta_net_fn: grad_out must be a contiguous (B, H, L, M) tensor of the inputs' dtype");
  TORCH_CHECK(saved.size() == 2, "delta_net_fn: backward expects the two tensors saved by forward");
  const at::Tensor &d = saved[0], &checkpoints = saved[1];
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), E = q.size(3), M = v.size(3);
  const int64_t C = num_checkpoints(L);
  TORCH_CHECK(d.sizes() == v.sizes() && checkpoints.numel() == B * H * C * E * M && d.is_contiguous() &&
                  checkpoints.is_contiguous(),
              "delta_net_fn: saved tensors do not match the inputs");
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v), dbeta = at::empty_like(beta);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "delta_net_backward", [&] {
    const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
    const scalar_t *bp = beta.data_ptr<scalar_t>(), *w0p = W0.data_ptr<scalar_t>();
    const scalar_t *gp = grad_out.data_ptr<scalar_t>(), *dp = d.data_ptr<scalar_t>();
    const scalar_t* cp = checkpoints.data_ptr<scalar_t>();
    scalar_t *dqp = dq.data_ptr<scalar_t>(), *dkp = dk.data_ptr<scalar_t>(), *dvp = dv.data_ptr<scalar_t>();
    scalar_t* dbp = dbeta.data_ptr<scalar_t>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      fwp::dispatch([&](auto width) FWP_LAMBDA_INLINE {
      DeltaBackwardWorkspace<scalar_t, decltype(width)::value> ws(E, M);
      for (int64_t i = begin; i < end; ++i) {
        const DeltaSequence<scalar_t> seq{qp + i * L * E, kp + i * L * E, vp + i * L * M, bp + i * L,
                                          w0p + i * E * M, L, E, M};
        run_delta_backward(seq, DeltaBackwardInputs<scalar_t>{gp + i * L * M, dp + i * L * M, cp + i * C * E * M},
                       DeltaGradients<scalar_t>{dqp + i * L * E, dkp + i * L * E, dvp + i * L * M, dbp + i * L},
                       ws);
      }
      });
    });
  });
  return {dq, dk, dv, dbeta};
}

// Other dtypes (half, bfloat16) run through the reference; the dispatcher asks here first.
bool supports(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
              const at::Tensor& W0) {
  return q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("isa", [] { return std::string(fwp::isa_name(fwp::active_isa())); }, "the instruction set the kernels run");
  m.def("supports", &supports, "whether the kernel handles these inputs (float32 and float64 do)");
  m.def("forward", &forward, "delta-rule fast weight, forward (CPU)");
  m.def("backward", &backward, "delta-rule fast weight, backward (CPU)");
}
