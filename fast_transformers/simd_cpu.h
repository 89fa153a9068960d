// SIMD support shared by the fused CPU kernels of all four fast-weight operators (header only, included by source
// path): the instruction-set dispatch, vector types whose width follows the instruction set, and padded-buffer
// helpers.
//
// Why the width is a template parameter: a kernel written for one fixed vector width runs well only where the
// hardware has registers of that width. A 64-byte GCC vector is one register on AVX-512 but two on AVX2, where
// GCC moves the halves (and single lanes) through the stack, and twice as many accumulators no longer fit the 16
// ymm registers. So every kernel is a template on the vector width in bytes, instantiated once per instruction set
// (64 bytes for AVX-512, 32 for AVX2 + FMA, 16 for baseline x86-64), and `dispatch` runs the instance for the
// CPU it finds; register blocking is chosen per instance (see `Simd::registers`).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <type_traits>
#include <utility>

namespace fwp {

// Helpers called from the dispatched kernels must be inlined into them: a separate copy would be compiled for
// baseline x86-64 only (GCC does not inline a function compiled for another target unless forced).
#if defined(__GNUC__)
#define FWP_INLINE inline __attribute__((always_inline))
#define FWP_LAMBDA_INLINE __attribute__((always_inline))
#else
#define FWP_INLINE inline
#define FWP_LAMBDA_INLINE
#endif

// ---- Instruction-set dispatch ---------------------------------------------------------------------------------
enum class Isa { baseline = 0, avx2 = 1, avx512 = 2 };

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "baseline";
  }
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FWP_X86_DISPATCH 1
#endif

// The best instruction set this CPU has, capped by the environment variable FWP_CPU_ISA (avx512, avx2 or
// baseline), which benchmarks use to measure the AVX2 path on an AVX-512 machine. Decided once per process.
inline Isa active_isa() {
  static const Isa isa = [] {
    Isa best = Isa::baseline;
#ifdef FWP_X86_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::avx2;
    if (best == Isa::avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
      best = Isa::avx512;
#endif
    const char* cap = std::getenv("FWP_CPU_ISA");
    if (cap != nullptr) {
      const std::string c(cap);
      if (c == "baseline" || c == "sse2") best = Isa::baseline;
      if ((c == "avx2") && best == Isa::avx512) best = Isa::avx2;
    }
    return best;
  }();
  return isa;
}

template <int Bytes>
using Width = std::integral_constant<int, Bytes>;

#ifdef FWP_X86_DISPATCH
template <typename F>
__attribute__((target("arch=x86-64-v4,prefer-vector-width=512"))) void run_avx512(const F& kernel) {
  kernel(Width<64>{});
}
template <typename F>
__attribute__((target("arch=x86-64-v3"))) void run_avx2(const F& kernel) {
  kernel(Width<32>{});
}
#endif

// Calls kernel(Width<bytes>{}) compiled for the active instruction set. `kernel` must be a generic lambda marked
// FWP_LAMBDA_INLINE whose body (and everything it calls in hot loops) is inlined, so that all of it is compiled for
// that instruction set.
template <typename F>
void dispatch(const F& kernel) {
#ifdef FWP_X86_DISPATCH
  switch (active_isa()) {
    case Isa::avx512: run_avx512(kernel); return;
    case Isa::avx2: run_avx2(kernel); return;
    default: break;
  }
#endif
  kernel(Width<16>{});
}

// ---- Vectors ------------------------------------------------------------------------------------------------
// One SIMD register of T (a GCC vector of Bytes bytes) and how many of them the instruction set has.
template <typename T, int Bytes>
struct Simd {
  typedef T vec __attribute__((vector_size(Bytes)));
  static constexpr int64_t width = Bytes / sizeof(T);
  static constexpr int registers = Bytes == 64 ? 32 : 16;
  static int64_t vectors_for(int64_t n) { return (n + width - 1) / width; }
};

// A heap array, 64-byte aligned. std::vector would drop a vector type's alignment (GCC ignores attributes on
// template arguments) and the aligned loads would fault.
template <typename V>
class AlignedArray {
 public:
  explicit AlignedArray(int64_t n)
      : data_(static_cast<V*>(::operator new((n > 0 ? n : 1) * sizeof(V), std::align_val_t(64)))) {}
  ~AlignedArray() { ::operator delete(data_, std::align_val_t(64)); }
  AlignedArray(const AlignedArray&) = delete;
  AlignedArray& operator=(const AlignedArray&) = delete;
  V* data() const { return data_; }
  void swap(AlignedArray& other) noexcept { std::swap(data_, other.data_); }

 private:
  V* data_;
};

// Copies n scalars into whole vectors, zeroing the padding of the last one (zero padding keeps padded lanes out of
// every result). Whole vectors are single unaligned loads; no library calls in the per-step loops.
template <typename T, typename V>
FWP_INLINE void load_padded(const T* src, int64_t n, V* dst) {
  constexpr int64_t w = sizeof(V) / sizeof(T);
  const int64_t full = n / w, rest = n % w;
  for (int64_t i = 0; i < full; ++i) std::memcpy(static_cast<void*>(dst + i), src + i * w, sizeof(V));
  if (rest > 0) {
    V last = {};
    for (int64_t r = 0; r < rest; ++r) last[r] = src[full * w + r];
    dst[full] = last;
  }
}

// Copies the first n scalars of whole vectors out.
template <typename T, typename V>
FWP_INLINE void store_unpadded(const V* src, int64_t n, T* dst) {
  constexpr int64_t w = sizeof(V) / sizeof(T);
  const int64_t full = n / w, rest = n % w;
  for (int64_t i = 0; i < full; ++i) std::memcpy(dst + i * w, static_cast<const void*>(src + i), sizeof(V));
  const T* last = reinterpret_cast<const T*>(src + full);
  for (int64_t r = 0; r < rest; ++r) dst[full * w + r] = last[r];
}

// Copies a rows x cols matrix, element [r][c] read at src[r * row_stride + c * col_stride], into rows of
// `row_length` scalars (zero padded; row_length >= cols); a transposed view is just swapped strides.
template <typename T>
FWP_INLINE void load_matrix_padded(const T* src, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride,
                                   int64_t row_length, T* dst) {
  std::memset(static_cast<void*>(dst), 0, rows * row_length * sizeof(T));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[r * row_length + c] = src[r * row_stride + c * col_stride];
}

// Asks for elements [begin, end) of x to be brought into cache ahead of use. Used where the hardware prefetcher
// does not keep up: several short streams read backwards in time.
template <typename T>
FWP_INLINE void prefetch(const T* x, int64_t begin, int64_t end) {
  const char* const stop = reinterpret_cast<const char*>(x + end);
  for (const char* p = reinterpret_cast<const char*>(x + begin); p < stop; p += 64) __builtin_prefetch(p);
}

template <typename V>
FWP_INLINE auto horizontal_sum(const V& x) {
  using T = std::remove_cv_t<std::remove_reference_t<decltype(x[0])>>;
  T sum = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(sizeof(V) / sizeof(T)); ++i) sum += x[i];
  return sum;
}

// Pairwise sum of n accumulators (n a compile-time constant), shorter dependency chains than a running sum.
template <int n, typename V>
FWP_INLINE V sum_of(const V* acc) {
  if constexpr (n == 1) {
    return acc[0];
  } else {
    return sum_of<n / 2>(acc) + sum_of<n - n / 2>(acc + n / 2);
  }
}

}  // namespace fwp
