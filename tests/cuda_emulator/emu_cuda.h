// A small CPU emulator for the subset of CUDA that the operator kernels use, so that the kernels can be RUN (not
// only compiled) on a machine without a GPU. emulate.py rewrites a .cu file (launch syntax, extern __shared__,
// CUDA-only headers) and force-includes this header.
//
// Each CUDA thread of a block is a fiber (ucontext) with its own stack, all on one OS thread. A fiber runs until it
// reaches __syncthreads() or a warp shuffle, then yields. Barriers release only when every thread of the block (or
// every lane of the warp) has arrived; anything else is reported as a deadlock (e.g. a shuffle in divergent code or
// a __syncthreads() skipped by some threads). The order in which runnable fibers run is shuffled at every release
// (seeded by EMU_SEED), so a missing barrier changes results from seed to seed. Dynamic shared memory and the
// outputs of at::empty are filled with NaN, so reads of unwritten memory show up as NaN.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <torch/extension.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
typedef int cudaStream_t;
typedef int cudaError_t;
enum { cudaSuccess = 0 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97, cudaDevAttrMaxSharedMemoryPerBlock = 8 };

namespace emu {

inline dim3 g_threadIdx, g_blockIdx, g_blockDim, g_gridDim;

struct Fiber {
  ucontext_t context;
  void* stack = nullptr;
  enum State { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kDone } state = kRunnable;
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = -1;
  std::function<void()> body;
  std::vector<float> shuffle_slots;  // [warp][parity][32]
  std::vector<int> shuffle_parity;   // per thread
  std::vector<double> shuffle_slots_d;
  std::string error;
};

inline Block* g_block = nullptr;
inline char* g_dynamic_smem = nullptr;
inline uint64_t g_launches = 0;

inline int dynamic_smem_limit() {
  const char* env = std::getenv("EMU_SMEM_OPTIN");
  return env ? std::atoi(env) : 232448;  // an H100's opt-in limit per block
}

inline void* dynamic_smem() { return g_dynamic_smem; }

inline void set_current(int tid) {
  g_block->current = tid;
  const unsigned bx = g_blockDim.x, by = g_blockDim.y;
  g_threadIdx = dim3(tid % bx, (tid / bx) % by, tid / (bx * by));
}

inline void yield_to_scheduler() {
  Fiber& self = g_block->fibers[g_block->current];
  swapcontext(&self.context, &g_block->scheduler);
  // Resumed: the scheduler has set the current thread index back to ours.
}

inline void sync_block() {
  g_block->fibers[g_block->current].state = Fiber::kAtBlockBarrier;
  yield_to_scheduler();
}

inline void sync_warp() {
  g_block->fibers[g_block->current].state = Fiber::kAtWarpBarrier;
  yield_to_scheduler();
}

template <typename T>
T shuffle(T value, int source_lane, std::vector<T>& slots) {
  const int tid = g_block->current;
  const int warp = tid / 32, lane = tid % 32;
  int& parity = g_block->shuffle_parity[tid];
  T* slot = slots.data() + (warp * 2 + parity) * 32;
  slot[lane] = value;
  sync_warp();
  const T result = slot[source_lane];
  parity ^= 1;
  return result;
}

inline std::vector<float>& slots_for(float) { return g_block->shuffle_slots; }
inline std::vector<double>& slots_for(double) { return g_block->shuffle_slots_d; }

template <typename T>
T shfl_xor(unsigned mask, T value, int lane_mask, int width) {
  if (mask != 0xffffffffu) g_block->error = "emulator: only full-mask shuffles are supported";
  const int lane = g_block->current % 32;
  int source = lane ^ lane_mask;
  if (source / width != lane / width) source = lane;
  return shuffle(value, source, slots_for(value));
}

template <typename T>
T shfl(unsigned mask, T value, int src, int width) {
  if (mask != 0xffffffffu) g_block->error = "emulator: only full-mask shuffles are supported";
  const int lane = g_block->current % 32;
  const int source = (lane / width) * width + (src % width);
  return shuffle(value, source, slots_for(value));
}

template <typename T>
T shfl_down(unsigned mask, T value, unsigned delta, int width) {
  if (mask != 0xffffffffu) g_block->error = "emulator: only full-mask shuffles are supported";
  const int lane = g_block->current % 32;
  int source = lane + static_cast<int>(delta);
  if (source / width != lane / width) source = lane;
  return shuffle(value, source, slots_for(value));
}

inline void fiber_entry() {
  g_block->body();
  g_block->fibers[g_block->current].state = Fiber::kDone;
  swapcontext(&g_block->fibers[g_block->current].context, &g_block->scheduler);
}

inline std::mt19937& rng() {
  static std::mt19937 generator([] {
    const char* env = std::getenv("EMU_SEED");
    return env ? static_cast<unsigned>(std::atoi(env)) : 1u;
  }());
  return generator;
}

// Runs one block to completion; returns an error message or "".
inline std::string run_block(const std::function<void()>& body, int threads) {
  constexpr size_t kStack = 256 * 1024;
  Block block;
  block.body = body;
  block.fibers.resize(threads);
  const int warps = (threads + 31) / 32;
  block.shuffle_slots.assign(warps * 64, std::numeric_limits<float>::quiet_NaN());
  block.shuffle_slots_d.assign(warps * 64, std::numeric_limits<double>::quiet_NaN());
  block.shuffle_parity.assign(threads, 0);
  g_block = &block;
  for (int t = 0; t < threads; ++t) {
    Fiber& f = block.fibers[t];
    f.stack = std::malloc(kStack);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = kStack;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_entry, 0);
  }
  std::vector<int> order(threads);
  for (int t = 0; t < threads; ++t) order[t] = t;
  std::string error;
  while (true) {
    std::shuffle(order.begin(), order.end(), rng());
    bool ran = false;
    for (int t : order) {
      if (block.fibers[t].state != Fiber::kRunnable) continue;
      set_current(t);
      swapcontext(&block.scheduler, &block.fibers[t].context);
      ran = true;
      if (!block.error.empty()) break;
    }
    if (!block.error.empty()) { error = block.error; break; }
    if (ran) continue;
    // Nobody can run: release a barrier whose participants have all arrived.
    int done = 0, at_block = 0;
    for (const Fiber& f : block.fibers) {
      done += f.state == Fiber::kDone;
      at_block += f.state == Fiber::kAtBlockBarrier;
    }
    if (done == threads) break;
    bool released = false;
    for (int w = 0; w < warps; ++w) {
      const int first = w * 32, last = std::min(threads, first + 32);
      int at_warp = 0;
      for (int t = first; t < last; ++t) at_warp += block.fibers[t].state == Fiber::kAtWarpBarrier;
      if (at_warp == 0) continue;
      if (last - first != 32) { error = "emulator: warp shuffle in a partial warp"; break; }
      if (at_warp == 32) {
        for (int t = first; t < last; ++t) block.fibers[t].state = Fiber::kRunnable;
        released = true;
      }
    }
    if (!error.empty()) break;
    if (released) continue;
    if (at_block == threads) {
      for (Fiber& f : block.fibers) f.state = Fiber::kRunnable;
      continue;
    }
    error = "emulator: deadlock (" + std::to_string(done) + " threads finished, " + std::to_string(at_block) +
            " at __syncthreads, the rest at warp shuffles of divergent warps)";
    break;
  }
  for (Fiber& f : block.fibers) std::free(f.stack);
  g_block = nullptr;
  return error;
}

template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t, Args... args) {
  ++g_launches;
  const int threads = block.x * block.y * block.z;
  TORCH_CHECK(threads >= 1 && threads <= 1024, "emulator: bad block size ", threads);
  TORCH_CHECK(smem_bytes <= static_cast<size_t>(dynamic_smem_limit()), "emulator: ", smem_bytes,
              " bytes of dynamic shared memory exceed the device limit");
  TORCH_CHECK(grid.y <= 65535 && grid.z <= 65535, "emulator: grid too large");
  g_gridDim = grid;
  g_blockDim = block;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        g_blockIdx = dim3(bx, by, bz);
        // The block's shared memory ends at a PROT_NONE page: reading or writing past its end crashes.
        const size_t page = sysconf(_SC_PAGESIZE);
        const size_t bytes = (smem_bytes + 3) / 4 * 4;  // floats: 4-byte alignment suffices
        const size_t span = (bytes + page - 1) / page * page + page;
        char* base = static_cast<char*>(mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
        TORCH_CHECK(base != MAP_FAILED, "emulator: mmap failed");
        mprotect(base + span - page, page, PROT_NONE);
        g_dynamic_smem = base + span - page - bytes;
        float* poison = reinterpret_cast<float*>(g_dynamic_smem);
        for (size_t i = 0; i < bytes / sizeof(float); ++i) poison[i] = std::numeric_limits<float>::quiet_NaN();
        const std::string error = run_block([&] { kernel(args...); }, threads);
        munmap(base, span);
        TORCH_CHECK(error.empty(), error, " in block (", bx, ",", by, ",", bz, ")");
      }
}

inline at::Tensor poisoned(at::Tensor t) {
  if (t.is_floating_point()) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

inline at::Tensor empty(at::IntArrayRef size, at::TensorOptions options = {}) {
  return poisoned(at::empty(size, options));
}
template <typename... Args>
at::Tensor empty_like(Args&&... args) { return poisoned(at::empty_like(std::forward<Args>(args)...)); }

}  // namespace emu

#define threadIdx (::emu::g_threadIdx)
#define blockIdx (::emu::g_blockIdx)
#define blockDim (::emu::g_blockDim)
#define gridDim (::emu::g_gridDim)

inline void __syncthreads() { emu::sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::sync_warp(); }
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) { return emu::shfl_xor(mask, value, lane_mask, width); }
template <typename T>
T __shfl_sync(unsigned mask, T value, int src, int width = 32) { return emu::shfl(mask, value, src, width); }
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) { return emu::shfl_down(mask, value, delta, width); }
template <typename T>
T __ldg(const T* p) { return *p; }
inline float __fdividef(float a, float b) { return a / b; }
using std::max;
using std::min;

inline cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int value) {
  TORCH_CHECK(value <= emu::dynamic_smem_limit(), "emulator: cudaFuncSetAttribute above the device limit");
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F* f, cudaFuncAttribute a, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(f), a, value);
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMaxSharedMemoryPerBlockOptin ? emu::dynamic_smem_limit() : 49152;
  return cudaSuccess;
}
inline const char* cudaGetErrorString(cudaError_t) { return "emulated error"; }

namespace c10 {
namespace cuda {
struct OptionalCUDAGuard {
  template <typename T>
  explicit OptionalCUDAGuard(const T&) {}
};
inline cudaStream_t getCurrentCUDAStream(int = -1) { return 0; }
}  // namespace cuda
}  // namespace c10

#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, "emulated CUDA call failed")
