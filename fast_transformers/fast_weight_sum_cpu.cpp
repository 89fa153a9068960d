// Fused CPU kernel of the sum-rule fast weight (linear attention without normalisation):
//     W_t = W_{t-1} + outer(k_t, v_t),  out_t = q_t @ W_t,  W_{-1} = W0.
// Each (batch, head) sequence keeps its E x M fast weight in a local buffer (it stays in L1/L2 cache) and is
// processed by one thread; sequences are spread over threads with at::parallel_for. The time loop is register
// blocked: a tile of W stays in registers while it absorbs the updates of 32 steps and answers their queries.
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

// Per-thread buffers, allocated once per parallel chunk (never per step). Bytes is the vector width of the
// instruction set the kernel is compiled for.
template <typename T, int Bytes>
struct SumRuleWorkspace {
  using S = Simd<T, Bytes>;
  using V = typename S::vec;
  // Register tile: kRows rows x kCols vectors of W stay in registers over kSteps time steps (16 + 6 of the 32
  // zmm registers on AVX-512, 8 + 6 of the 16 ymm registers on AVX2).
  static constexpr int kRows = S::registers == 32 ? 8 : 4;
  static constexpr int kCols = 2;
  static constexpr int64_t kSteps = 32;
  static int64_t padded_rows(int64_t E) { return (E + kRows - 1) / kRows * kRows; }
  AlignedArray<V> weight, values, results;  // padded_rows(E) x Mv fast weight; v_t and out_t of kSteps steps
  AlignedArray<T> keys, queries;            // k_t and q_t of kSteps steps, padded_rows(E) each (zero padded)
  explicit SumRuleWorkspace(int64_t max_dim)
      : weight(padded_rows(max_dim) * S::vectors_for(max_dim)),
        values(kSteps * S::vectors_for(max_dim)),
        results(kSteps * S::vectors_for(max_dim)),
        keys(kSteps * padded_rows(max_dim)),
        queries(kSteps * padded_rows(max_dim)) {}
};

// One register tile of W (rows [e0, e0 + kRows), column vectors [j, j + C)) over n staged time steps: each step
// adds its outer product to the tile and reads the tile with q_t, adding the partial out_t (over these rows) to
// `results`. W is loaded and stored once per kSteps steps instead of once per step, so the loop is bound by the
// FMAs rather than by loads and stores.
template <int C, typename T, int Bytes>
FWP_INLINE void sum_rule_tile(SumRuleWorkspace<T, Bytes>& ws, int64_t e0, int64_t j, int64_t n, int64_t E_pad,
                              int64_t Mv) {
  using V = typename Simd<T, Bytes>::vec;
  constexpr int R = SumRuleWorkspace<T, Bytes>::kRows;
  V* const W = ws.weight.data();
  const V* const values = ws.values.data();
  V* const results = ws.results.data();
  const T* const keys = ws.keys.data();
  const T* const queries = ws.queries.data();
  V w[R][C];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) w[r][c] = W[(e0 + r) * Mv + j + c];
  for (int64_t i = 0; i < n; ++i) {
    const T* const k = keys + i * E_pad + e0;
    const T* const q = queries + i * E_pad + e0;
    V v[C], acc[2][C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) v[c] = values[i * Mv + j + c];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const T k_r = k[r], q_r = q[r];
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) {
        w[r][c] += k_r * v[c];
        if (r < 2)
          acc[r][c] = q_r * w[r][c];
        else
          acc[r % 2][c] += q_r * w[r][c];
      }
    }
    V* const out = results + i * Mv + j;
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) out[c] = (e0 == 0 ? V{} : out[c]) + (acc[0][c] + acc[1][c]);
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) W[(e0 + r) * Mv + j + c] = w[r][c];
}

// The sequence in blocks of kSteps steps: stage the block's vectors (zero padded), sweep W tile by tile, write the
// block's outputs.
template <typename T, int Bytes>
FWP_INLINE void run_sum_rule(const SumRuleSequence<T>& s, SumRuleWorkspace<T, Bytes>& ws) {
  using WS = SumRuleWorkspace<T, Bytes>;
  const int64_t E = s.E, M = s.M, Mv = WS::S::vectors_for(M), E_pad = WS::padded_rows(E);
  T* const W = reinterpret_cast<T*>(ws.weight.data());
  const int64_t row_length = Mv * WS::S::width;
  if (s.W0 != nullptr)
    fwp::load_matrix_padded(s.W0, E, M, s.w0_row, s.w0_col, row_length, W);
  else
    std::memset(static_cast<void*>(W), 0, E * row_length * sizeof(T));
  std::memset(static_cast<void*>(W + E * row_length), 0, (E_pad - E) * row_length * sizeof(T));
  for (int64_t t0 = 0; t0 < s.length; t0 += WS::kSteps) {
    const int64_t n = std::min<int64_t>(WS::kSteps, s.length - t0);
    for (int64_t i = 0; i < n; ++i) {
      const T* const k_t = s.k.at(t0 + i);
      const T* const q_t = s.q.at(t0 + i);
      T* const k = ws.keys.data() + i * E_pad;
      T* const q = ws.queries.data() + i * E_pad;
      for (int64_t e = 0; e < E; ++e) {
        k[e] = k_t[e];
        q[e] = q_t[e];
      }
      for (int64_t e = E; e < E_pad; ++e) k[e] = q[e] = T(0);
      fwp::load_padded(s.v.at(t0 + i), M, ws.values.data() + i * Mv);
    }
    for (int64_t e0 = 0; e0 < E_pad; e0 += WS::kRows) {
      int64_t j = 0;
      for (; j + WS::kCols <= Mv; j += WS::kCols) sum_rule_tile<WS::kCols>(ws, e0, j, n, E_pad, Mv);
      for (; j < Mv; ++j) sum_rule_tile<1>(ws, e0, j, n, E_pad, Mv);
    }
    for (int64_t i = 0; i < n; ++i) fwp::store_unpadded(ws.results.data() + i * Mv, M, s.out.at(t0 + i));
  }
}

// Runs `body(workspace)` with a workspace for the active instruction set; the body is compiled for it.
template <typename T, typename Body>
void with_sum_rule_workspace(int64_t max_dim, const Body& body) {
  fwp::dispatch([&](auto width) FWP_LAMBDA_INLINE {
    SumRuleWorkspace<T, decltype(width)::value> ws(max_dim);
    body(ws);
  });
}

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
      with_sum_rule_workspace<scalar_t>(std::max(E, M), [&](auto& ws) FWP_LAMBDA_INLINE {
      for (int64_t i = begin; i < end; ++i) {
        const SumRuleSequence<scalar_t> seq{
            forward_in_time(qp + i * L * E, E), forward_in_time(kp + i * L * E, E),
            forward_in_time(vp + i * L * M, M), forward_in_time(outp + i * L * M, M),
            w0p + i * E * M, M, 1, L, E, M};
        run_sum_rule(seq, ws);
      }
      });
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
      with_sum_rule_workspace<scalar_t>(std::max(E, M), [&](auto& ws) FWP_LAMBDA_INLINE {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t *qi = qp + i * L * E, *ki = kp + i * L * E, *vi = vp + i * L * M, *gi = gp + i * L * M;
        // dq_t = dout_t @ (W0^T + sum_{s<=t} outer(v_s, k_s))
        run_sum_rule(SumRuleSequence<scalar_t>{forward_in_time(gi, M), forward_in_time(vi, M), forward_in_time(ki, E),
                                           forward_in_time(dqp + i * L * E, E), w0p + i * E * M, 1, M, L, M, E},
                 ws);
        // dv_t = k_t @ sum_{s>=t} outer(q_s, dout_s)
        run_sum_rule(SumRuleSequence<scalar_t>{backward_in_time(ki, L, E), backward_in_time(qi, L, E),
                                           backward_in_time(gi, L, M), backward_in_time(dvp + i * L * M, L, M),
                                           nullptr, 0, 0, L, E, M},
                 ws);
        // dk_t = v_t @ sum_{s>=t} outer(dout_s, q_s)
        run_sum_rule(SumRuleSequence<scalar_t>{backward_in_time(vi, L, M), backward_in_time(gi, L, M),
                                           backward_in_time(qi, L, E), backward_in_time(dkp + i * L * E, L, E),
                                           nullptr, 0, 0, L, M, E},
                 ws);
      }
      });
    });
  });
  return {dq, dk, dv};
}

// Other dtypes (half, bfloat16) run through the reference; the dispatcher asks here first.
bool supports(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& W0) {
  return q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("isa", [] { return std::string(fwp::isa_name(fwp::active_isa())); }, "the instruction set the kernels run");
  m.def("supports", &supports, "whether the kernel handles these inputs (float32 and float64 do)");
  m.def("forward", &forward, "sum-rule fast weight, forward (CPU)");
  m.def("backward", &backward, "sum-rule fast weight, backward (CPU)");
}
