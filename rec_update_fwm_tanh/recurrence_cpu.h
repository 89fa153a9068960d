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

// Copies one column block to or from an accumulator array. A loop, not std::copy: a library call takes the
// array's address and makes the compiler keep the accumulators in memory instead of registers.
template <int64_t w, typename T>
FWP_INLINE void copy_block(const T* from, T* to) {
#pragma omp simd
  for (int64_t j = 0; j < w; ++j) to[j] = from[j];
}

// y += x @ M for M (rows, cols) with row stride cols
template <int Bytes, typename T>
FWP_INLINE void add_vec_mat(const T* x, const T* M, int64_t rows, int64_t cols, T* y) {
  for_column_blocks<Bytes, T>(cols, [&](int64_t c, auto width) FWP_LAMBDA_INLINE {
    constexpr int64_t w = decltype(width)::value;
    T acc[w];
    copy_block<w>(y + c, acc);
    for (int64_t r = 0; r < rows; ++r) {
      const T x_r = x[r];
      const T* row = M + r * cols + c;
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) acc[j] += x_r * row[j];
    }
    copy_block<w>(acc, y + c);
  });
}

// ---- The recurrence ---------------------------------------------------------------------------------------------
// Steps between checkpoints: as many as the backward's rebuilt matrices fit in kRebuildBytes (half of this
// machine's 2 MB L2; in L3 on CPUs with smaller L2, still read in order). Fewer checkpoints mean less memory to
// allocate and fill in the forward.
constexpr int64_t kRebuildBytes = 1024 * 1024;

inline int64_t chunk_length(int64_t L, int64_t matrix_bytes) {
  return std::clamp<int64_t>(kRebuildBytes / matrix_bytes, 1, std::max<int64_t>(L, 1));
}

// Fills W_T_chunk[0 .. len) with the transposes of the matrices a chunk's steps read: the first is the transposed
// checkpoint W (rows x cols used, row stride w_stride), each next one the previous plus the rank-one update of the
// step before it, W_T[n, e] += u[n] k[e] (the forward's update, transposed). load_step(j, u, k) writes the update
// vectors of the chunk's step j (u: cols values, k: rows values; padding stays zero). Transposed rows have
// row_pad >= rows values.
template <typename T, typename LoadStep>
FWP_INLINE void rebuild_transposed_chunk(const T* W, int64_t rows, int64_t cols, int64_t w_stride, int64_t row_pad,
                                         int64_t len, T* W_T_chunk, T* u, T* k, const LoadStep& load_step) {
  for (int64_t n = 0; n < cols; ++n)  // contiguous stores; the strided loads hit the same few lines for a while
    for (int64_t e = 0; e < rows; ++e) W_T_chunk[n * row_pad + e] = W[e * w_stride + n];
  for (int64_t j = 1; j < len; ++j) {
    const T* W_T_before = W_T_chunk + (j - 1) * cols * row_pad;
    T* W_T = W_T_chunk + j * cols * row_pad;
    load_step(j - 1, u, k);
    for (int64_t n = 0; n < cols; ++n) {
      const T u_n = u[n];
#pragma omp simd
      for (int64_t e = 0; e < row_pad; ++e) W_T[n * row_pad + e] = W_T_before[n * row_pad + e] + u_n * k[e];
    }
  }
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
