// Fused CPU kernel of the sum-rule fast weight (linear attention without normalisation):
//     W_t = W_{t-1} + outer(k_t, v_t),  out_t = q_t @ W_t,  W_{-1} = W0.
// Each (batch, head) sequence keeps its E x M fast weight in a local buffer (it stays in L1/L2 cache) and is
// processed by one thread; sequences are spread over threads with at::parallel_for.
//
// The backward needs no saved state: the gradients of a sum-rule fast weight are themselves sum-rule fast weights,
//     dq_t = W_t dout_t            = dout_t @ (W0^T + sum_{s<=t} outer(v_s, k_s))   (forward in time)
//     dv_t = G_t^T k_t             = k_t @ sum_{s>=t} outer(q_s, dout_s)            (backward in time)
//     dk_t = G_t v_t               = v_t @ sum_{s>=t} outer(dout_s, q_s)            (backward in time)
// with G_t = dL/dW_t, so one routine computes all four, exactly (W0 included), without dot products.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "simd_cpu.h"

namespace {

using fwp::AlignedArray;
using fwp::Simd;

// A per-step sequence of vectors: element t is at first + t * step (step < 0 walks backwards in time).
template <typename T>
struct Steps {
  T* first;
  int64_t step;
  T* at(int64_t t) const { return first + t * step; }
};

template <typename T>
Steps<T> forward_in_time(T* base, int64_t dim) { return {base, dim}; }

template <typename T>
Steps<T> backward_in_time(T* base, int64_t length, int64_t dim) { return {base + (length - 1) * dim, -dim}; }

// One sum-rule fast weight over one sequence. W0 (nullptr: zero) is read as W0[e * w0_row + m * w0_col], so a
// transposed view costs nothing.
template <typename T>
struct SumRuleSequence {
  Steps<const T> q, k, v;
  Steps<T> out;
  const T* W0;
  int64_t w0_row, w0_col;
  int64_t length, E, M;
};

// Per-thread buffers, allocated once per parallel chunk (never per step).
template <typename T>
struct SumRuleWorkspace {
  using V = typename Simd<T>::vec;
  AlignedArray<V> weight, value, result;  // E x Mv fast weight (rows padded to whole vectors), v_t, out_t
  explicit SumRuleWorkspace(int64_t max_dim)
      : weight(max_dim * Simd<T>::vectors_for(max_dim)),
        value(Simd<T>::vectors_for(max_dim)),
        result(Simd<T>::vectors_for(max_dim)) {}
};

// The hot loop. Column block j (one vector wide) of W is swept over all rows; each row is updated and read
// in the same visit. The read is a sum over rows, split over four accumulators so consecutive rows do not wait
// on each other's add.
template <typename T>
FWP_INLINE void run_sum_rule(const SumRuleSequence<T>& s, SumRuleWorkspace<T>& ws) {
  using V = typename Simd<T>::vec;
  const int64_t E = s.E, M = s.M, Mv = Simd<T>::vectors_for(M);
  V* W = ws.weight.data();
  if (s.W0 != nullptr)
    fwp::load_matrix_padded(s.W0, E, M, s.w0_row, s.w0_col, W);
  else
    std::memset(static_cast<void*>(W), 0, E * Mv * sizeof(V));
  V* v_t = ws.value.data();
  V* out_t = ws.result.data();
  for (int64_t t = 0; t < s.length; ++t) {
    const T* q_t = s.q.at(t);
    const T* k_t = s.k.at(t);
    fwp::load_padded(s.v.at(t), M, v_t);
    for (int64_t j = 0; j < Mv; ++j) {
      const V vj = v_t[j];
      V* column = W + j;
      V acc[4] = {};
      auto visit_row = [&](int64_t e, V& sum) {
        const V row = column[e * Mv] + k_t[e] * vj;
        column[e * Mv] = row;
        sum += q_t[e] * row;
      };
      int64_t e = 0;
      for (; e + 4 <= E; e += 4)
        for (int r = 0; r < 4; ++r) visit_row(e + r, acc[r]);
      for (; e < E; ++e) visit_row(e, acc[0]);
      out_t[j] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    }
    fwp::store_unpadded(out_t, M, s.out.at(t));
  }
}

FWP_SIMD_CLONES void sum_rule(const SumRuleSequence<float>& s, SumRuleWorkspace<float>& ws) { run_sum_rule(s, ws); }
FWP_SIMD_CLONES void sum_rule(const SumRuleSequence<double>& s, SumRuleWorkspace<double>& ws) { run_sum_rule(s, ws); }

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& W0) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && W0.dim() == 4,
              "fast_weight_sum: q, k, v, W0 must be 4-D (B, H, L, E), (B, H, L, E), (B, H, L, M), (B, H, E, M)");
  TORCH_CHECK(k.sizes() == q.sizes(), "fast_weight_sum: k must have the shape of q");
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2),
              "fast_weight_sum: v must be (B, H, L, M) like q");
  TORCH_CHECK(W0.size(0) == q.size(0) && W0.size(1) == q.size(1) && W0.size(2) == q.size(3) &&
                  W0.size(3) == v.size(3),
              "fast_weight_sum: W0 must be (B, H, E, M)");
  for (const auto* t : {&k, &v, &W0})
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "fast_weight_sum: all inputs must have the same dtype");
  for (const auto* t : {&q, &k, &v, &W0})
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), "fast_weight_sum: inputs must be contiguous CPU tensors");
}

}  // namespace

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& W0) {
  check_inputs(q, k, v, W0);
  const int64_t BH = q.size(0) * q.size(1), L = q.size(2), E = q.size(3), M = v.size(3);
  auto out = at::empty({q.size(0), q.size(1), L, M}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "fast_weight_sum_forward", [&] {
    const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
    const scalar_t* w0p = W0.data_ptr<scalar_t>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
      SumRuleWorkspace<scalar_t> ws(std::max(E, M));
      for (int64_t i = begin; i < end; ++i) {
        const SumRuleSequence<scalar_t> seq{
            forward_in_time(qp + i * L * E, E), forward_in_time(kp + i * L * E, E),
            forward_in_time(vp + i * L * M, M), forward_in_time(outp + i * L * M, M),
            w0p + i * E * M, M, 1, L, E, M};
        sum_rule(seq, ws);
      }
    });
  });
  return {out};
}

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& W0, std::vector<at::Tensor> saved) {
  check_inputs(q, k, v, W0);
  TORCH_CHECK(grad_out.sizes() == v.sizes() && grad_out.is_contiguous() && grad_out.scalar_type() == q.scalar_type(),
              "fast_weight_sum: grad_out must be a contiguous (B, H, L, M) tensor of the inputs' dtype");
  const int64_t BH = q.size(0) * q.size(1), L = q.size(2), E = q.size(3), M = v.size(3);
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "fast_weight_sum_backward", [&] {
    const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
    const scalar_t *w0p = W0.data_ptr<scalar_t>(), *gp = grad_out.data_ptr<scalar_t>();
    scalar_t *dqp = dq.data_ptr<scalar_t>(), *dkp = dk.data_ptr<scalar_t>(), *dvp = dv.data_ptr<scalar_t>();
    at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
      SumRuleWorkspace<scalar_t> ws(std::max(E, M));
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t *qi = qp + i * L * E, *ki = kp + i * L * E, *vi = vp + i * L * M, *gi = gp + i * L * M;
        // dq_t = dout_t @ (W0^T + sum_{s<=t} outer(v_s, k_s))
        sum_rule(SumRuleSequence<scalar_t>{forward_in_time(gi, M), forward_in_time(vi, M), forward_in_time(ki, E),
                                           forward_in_time(dqp + i * L * E, E), w0p + i * E * M, 1, M, L, M, E},
                 ws);
        // dv_t = k_t @ sum_{s>=t} outer(q_s, dout_s)
        sum_rule(SumRuleSequence<scalar_t>{backward_in_time(ki, L, E), backward_in_time(qi, L, E),
                                           backward_in_time(gi, L, M), backward_in_time(dvp + i * L * M, L, M),
                                           nullptr, 0, 0, L, E, M},
                 ws);
        // dk_t = v_t @ sum_{s>=t} outer(dout_s, q_s)
        sum_rule(SumRuleSequence<scalar_t>{backward_in_time(vi, L, M), backward_in_time(gi, L, M),
                                           backward_in_time(qi, L, E), backward_in_time(dkp + i * L * E, L, E),
                                           nullptr, 0, 0, L, M, E},
                 ws);
      }
    });
  });
  return {dq, dk, dv};
}

// Other dtypes (half, bfloat16) run through the reference; the dispatcher asks here first.
bool supports(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& W0) {
  return q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("supports", &supports, "whether the kernel handles these inputs (float32 and float64 do)");
  m.def("forward", &forward, "sum-rule fast weight, forward (CPU)");
  m.def("backward", &backward, "sum-rule fast weight, backward (CPU)");
}
