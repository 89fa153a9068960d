// SIMD helpers shared by the fused CPU kernels of the fast-weight operators (header only, included by source path).
#pragma once

#include <cstdint>
#include <cstring>
#include <new>
#include <utility>

namespace fwp {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// The extensions are built with plain -O3, i.e. for baseline x86-64 (SSE2). These clones add AVX-512 and AVX2+FMA
// versions of the hot loops; the dynamic loader picks the best one for the CPU it runs on.
#define FWP_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FWP_SIMD_CLONES
#endif

// One 64-byte SIMD register's worth of T (GCC vector extension); the compiler splits it where the ISA is narrower.
template <typename T>
struct Simd {
  typedef T vec __attribute__((vector_size(64)));
  static constexpr int64_t width = 64 / sizeof(T);
  static int64_t vectors_for(int64_t n) { return (n + width - 1) / width; }
};

// A heap array of SIMD vectors. std::vector would drop the vector type's 64-byte alignment (GCC ignores
// attributes on template arguments) and the aligned loads would fault.
template <typename V>
class AlignedArray {
 public:
  explicit AlignedArray(int64_t n) : data_(static_cast<V*>(::operator new(n * sizeof(V), std::align_val_t(64)))) {}
  ~AlignedArray() { ::operator delete(data_, std::align_val_t(64)); }
  AlignedArray(const AlignedArray&) = delete;
  AlignedArray& operator=(const AlignedArray&) = delete;
  V* data() const { return data_; }
  void swap(AlignedArray& other) noexcept { std::swap(data_, other.data_); }

 private:
  V* data_;
};

// Helpers called from the cloned kernels must be inlined into them: a separate copy would be built for
// baseline x86-64 only.
#define FWP_INLINE inline __attribute__((always_inline))

// Copies n scalars into whole vectors, zeroing the padding of the last one (zero padding keeps padded lanes out of
// every result). Whole vectors are single unaligned loads; no library calls in the per-step loops.
template <typename T>
FWP_INLINE void load_padded(const T* src, int64_t n, typename Simd<T>::vec* dst) {
  using V = typename Simd<T>::vec;
  const int64_t full = n / Simd<T>::width, rest = n % Simd<T>::width;
  for (int64_t i = 0; i < full; ++i) std::memcpy(static_cast<void*>(dst + i), src + i * Simd<T>::width, sizeof(V));
  if (rest > 0) {
    V last = {};
    for (int64_t r = 0; r < rest; ++r) last[r] = src[full * Simd<T>::width + r];
    dst[full] = last;
  }
}

// Copies the first n scalars of whole vectors out.
template <typename T>
FWP_INLINE void store_unpadded(const typename Simd<T>::vec* src, int64_t n, T* dst) {
  using V = typename Simd<T>::vec;
  const int64_t full = n / Simd<T>::width, rest = n % Simd<T>::width;
  for (int64_t i = 0; i < full; ++i)
    std::memcpy(dst + i * Simd<T>::width, static_cast<const void*>(src + i), sizeof(V));
  for (int64_t r = 0; r < rest; ++r) dst[full * Simd<T>::width + r] = src[full][r];
}

// Copies a rows x cols matrix, element [r][c] read at src[r * row_stride + c * col_stride], into rows of whole
// vectors (zero padded); a transposed view is just swapped strides.
template <typename T>
FWP_INLINE void load_matrix_padded(const T* src, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride,
                               typename Simd<T>::vec* dst) {
  const int64_t vectors_per_row = Simd<T>::vectors_for(cols);
  std::memset(static_cast<void*>(dst), 0, rows * vectors_per_row * sizeof(*dst));
  for (int64_t r = 0; r < rows; ++r) {
    T* row = reinterpret_cast<T*>(dst + r * vectors_per_row);
    for (int64_t c = 0; c < cols; ++c) row[c] = src[r * row_stride + c * col_stride];
  }
}

// Asks for elements [begin, end) of x to be brought into cache ahead of use. Used where the hardware prefetcher
// does not keep up: several short streams read backwards in time.
template <typename T>
FWP_INLINE void prefetch(const T* x, int64_t begin, int64_t end) {
  const char* const stop = reinterpret_cast<const char*>(x + end);
  for (const char* p = reinterpret_cast<const char*>(x + begin); p < stop; p += 64) __builtin_prefetch(p);
}

template <typename T>
FWP_INLINE T horizontal_sum(const typename Simd<T>::vec& x) {
  T sum = 0;
  for (int64_t i = 0; i < Simd<T>::width; ++i) sum += x[i];
  return sum;
}

}  // namespace fwp
