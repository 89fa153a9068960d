// Shared by the Recurrent Delta and SRWM CPU kernels (self_ref_v0_cpu.cpp includes it by relative path):
// element-wise functions that vectorise, padded-matrix helpers, the checkpoints and the backward's rebuild of a
// chunk of transposed matrices, and the parallel loop over items.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <atomic>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

// The one SIMD header of all four CPU kernels: instruction-set dispatch (fwp::dispatch), FWP_INLINE.
#include "../fast_transformers/simd_cpu.h"

namespace fwp_recurrence_cpu {

// ---- Element-wise functions ----------------------------------------------------------------------------------
// exp, tanh and sigmoid written so that loops over them vectorise (libm's are scalar calls and dominated the
// forward pass). Cody-Waite reduction y = n ln2 + r, |r| <= ln2/2, then the Taylor series of expm1(r): within 2 ulp
// of the exact result in float and double. Only arguments <= 0 are needed.
template <typename T>
struct ExpConstants;
template <>
struct ExpConstants<float> {
  using Bits = int32_t;
  static constexpr int kMantissaBits = 23, kExponentBias = 127, kDegree = 7;
  static constexpr float kLowest = -87.0f;  // exp(kLowest) is still a normal float; lower arguments are clamped
  static constexpr float kRoundingShifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  static constexpr float kLn2Hi = 0.693145751953125f, kLn2Lo = 1.428606765330187e-06f;
};
template <>
struct ExpConstants<double> {
  using Bits = int64_t;
  static constexpr int kMantissaBits = 52, kExponentBias = 1023, kDegree = 13;
  static constexpr double kLowest = -708.0;
  static constexpr double kRoundingShifter = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double kLn2Hi = 0.6931471803691238, kLn2Lo = 1.9082149292705877e-10;
};

constexpr double factorial(int n) { return n <= 1 ? 1.0 : n * factorial(n - 1); }

// sum over I <= i <= Last of r^(i-I) / (i+1)!, by Horner's rule (a recursion, not a loop, so that the enclosing
// element-wise loop still vectorises)
template <typename T, int I, int Last>
FWP_INLINE T expm1_series_over_r(T r) {
  constexpr T coefficient = T(1.0 / factorial(I + 1));
  if constexpr (I == Last) {
    return coefficient;
  } else {
    return coefficient + r * expm1_series_over_r<T, I + 1, Last>(r);
  }
}

// For y <= 0: exp(y) = scale * (1 + p), with scale = 2^n returned through `scale` and p = expm1(r) returned.
template <typename T>
FWP_INLINE T expm1_reduced(T y, T& scale) {
  using C = ExpConstants<T>;
  using Bits = typename C::Bits;
  y = y < C::kLowest ? C::kLowest : y;  // written so that NaN passes through
  const T shifted = y * T(1.4426950408889634) + C::kRoundingShifter;
  const T n = shifted - C::kRoundingShifter;
  const T r = (y - n * C::kLn2Hi) - n * C::kLn2Lo;
  // n sits in the low mantissa bits of `shifted`; moving it into the exponent field gives 2^n.
  const T shifter = C::kRoundingShifter;
  Bits shifted_bits, shifter_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof(T));
  std::memcpy(&shifter_bits, &shifter, sizeof(T));
  const Bits scale_bits = (shifted_bits - shifter_bits + C::kExponentBias) << C::kMantissaBits;
  std::memcpy(&scale, &scale_bits, sizeof(T));
  return r * expm1_series_over_r<T, 0, C::kDegree - 1>(r);
}

template <typename T>
FWP_INLINE T exp_nonpositive(T y) {
  T scale;
  const T p = expm1_reduced(y, scale);
  return scale + scale * p;
}

template <typename T>
FWP_INLINE T tanh_vectorisable(T x) {
  T scale;  // tanh|x| = -expm1(-2|x|) / (2 + expm1(-2|x|)): no cancellation for small |x|
  const T p = expm1_reduced(T(-2) * std::abs(x), scale);
  const T em1 = scale * p + (scale - T(1));
  const T t = -em1 / (T(2) + em1);
  return x < 0 ? -t : t;
}

template <typename T>
FWP_INLINE T sigmoid_vectorisable(T x) {
  const T e = exp_nonpositive(-std::abs(x));
  return x >= 0 ? T(1) / (T(1) + e) : e / (T(1) + e);
}

template <typename T>
FWP_INLINE void softmax(const T* z, T* p, int64_t n) {
  T top = z[0];
#pragma omp simd reduction(max : top)
  for (int64_t i = 0; i < n; ++i) top = std::max(top, z[i]);
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    p[i] = exp_nonpositive(z[i] - top);
    sum += p[i];
  }
  const T inv = T(1) / sum;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) p[i] *= inv;
}

template <typename T>
FWP_INLINE T dot(const T* a, const T* b, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// Gradient of softmax at its output p: dz = p * (dp - <p, dp>), written over dp.
template <typename T>
FWP_INLINE void softmax_backward_inplace(const T* p, T* dp, int64_t n) {
  const T centre = dot(p, dp, n);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dp[i] = p[i] * (dp[i] - centre);
}

// ---- Padded matrices and column blocks --------------------------------------------------------------------------
// Matrix rows are padded to whole cache lines (64 bytes), whatever the instruction set; the loops walk them in
// vectors of the instruction set's width (Bytes), which divides 64.
template <typename T>
constexpr int64_t kVector = 64 / sizeof(T);

template <typename T>
int64_t padded(int64_t n) {
  return (n + kVector<T> - 1) / kVector<T> * kVector<T>;
}

// Calls block(first_column, width) over consecutive column blocks covering [0, cols), cols being a multiple of
// kVector<T>. width is a std::integral_constant of at most four vectors of Bytes bytes (two accumulator arrays
// of four ymm registers fit AVX2's 16), so a block's accumulators are a fixed-size array the compiler keeps in
// registers while the block walks down the rows.
template <int Bytes, typename T, typename Block>
FWP_INLINE void for_column_blocks(int64_t cols, Block&& block) {
  constexpr int64_t V = Bytes / sizeof(T);
  int64_t c = 0;
  for (; c + 4 * V <= cols; c += 4 * V) block(c, std::integral_constant<int64_t, 4 * V>{});
  switch ((cols - c) / V) {
    case 3: block(c, std::integral_constant<int64_t, 3 * V>{}); break;
    case 2: block(c, std::integral_constant<int64_t, 2 * V>{}); break;
    case 1: block(c, std::integral_constant<int64_t, V>{}); break;
    default: break;
  }
}

// ---- The recurrence ---------------------------------------------------------------------------------------------
// Steps between checkpoints: as many as the backward's rebuilt matrices fit in kRebuildBytes (half of this
// machine's 2 MB L2; in L3 on CPUs with smaller L2, still read in order). Fewer checkpoints mean less memory to
// allocate and fill in the forward.
constexpr int64_t kRebuildBytes = 1024 * 1024;

inline int64_t chunk_length(int64_t L, int64_t matrix_bytes) {
  return std::clamp<int64_t>(kRebuildBytes / matrix_bytes, 1, std::max<int64_t>(L, 1));
}

// Sizes of one recurrence, shared by forward and backward: L steps; the fast weight W has D rows of W_cols values
// (W_cols = D or N), padded to W_stride; backward rebuilds the transposes of `chunk` consecutive steps' W, each
// W_cols rows of D_pad values. N, N_pad: the operator's wide dimension (Recurrent Delta: the concatenated
// recurrent weights' columns; SRWM: W's columns).
struct Dims {
  int64_t L, D, D_pad, N, N_pad, W_cols, W_stride, chunk, num_chunks;
  template <typename T>
  static Dims of(int64_t L, int64_t D, int64_t N, int64_t W_cols) {
    const int64_t D_pad = padded<T>(D);
    const int64_t chunk = chunk_length(L, W_cols * D_pad * static_cast<int64_t>(sizeof(T)));
    return {L, D, D_pad, N, padded<T>(N), W_cols, padded<T>(W_cols), chunk, (L + chunk - 1) / chunk};
  }
  int64_t matrix_size() const { return D * W_stride; }           // one W (a checkpoint)
  int64_t transposed_size() const { return W_cols * D_pad; }     // one rebuilt transpose
};

// Fills W_T_chunk[0 .. len) with the transposes of the matrices chunk c's steps read: the first is the transposed
// checkpoint, each next one the previous plus the rank-one update of the step before it, W_T[n, e] += u[n] k[e]
// (the forward's update, transposed). Layout describes a step's saved vectors: size(), k() (the offset of k) and
// write_vector(step, u), which must repeat the forward's arithmetic exactly. u (W_cols values) and k_pad (D_pad,
// its padding zero) are scratch.
template <typename Layout, typename T>
FWP_INLINE void rebuild_chunk(const Layout& lay, const T* steps, const T* ckpt, int64_t c, int64_t len,
                              const Dims& dims, T* W_T_chunk, T* u, T* k_pad) {
  const int64_t rows = dims.D, cols = dims.W_cols, w_stride = dims.W_stride, row_pad = dims.D_pad;
  const T* W = ckpt + c * dims.matrix_size();
  for (int64_t n = 0; n < cols; ++n)  // contiguous stores; the strided loads hit the same few lines for a while
    for (int64_t e = 0; e < rows; ++e) W_T_chunk[n * row_pad + e] = W[e * w_stride + n];
  for (int64_t j = 1; j < len; ++j) {
    const T* W_T_before = W_T_chunk + (j - 1) * cols * row_pad;
    T* W_T = W_T_chunk + j * cols * row_pad;
    const T* step = steps + (c * dims.chunk + j - 1) * lay.size();
    lay.write_vector(step, u);
    std::copy(step + lay.k(), step + lay.k() + rows, k_pad);
    for (int64_t n = 0; n < cols; ++n) {
      const T u_n = u[n];
#pragma omp simd
      for (int64_t e = 0; e < row_pad; ++e) W_T[n * row_pad + e] = W_T_before[n * row_pad + e] + u_n * k_pad[e];
    }
  }
}

// Saves W (D rows of W_stride values) as the checkpoint of its chunk when step t starts one.
template <typename T>
FWP_INLINE void save_checkpoint_if_due(const T* W, int64_t t, const Dims& dims, T* ckpt) {
  if (t % dims.chunk == 0) std::copy(W, W + dims.matrix_size(), ckpt + (t / dims.chunk) * dims.matrix_size());
}

// Whole vectors of T in and out of memory at any alignment (single unaligned loads and stores).
template <typename V, typename T>
FWP_INLINE V load_vector(const T* p) {
  V v;
  std::memcpy(static_cast<void*>(&v), p, sizeof(V));
  return v;
}
template <typename V, typename T>
FWP_INLINE void store_vector(T* p, const V& v) {
  std::memcpy(p, static_cast<const void*>(&v), sizeof(V));
}

// The sum of a vector's lanes by halving (log2 of the lanes additions, not one scalar addition per lane).
template <typename T, typename V>
FWP_INLINE T lane_sum(const V& x) {
  if constexpr (sizeof(V) == sizeof(T)) {
    return x[0];
  } else {
    typedef T Half __attribute__((vector_size(sizeof(V) / 2)));
    Half low, high;
    std::memcpy(static_cast<void*>(&low), static_cast<const void*>(&x), sizeof(Half));
    std::memcpy(static_cast<void*>(&high), reinterpret_cast<const char*>(&x) + sizeof(Half), sizeof(Half));
    return lane_sum<T>(low + high);
  }
}

// The update passes below hold a column block's accumulators as an array of n vectors of Bytes bytes (n <= 4,
// see for_column_blocks) in registers; written with vector types and fully unrolled loops because GCC keeps a
// scalar accumulator array that is also read and written through row pointers in memory (on the stack) instead.
#define FWP_FOR_VECTORS(i, n) _Pragma("GCC unroll 4") for (int64_t i = 0; i < (n); ++i)

// y[k] += x[k] @ M for k < K (M: rows x cols, row stride cols, cols a multiple of kVector<T>): K products that share
// their pass over M.
template <int Bytes, int K, typename T>
FWP_INLINE void add_vecs_mat(const T* const (&x)[K], const T* M, int64_t rows, int64_t cols, T* const (&y)[K]) {
  using V = typename fwp::Simd<T, Bytes>::vec;
  constexpr int64_t vw = fwp::Simd<T, Bytes>::width;
  for_column_blocks<Bytes, T>(cols, [&](int64_t c, auto width) FWP_LAMBDA_INLINE {
    constexpr int64_t n = decltype(width)::value / vw;
    V acc[K][n];
    FWP_FOR_VECTORS(k, K) FWP_FOR_VECTORS(i, n) acc[k][i] = load_vector<V>(y[k] + c + i * vw);
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = M + r * cols + c;
      FWP_FOR_VECTORS(i, n) {
        const V m = load_vector<V>(row + i * vw);
        FWP_FOR_VECTORS(k, K) acc[k][i] += x[k][r] * m;
      }
    }
    FWP_FOR_VECTORS(k, K) FWP_FOR_VECTORS(i, n) store_vector(y[k] + c + i * vw, acc[k][i]);
  });
}

template <int Bytes, typename T>
FWP_INLINE void add_vec_mat(const T* x, const T* M, int64_t rows, int64_t cols, T* y) {
  add_vecs_mat<Bytes, 1, T>({x}, M, rows, cols, {y});
}

// The update pass of both forwards: W (rows x cols, row stride cols, cols a multiple of kVector<T>) +=
// outer(k, u), and in the same pass, with the updated W, result = a @ W with a[e] = read_coefficient(e).
template <int Bytes, typename T, typename ReadCoefficient>
FWP_INLINE void update_and_read(T* W, int64_t rows, int64_t cols, const T* k, const T* u,
                                const ReadCoefficient& read_coefficient, T* result) {
  using V = typename fwp::Simd<T, Bytes>::vec;
  constexpr int64_t vw = fwp::Simd<T, Bytes>::width;
  for_column_blocks<Bytes, T>(cols, [&](int64_t c, auto width) FWP_LAMBDA_INLINE {
    constexpr int64_t n = decltype(width)::value / vw;
    V u_v[n], acc[n];
    FWP_FOR_VECTORS(i, n) {
      u_v[i] = load_vector<V>(u + c + i * vw);
      acc[i] = V{};
    }
    for (int64_t e = 0; e < rows; ++e) {
      const T k_e = k[e], a_e = read_coefficient(e);
      T* row = W + e * cols + c;
      FWP_FOR_VECTORS(i, n) {
        const V updated = load_vector<V>(row + i * vw) + k_e * u_v[i];
        store_vector(row + i * vw, updated);
        acc[i] += a_e * updated;
      }
    }
    FWP_FOR_VECTORS(i, n) store_vector(result + c + i * vw, acc[i]);
  });
}

// The backward's walk over time: calls step(t, W_T, step_vectors) for t = L-1 down to 0, W_T being the transpose
// of the W step t reads (rebuilt a chunk at a time into W_T_chunk, see rebuild_chunk) and step_vectors what the
// forward saved for step t.
template <typename Layout, typename T, typename Step>
FWP_INLINE void for_steps_backward(const Layout& lay, const T* steps, const T* ckpt, const Dims& dims, T* W_T_chunk,
                                   T* u, T* k_pad, const Step& step) {
  for (int64_t c = dims.num_chunks - 1; c >= 0; --c) {
    const int64_t first = c * dims.chunk;
    const int64_t len = std::min(dims.chunk, dims.L - first);
    rebuild_chunk(lay, steps, ckpt, c, len, dims, W_T_chunk, u, k_pad);
    for (int64_t j = len - 1; j >= 0; --j) {
      const int64_t t = first + j;
      step(t, static_cast<const T*>(W_T_chunk + j * dims.transposed_size()),
           static_cast<const T*>(steps + t * lay.size()));
    }
  }
}

// The coefficients of row e in update_gradient_and_project.
template <typename T>
struct RowCoefficients {
  T a, b, p;
};

// The pass of both backwards that finishes the gradient w.r.t. a fast weight and projects it: dW (rows x cols,
// row stride cols, cols a multiple of kVector<T>) += outer(a, x) + outer(b, y) with {a[e], b[e], p[e]} =
// coefficients(e); in the same pass, with the updated dW, du = p @ dW and dk[e] = dW[e, :] . u.
template <int Bytes, typename T, typename Coefficients>
FWP_INLINE void update_gradient_and_project(T* dW, int64_t rows, int64_t cols, const Coefficients& coefficients,
                                            const T* x, const T* y, const T* u, T* du, T* dk) {
  using V = typename fwp::Simd<T, Bytes>::vec;
  constexpr int64_t vw = fwp::Simd<T, Bytes>::width;
  std::fill(dk, dk + rows, T(0));
  for_column_blocks<Bytes, T>(cols, [&](int64_t col, auto width) FWP_LAMBDA_INLINE {
    constexpr int64_t n = decltype(width)::value / vw;
    V du_acc[n];
    FWP_FOR_VECTORS(i, n) du_acc[i] = V{};
    for (int64_t e = 0; e < rows; ++e) {
      const RowCoefficients<T> co = coefficients(e);
      T* row = dW + e * cols + col;
      V dk_e = {};
      FWP_FOR_VECTORS(i, n) {
        const int64_t j = col + i * vw;
        const V updated =
            load_vector<V>(row + i * vw) + (co.a * load_vector<V>(x + j) + co.b * load_vector<V>(y + j));
        store_vector(row + i * vw, updated);
        du_acc[i] += co.p * updated;
        dk_e += updated * load_vector<V>(u + j);
      }
      dk[e] += lane_sum<T>(dk_e);
    }
    FWP_FOR_VECTORS(i, n) store_vector(du + col + i * vw, du_acc[i]);
  });
}

// Calls work(i, scratch) for every i in [0, n) on at::parallel_for's threads, each thread with its own Scratch
// (built from scratch_args). Items are handed out one at a time rather than in equal static shares, so a thread
// slowed down by other processes on the machine does not leave the others waiting at the end.
template <typename Scratch, typename ScratchArgs, typename Work>
void parallel_items(int64_t n, const ScratchArgs& scratch_args, const Work& work) {
  std::atomic<int64_t> next_item{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    Scratch scratch(scratch_args);
    for (int64_t i = next_item++; i < n; i = next_item++) work(i, scratch);
  });
}

template <typename T>
T* item_ptr(const at::Tensor& tensor, int64_t item, int64_t item_size) {
  return tensor.data_ptr<T>() + item * item_size;
}

// Checks that every input is a contiguous CPU tensor of the first one's dtype with the expected shape.
inline void check_shapes(const char* op, const std::vector<at::Tensor>& inputs,
                         const std::vector<std::vector<int64_t>>& shapes, const std::vector<const char*>& names) {
  for (size_t i = 0; i < inputs.size(); ++i) {
    TORCH_CHECK(inputs[i].sizes() == at::IntArrayRef(shapes[i]), op, ": ", names[i], " has shape ",
                inputs[i].sizes(), ", expected ", at::IntArrayRef(shapes[i]));
    TORCH_CHECK(inputs[i].device().is_cpu() && inputs[i].is_contiguous(), op, ": ", names[i],
                " must be a contiguous CPU tensor");
    TORCH_CHECK(inputs[i].scalar_type() == inputs[0].scalar_type(), op, ": ", names[i], " has dtype ",
                inputs[i].scalar_type(), ", expected ", inputs[0].scalar_type());
  }
}

}  // namespace fwp_recurrence_cpu
