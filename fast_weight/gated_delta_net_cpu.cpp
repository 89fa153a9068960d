// Fused CPU kernel of the gated delta rule (Gated DeltaNet), for one (batch, head) sequence per thread:
//     A_t = alpha_t W_{t-1},  v_old_t = k_t @ A_t,  d_t = v_t - v_old_t,  u_t = beta_t d_t,
//     W_t = A_t + outer(k_t, u_t),  out_t = q_t @ W_t,  W_{-1} = W0.
// fast_weight/reference.py (gated_delta_net_reference) is the specification.
//
// Backward, with G = dL/dW_t accumulated from the end (t = L-1 ... 0):
//     G += outer(q_t, dout_t);  dq_t = W_t dout_t
//     du = G^T k_t;  dk_t = G u_t;  dbeta_t = du . d_t;  dv_t = beta_t du;  dv_old = -beta_t du
//     dA = G + outer(k_t, dv_old);  dk_t += A_t dv_old;  dalpha_t = <dA, W_{t-1}>;  G = alpha_t dA
// The delta kernel undoes each update to walk back in time; here undoing would divide by alpha_t, which grows
// rounding errors without bound as alpha_t -> 0. So the forward saves W every kInterval steps, and the backward
// replays each interval forward from its saved W into a buffer of kInterval + 1 states, then walks it back: one
// extra forward pass, and every W the backward reads is computed exactly as the forward computed it.
// Plain loops over the contiguous value dimension M, vectorised by the compiler (-O3).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kInterval = 32;

int64_t num_intervals(int64_t length) { return (length + kInterval - 1) / kInterval; }

template <typename T>
struct Sequence {
  const T *q, *k, *v, *beta, *alpha;
  int64_t length, E, M;
};

// One step from W_prev (E x M) into W_next (E x M); d (M) receives d_t = v_t - v_old_t.
template <typename T>
inline void step(const Sequence<T>& s, int64_t t, const T* W_prev, T* W_next, T* d) {
  const int64_t E = s.E, M = s.M;
  const T *k_t = s.k + t * E, *v_t = s.v + t * M;
  const T a = s.alpha[t], b = s.beta[t];
  for (int64_t m = 0; m < M; ++m) d[m] = 0;
  for (int64_t e = 0; e < E; ++e) {
    const T* row = W_prev + e * M;
    T* next = W_next + e * M;
    for (int64_t m = 0; m < M; ++m) {
      next[m] = a * row[m];
      d[m] += k_t[e] * next[m];
    }
  }
  for (int64_t m = 0; m < M; ++m) d[m] = v_t[m] - d[m];  // d_t = v_t - v_old_t
  for (int64_t e = 0; e < E; ++e) {
    T* next = W_next + e * M;
    const T ke = k_t[e] * b;
    for (int64_t m = 0; m < M; ++m) next[m] += ke * d[m];
  }
}

template <typename T>
inline void read_out(const T* q_t, const T* W, int64_t E, int64_t M, T* out_t) {
  for (int64_t m = 0; m < M; ++m) out_t[m] = 0;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t m = 0; m < M; ++m) out_t[m] += q_t[e] * W[e * M + m];
}

template <typename T>
void forward_sequence(const Sequence<T>& s, const T* W0, T* out, T* checkpoints) {
  const int64_t E = s.E, M = s.M, L = s.length;
  std::vector<T> W(W0, W0 + E * M), next(E * M), d(M);
  for (int64_t t = 0; t < L; ++t) {
    if (t % kInterval == 0) std::copy(W.begin(), W.end(), checkpoints + (t / kInterval) * E * M);
    step(s, t, W.data(), next.data(), d.data());
    W.swap(next);
    read_out(s.q + t * E, W.data(), E, M, out + t * M);
  }
}

template <typename T>
struct Grads {
  T *q, *k, *v, *beta, *alpha;
};

template <typename T>
void backward_sequence(const Sequence<T>& s, const T* grad_out, const T* checkpoints, const Grads<T>& g) {
  const int64_t E = s.E, M = s.M, L = s.length;
  // The replay keeps each step's state and its d_t = v_t - v_old_t, exactly as the forward computed them.
  std::vector<T> states((kInterval + 1) * E * M), deltas(kInterval * M), G(E * M, 0), du(M), dv_old(M);
  for (int64_t interval = num_intervals(L) - 1; interval >= 0; --interval) {
    const int64_t t0 = interval * kInterval, n = std::min(kInterval, L - t0);
    std::copy(checkpoints + interval * E * M, checkpoints + (interval + 1) * E * M, states.begin());
    for (int64_t i = 0; i < n; ++i) step(s, t0 + i, &states[i * E * M], &states[(i + 1) * E * M], &deltas[i * M]);
    for (int64_t i = n - 1; i >= 0; --i) {
      const int64_t t = t0 + i;
      const T *W_prev = &states[i * E * M], *W_cur = &states[(i + 1) * E * M];
      const T *q_t = s.q + t * E, *k_t = s.k + t * E, *do_t = grad_out + t * M;
      const T a = s.alpha[t], b = s.beta[t];
      T *dq_t = g.q + t * E, *dk_t = g.k + t * E, *dv_t = g.v + t * M;
      // out_t = q_t @ W_t
      for (int64_t e = 0; e < E; ++e) {
        T* G_row = &G[e * M];
        const T* W_row = W_cur + e * M;
        T dq = 0;
        for (int64_t m = 0; m < M; ++m) {
          G_row[m] += q_t[e] * do_t[m];
          dq += W_row[m] * do_t[m];
        }
        dq_t[e] = dq;
      }
      const T* d = &deltas[i * M];
      // W_t = A_t + outer(k_t, u_t), u_t = beta_t d_t
      for (int64_t m = 0; m < M; ++m) du[m] = 0;
      for (int64_t e = 0; e < E; ++e) {
        const T* G_row = &G[e * M];
        T dk = 0;
        for (int64_t m = 0; m < M; ++m) {
          du[m] += G_row[m] * k_t[e];
          dk += G_row[m] * b * d[m];
        }
        dk_t[e] = dk;
      }
      T dbeta = 0;
      for (int64_t m = 0; m < M; ++m) {
        dbeta += du[m] * d[m];
        dv_t[m] = b * du[m];
        dv_old[m] = -b * du[m];
      }
      g.beta[t] = dbeta;
      // v_old_t = k_t @ A_t, A_t = alpha_t W_{t-1}; then G becomes dL/dW_{t-1}
      T dalpha = 0;
      for (int64_t e = 0; e < E; ++e) {
        T* G_row = &G[e * M];
        const T* P_row = W_prev + e * M;
        T dk = 0;
        for (int64_t m = 0; m < M; ++m) {
          dk += P_row[m] * dv_old[m];
          const T dA = G_row[m] + k_t[e] * dv_old[m];
          dalpha += dA * P_row[m];
          G_row[m] = a * dA;
        }
        dk_t[e] += a * dk;
      }
      g.alpha[t] = dalpha;
    }
  }
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                  const at::Tensor& alpha, const at::Tensor& W0) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes(), "gated_delta_net_fn: q and k must be (B, H, L, E)");
  TORCH_CHECK(v.dim() == 4 && v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2),
              "gated_delta_net_fn: v must be (B, H, L, M)");
  for (const at::Tensor* gate : {&beta, &alpha})
    TORCH_CHECK(gate->dim() == 4 && gate->size(0) == q.size(0) && gate->size(1) == q.size(1) &&
                    gate->size(2) == q.size(2) && gate->size(3) == 1,
                "gated_delta_net_fn: beta and alpha must be (B, H, L, 1)");
  TORCH_CHECK(W0.dim() == 4 && W0.size(0) == q.size(0) && W0.size(1) == q.size(1) && W0.size(2) == q.size(3) &&
                  W0.size(3) == v.size(3),
              "gated_delta_net_fn: W0 must be (B, H, E, M)");
  for (const at::Tensor* t : {&q, &k, &v, &beta, &alpha, &W0}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "gated_delta_net_fn: all inputs must have the same dtype");
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(),
                "gated_delta_net_fn: inputs must be contiguous CPU tensors");
  }
}

template <typename T>
Sequence<T> sequence(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                     const at::Tensor& alpha, int64_t index) {
  const int64_t L = q.size(2), E = q.size(3), M = v.size(3);
  return {q.data_ptr<T>() + index * L * E, k.data_ptr<T>() + index * L * E, v.data_ptr<T>() + index * L * M,
          beta.data_ptr<T>() + index * L, alpha.data_ptr<T>() + index * L, L, E, M};
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& beta, const at::Tensor& alpha, const at::Tensor& W0) {
  check_inputs(q, k, v, beta, alpha, W0);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), E = q.size(3), M = v.size(3);
  auto out = at::empty({B, H, L, M}, q.options());
  auto checkpoints = at::empty({B, H, num_intervals(L), E, M}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "gated_delta_net_forward", [&] {
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        forward_sequence(sequence<scalar_t>(q, k, v, beta, alpha, i), W0.data_ptr<scalar_t>() + i * E * M,
                         out.data_ptr<scalar_t>() + i * L * M,
                         checkpoints.data_ptr<scalar_t>() + i * num_intervals(L) * E * M);
    });
  });
  return {out, checkpoints};
}

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& beta, const at::Tensor& alpha,
                                 const at::Tensor& W0, const std::vector<at::Tensor>& saved) {
  check_inputs(q, k, v, beta, alpha, W0);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), E = q.size(3), M = v.size(3);
  TORCH_CHECK(saved.size() == 1, "gated_delta_net_fn: backward expects the checkpoints saved by forward");
  const at::Tensor& checkpoints = saved[0];
  TORCH_CHECK(grad_out.sizes() == v.sizes() && grad_out.is_contiguous() && grad_out.scalar_type() == q.scalar_type(),
              "gated_delta_net_fn: grad_out must be a contiguous (B, H, L, M) tensor of the inputs' dtype");
  TORCH_CHECK(checkpoints.numel() == B * H * num_intervals(L) * E * M && checkpoints.is_contiguous(),
              "gated_delta_net_fn: the saved checkpoints do not fit these inputs");
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  auto dbeta = at::empty_like(beta), dalpha = at::empty_like(alpha);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "gated_delta_net_backward", [&] {
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        Grads<scalar_t> g{dq.data_ptr<scalar_t>() + i * L * E, dk.data_ptr<scalar_t>() + i * L * E,
                          dv.data_ptr<scalar_t>() + i * L * M, dbeta.data_ptr<scalar_t>() + i * L,
                          dalpha.data_ptr<scalar_t>() + i * L};
        backward_sequence(sequence<scalar_t>(q, k, v, beta, alpha, i), grad_out.data_ptr<scalar_t>() + i * L * M,
                          checkpoints.data_ptr<scalar_t>() + i * num_intervals(L) * E * M, g);
      }
    });
  });
  return {dq, dk, dv, dbeta, dalpha};
}

bool supports(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
              const at::Tensor& alpha, const at::Tensor& W0) {
  return q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("supports", &supports, "whether the kernel handles these inputs (float32 and float64 do)");
  m.def("forward", &forward, "gated delta-rule fast weight, forward (CPU)");
  m.def("backward", &backward, "gated delta-rule fast weight, backward (CPU)");
}
