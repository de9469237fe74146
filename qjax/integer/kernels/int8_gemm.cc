// int8 x int8 -> int32 GEMM for XLA:CPU through the typed FFI, with a fused requantization.
//
//   acc[m, n] = sum_k x[m, k] * w[n, k] + offset[n]                        (int32, wraps)
//   q[m, n]   = clamp(Z + rne((f32(acc[m, n]) + bias[n]) * mult[n]), low, hi)   (int8)
//
// with low = max(lo, Z) for a fused ReLU. x is (M, K) row-major, w the
// weights (N, K) row-major, output channel first. The code paths, picked at run time:
//
//   amx       AMX-INT8 tdpbusd on tiles, the vnni path's operands (from 17 rows on; vnni
//             below); amx emulated: the same kernel with its tiles computed in C++ (a check).
//   vnni      AVX-512 VNNI vpdpbusd (u8 x s8): activations carried as x + 128 (xor 0x80), the
//             -128 * sum_k w[n, k] correction folded into the offset; 6 x 64 register tile.
//   avx2      sign-extended to 16 bit, vpmaddwd: exact (no 16-bit saturation as vpmaddubsw).
//   portable  plain C++.
//
// Large M packs w into 16-column panels of 4-byte k groups ([N/16][K/4][16][4]) with its
// column sums; small M (<= 16, QJAX_INT8_SMALL_M) streams w as stored, a dot product per
// (row, channel) pair (on vnni with w + 128 as the unsigned operand, -128 sum_k x[m, k] the
// correction).
// int32 sums wrap modulo 2^32 on every path (uint32 arithmetic), like XLA's int32 dot.
//
// 2-D convolutions (NHWC, valid: the caller pads) are the same GEMM on their patches, with w
// packed per call or pre-packed: on vnni each block of 6 output pixels' patches is gathered
// into L1 just before its tiles (masked loads, flipped to unsigned on the way); avx2 and
// portable gather all patches first. The epilogue alone (qjax_int8_requant_s32) requantizes
// an int32 accumulator computed elsewhere (XLA's convolutions).

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <pthread.h>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(_M_X64)
#define QJAX_X86 1
#include <cpuid.h>
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace ffi = xla::ffi;

namespace {

enum Path : int64_t {
  kAuto = 0, kPortable = 1, kAvx2 = 2, kVnni = 3, kAmx = 4, kAmxEmulated = 5
};

// ------------------------------------------------------------------------------------------
// CPU features: queried once (CPUID is slow in a VM) and cached.

struct Features {
  bool avx2 = false;
  bool vnni512 = false;  // AVX-512 F + BW + VL + VNNI, with the OS saving zmm state
  bool vbmi = false;     // and AVX-512 VBMI (byte permutes: the single-channel convolution)
  // AMX-TILE + AMX-INT8, tile state enabled by the OS and granted to this process (Linux
  // grants it on request: arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA), as XLA asks too; a
  // seccomp filter that refuses the call leaves it false).
  bool amx_int8 = false;
};

Features Detect() {
  Features f;
#ifdef QJAX_X86
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = (c >> 27) & 1, avx = (c >> 28) & 1;
  if (!osxsave || !avx) return f;
  unsigned xlo, xhi;
  __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
  const bool ymm_os = (xlo & 0x6) == 0x6;
  const bool zmm_os = (xlo & 0xE6) == 0xE6;
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = (b >> 5) & 1;
  const bool f512 = (b >> 16) & 1, bw = (b >> 30) & 1, vl = (b >> 31) & 1;
  const bool vnni = (c >> 11) & 1;
  f.avx2 = ymm_os && avx2;
  f.vnni512 = zmm_os && f512 && bw && vl && vnni;
  f.vbmi = f.vnni512 && ((c >> 1) & 1);
  const bool amx_tile = (d >> 24) & 1, amx_int8 = (d >> 25) & 1;
  const bool tiles_os = (xlo & 0x60000) == 0x60000;  // XTILECFG and XTILEDATA
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  f.amx_int8 = amx_tile && amx_int8 && tiles_os &&
               syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  (void)amx_tile, (void)amx_int8, (void)tiles_os;
#endif
#endif
  return f;
}

const Features& Cpu() {
  static const Features f = Detect();
  return f;
}

bool AmxSelfCheck();  // the tile kernel on AMX equals its emulation (below)

// AMX granted, and the tile kernel checked once on this CPU.
bool AmxWorks() {
  static const bool ok = Cpu().amx_int8 && Cpu().vnni512 && AmxSelfCheck();
  return ok;
}

Path Best() {
  if (AmxWorks()) return kAmx;
  if (Cpu().vnni512) return kVnni;
  if (Cpu().avx2) return kAvx2;
  return kPortable;
}

bool Supported(Path p) {
  switch (p) {
    case kPortable: return true;
    case kAvx2: return Cpu().avx2;
    case kVnni: return Cpu().vnni512;
    case kAmx: return AmxWorks();
    // The AMX kernel with its tile instructions computed in C++: needs only AVX-512.
    case kAmxEmulated: return Cpu().vnni512;
    default: return false;
  }
}

// Paths that run the AVX-512 code (the AMX paths use it below 16 rows and for the epilogue).
bool Avx512(Path p) { return p == kVnni || p == kAmx || p == kAmxEmulated; }
bool Tiles(Path p) { return p == kAmx || p == kAmxEmulated; }

#ifdef QJAX_X86
// The first min(left, 16) lanes of a 16-lane vector (left >= 0).
inline __mmask16 Lanes16(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}
#endif

// ------------------------------------------------------------------------------------------
// Threads: [0, tasks) in blocks that the calling thread and a pool of workers (started once:
// starting a thread cost ~140 us in a VM) claim from an atomic counter, so that a worker that
// wakes late takes fewer blocks instead of delaying the call. Workers spin kSpinMicros for
// the next job before they sleep: enough for the next layer of the same model, short enough
// not to take a core from what runs between calls (spinning 100 us, the MNIST MLP int8 apply
// at batch 64 took 0.17 ms a call, median; 20 us: 0.11 ms; batch 256: 0.27 -> 0.23 ms;
// LeNet-5 at 256: 3.4 -> 3.1 ms, interleaved in one process). The pool serves
// one call at a time: a second caller meanwhile runs its blocks on its own thread. The
// workers are never joined (they would block process exit); a forked child starts a pool of
// its own.

constexpr int kSpinMicros = 20;

inline void Relax() {
#ifdef QJAX_X86
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// Spins until done() or about `micros` have passed; whether done() held.
template <class F>
bool SpinUntil(const F& done, int micros) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(micros);
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (done()) return true;
      Relax();
    }
    if (std::chrono::steady_clock::now() >= until) return done();
  }
}

class Pool {
 public:
  explicit Pool(int workers) : size_(workers) {
    for (int i = 0; i < workers; ++i) std::thread([this] { Work(); }).detach();
  }

  int size() const { return size_; }

  // fn(begin, end) over [0, tasks) in blocks of `grain`; false (nothing run) when busy.
  bool Run(int64_t tasks, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    std::unique_lock<std::mutex> busy(run_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    fn_ = &fn;
    tasks_ = tasks;
    grain_ = grain;
    next_.store(0);
    closed_.store(false);
    {
      std::lock_guard<std::mutex> lock(mu_);
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    Drain();
    closed_.store(true);  // late workers skip the job; the ones inside are waited for
    if (!SpinUntil([this] { return active_.load() == 0; }, 200)) {
      std::unique_lock<std::mutex> lock(mu_);
      done_.wait(lock, [this] { return active_.load() == 0; });
    }
    return true;
  }

 private:
  void Drain() {
    for (;;) {
      const int64_t begin = next_.fetch_add(1) * grain_;
      if (begin >= tasks_) return;
      (*fn_)(begin, std::min(tasks_, begin + grain_));
    }
  }

  void Work() {
    uint64_t seen = generation_.load();
    for (;;) {
      if (!SpinUntil([&] { return generation_.load() != seen; }, kSpinMicros)) {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return generation_.load() != seen; });
      }
      seen = generation_.load();
      active_.fetch_add(1);
      if (!closed_.load() && generation_.load() == seen) Drain();
      if (active_.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> lock(mu_);
        done_.notify_all();
      }
    }
  }

  const int size_;
  std::mutex run_, mu_;
  std::condition_variable wake_, done_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> next_{0};
  std::atomic<int> active_{0};
  std::atomic<bool> closed_{true};
  // The job: written by Run before `closed_` opens it, read by workers after.
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t tasks_ = 0, grain_ = 1;
};

std::atomic<Pool*> g_pool{nullptr};
std::mutex g_pool_mu;

int HardwareThreads() {
  static const int hw = [] {
    const char* env = std::getenv("QJAX_INT8_THREADS");
    if (env && std::atoi(env) > 0) return std::atoi(env);
    const unsigned n = std::thread::hardware_concurrency();
    return n == 0 ? 1 : static_cast<int>(std::min(n, 64u));
  }();
  return hw;
}

Pool* GetPool() {
  Pool* pool = g_pool.load(std::memory_order_acquire);
  if (pool) return pool;
  std::lock_guard<std::mutex> lock(g_pool_mu);
  pool = g_pool.load(std::memory_order_relaxed);
  if (!pool) {
    static const bool registered = [] {
      // The child of a fork has none of the workers: it starts its own pool.
      pthread_atfork(nullptr, nullptr, [] { g_pool.store(nullptr); });
      return true;
    }();
    (void)registered;
    pool = new Pool(HardwareThreads() - 1);  // never deleted: the workers outlive exit
    g_pool.store(pool, std::memory_order_release);
  }
  return pool;
}

// XLA's intra-op pool (the threads that run XLA's own thunks) while a handler runs (every
// handler is bound through OnXlaPool): ParallelFor hands its blocks there, and to our own
// pool only where XLA gives none. Two pools on the same cores fight: XLA's idle workers spin
// for the next thunk while ours want the core. A QAT step of the MNIST MLP on a 2-core Xeon
// spent 530 us of CPU a step on the calling thread and our worker, 375 us on XLA's pool
// (its step 1.03-1.04x -> 1.02-1.03x the float step); inference and single GEMMs (their
// programs mostly our calls) ran the same.
thread_local ffi::ThreadPool* tls_xla_pool = nullptr;

template <auto F>
struct OnXlaPool;

template <typename... A, ffi::Error (*F)(A...)>
struct OnXlaPool<F> {
  static ffi::Error Call(ffi::ThreadPool pool, A... args) {
    ffi::ThreadPool* const outer = tls_xla_pool;
    tls_xla_pool = &pool;
    ffi::Error result = F(std::move(args)...);
    tls_xla_pool = outer;
    return result;
  }
};

// A job on XLA's pool: helpers that start after the caller drained every block leave at
// once (the shared state outlives the call; `fn` is touched only while the caller waits).
struct XlaJob {
  std::atomic<int64_t> next{0};
  std::atomic<int> active{0};
  std::atomic<bool> closed{false};
  int64_t tasks = 0, grain = 1;
  const std::function<void(int64_t, int64_t)>* fn = nullptr;

  void Drain() {
    for (;;) {
      const int64_t begin = next.fetch_add(1) * grain;
      if (begin >= tasks) return;
      (*fn)(begin, std::min(tasks, begin + grain));
    }
  }
};

bool RunOnXlaPool(int64_t tasks, int64_t grain, int threads,
                  const std::function<void(int64_t, int64_t)>& fn) {
  ffi::ThreadPool* const pool = tls_xla_pool;
  if (pool == nullptr) return false;
  const int64_t helpers = std::min<int64_t>(threads - 1, pool->num_threads());
  if (helpers <= 0) return false;
  auto job = std::make_shared<XlaJob>();
  job->tasks = tasks, job->grain = grain, job->fn = &fn;
  for (int64_t i = 0; i < helpers; ++i) {
    pool->Schedule([job] {
      job->active.fetch_add(1);
      if (!job->closed.load()) job->Drain();
      job->active.fetch_sub(1);
    });
  }
  job->Drain();
  job->closed.store(true);
  // A helper still inside a block: spin a little, then yield (it may need this core).
  for (int spins = 0; job->active.load() != 0; ++spins) {
    if (spins < 4096) {
      Relax();
    } else {
      std::this_thread::yield();
    }
  }
  return true;
}

template <class F>
void ParallelFor(int64_t tasks, int threads, const F& fn) {
  if (tasks <= 0) return;
  threads = static_cast<int>(std::min<int64_t>(threads, tasks));
  if (threads <= 1) {
    fn(0, tasks);
    return;
  }
  // About four blocks per thread: a late or preempted thread leaves its share to the others.
  const int64_t grain = std::max<int64_t>(1, tasks / (4 * threads));
  const std::function<void(int64_t, int64_t)> call = [&fn](int64_t b, int64_t e) { fn(b, e); };
  if (RunOnXlaPool(tasks, grain, threads, call)) return;
  Pool* pool = GetPool();
  threads = std::min(threads, pool->size() + 1);
  if (threads <= 1 || !pool->Run(tasks, std::max<int64_t>(1, tasks / (4 * threads)), call)) {
    fn(0, tasks);
  }
}

int ThreadsFor(int64_t macs, int64_t requested) {
  if (requested > 0) return static_cast<int>(requested);
  // Below ~2M multiply-adds (~12 us on one core) even spinning workers save too little (64 x
  // 784 x 100, 5M: 236 GOP/s on one thread, 258-270 on two).
  if (macs < (int64_t{1} << 21)) return 1;
  return HardwareThreads();
}

// ------------------------------------------------------------------------------------------
// The epilogue: offset, then int32, or a requantization to int8: the float one (fbgemm's,
// bias and multiplier) or the integer one (qjax.integer.IntegerRequant, m0 and shift):
//
//   float    q = clamp(Z + rne((f32(a) + bias[n]) * mult[n]), low, hi)
//   integer  q = clamp(Z + floor((a * m0[n] + 2^(shift[n] - 1)) / 2^shift[n]), low, hi)
//
// with a = acc + offset (int32, wrapping), the integer product exact in 64 bits (|a m0| <
// 2^62, shift in [1, 62]).

struct Epilogue {
  const int32_t* offset = nullptr;  // (N,) or null; the vnni path passes its folded offsets
  const float* bias = nullptr;      // (N,): the float requantization
  const float* mult = nullptr;      // (N,)
  const int32_t* m0 = nullptr;      // (N,): the integer requantization
  const int32_t* shift = nullptr;   // (N,)
  int32_t zp = 0;
  float lo_f = 0, hi_f = 0;  // low - Z, hi - Z
  int32_t lo_q = 0, hi_q = 0;  // the same as integers
  int32_t q_nan = 0;         // what a NaN requantizes to (XLA converts NaN to 0, then clamps)
  int32_t* out32 = nullptr;
  int8_t* out8 = nullptr;
  int64_t ldo = 0;  // row stride of the output (N)
};

// int32 results: neither requantization.
inline bool Int32Out(const Epilogue& e) { return !e.bias && !e.m0; }

inline int32_t Wrap(int64_t v) { return static_cast<int32_t>(static_cast<uint32_t>(v)); }

// The integer requantization of a (offset added) for multiplier m0 and shift r, Z added.
inline int32_t IntegerQ(const Epilogue& e, int32_t a, int32_t m0, int32_t r) {
  const int64_t p = int64_t{a} * m0 + (int64_t{1} << (r - 1));
  const int64_t t = p >> r;  // arithmetic: floor
  return static_cast<int32_t>(std::min<int64_t>(std::max<int64_t>(t, e.lo_q), e.hi_q)) + e.zp;
}

inline void ScalarEpilogue(const Epilogue& e, int64_t m, int64_t n, int32_t acc) {
  const int32_t a = e.offset ? Wrap(static_cast<int64_t>(static_cast<uint32_t>(acc)) +
                                    static_cast<uint32_t>(e.offset[n]))
                             : acc;
  if (Int32Out(e)) {
    e.out32[m * e.ldo + n] = a;
    return;
  }
  if (e.m0) {
    e.out8[m * e.ldo + n] = static_cast<int8_t>(IntegerQ(e, a, e.m0[n], e.shift[n]));
    return;
  }
  float y = (static_cast<float>(a) + e.bias[n]) * e.mult[n];  // two roundings (no FMA)
  int32_t q;
  if (std::isnan(y)) {
    q = e.q_nan;
  } else {
    y = y < e.lo_f ? e.lo_f : (y > e.hi_f ? e.hi_f : y);
    q = static_cast<int32_t>(std::nearbyint(y));  // round half to even
  }
  e.out8[m * e.ldo + n] = static_cast<int8_t>(q + e.zp);
}

// ------------------------------------------------------------------------------------------
// Portable path.

void PortableRows(const int8_t* x, const int8_t* w, int64_t K, int64_t m0, int64_t m1,
                  int64_t n0, int64_t n1, const Epilogue& e) {
  for (int64_t m = m0; m < m1; ++m) {
    const int8_t* xr = x + m * K;
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* wr = w + n * K;
      uint32_t acc = 0;
      for (int64_t k = 0; k < K; ++k) {
        acc += static_cast<uint32_t>(static_cast<int32_t>(xr[k]) * static_cast<int32_t>(wr[k]));
      }
      ScalarEpilogue(e, m, n, static_cast<int32_t>(acc));
    }
  }
}

void RunPortable(const int8_t* x, const int8_t* w, int64_t M, int64_t N, int64_t K,
                 const Epilogue& e, int threads) {
  // Blocks of 64 channels, so that a block of w stays in cache across the rows.
  const int64_t nb = (N + 63) / 64;
  ParallelFor(nb, threads, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      PortableRows(x, w, K, 0, M, b * 64, std::min(N, b * 64 + 64), e);
    }
  });
}

// The portable GEMM on weights packed as PackPanels lays them out (pre-packed by the caller).
void RunPortablePanels(const int8_t* x, const int8_t* packed, int64_t M, int64_t N, int64_t K,
                       const Epilogue& e, int threads) {
  const int64_t Kp = (K + 3) / 4 * 4, groups = Kp / 4, panels = (N + 15) / 16;
  ParallelFor(panels, threads, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int8_t* panel = packed + p * groups * 64;
      const int64_t cols = std::min<int64_t>(16, N - p * 16);
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* xr = x + m * K;
        uint32_t acc[16] = {0};
        for (int64_t g = 0; g < groups; ++g) {
          for (int64_t j = 0; j < 4; ++j) {
            const int64_t k = g * 4 + j;
            if (k >= K) break;
            const int32_t xv = xr[k];
            for (int64_t c = 0; c < 16; ++c) {
              acc[c] += static_cast<uint32_t>(xv * static_cast<int32_t>(panel[g * 64 + c * 4 + j]));
            }
          }
        }
        for (int64_t c = 0; c < cols; ++c) {
          ScalarEpilogue(e, m, p * 16 + c, static_cast<int32_t>(acc[c]));
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------
// Scratch buffers, reused across calls (one set per calling thread).

struct Scratch {
  std::vector<uint8_t> bytes;
  void* Get(size_t n) {
    if (bytes.size() < n + 64) bytes.resize(n + 64);
    const uintptr_t p = reinterpret_cast<uintptr_t>(bytes.data());
    return reinterpret_cast<void*>((p + 63) & ~uintptr_t{63});
  }
};

thread_local Scratch tls_wpack, tls_xpack, tls_misc, tls_sums, tls_xrows, tls_patches;

// Packs w (N, K) into [N/16][Kp/4][16][4] (zero padded) and returns the column sums.
void PackPanels(const int8_t* w, int64_t N, int64_t K, int64_t Kp, int8_t* packed,
                int32_t* colsum, int threads) {
  const int64_t panels = (N + 15) / 16, groups = Kp / 4;
  ParallelFor(panels, threads, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      int8_t* dst = packed + p * groups * 64;
      for (int64_t c = 0; c < 16; ++c) {
        const int64_t n = p * 16 + c;
        int32_t s = 0;
        if (n < N) {
          const int8_t* src = w + n * K;
          int64_t g = 0;
          for (; g * 4 + 4 <= K; ++g) {
            std::memcpy(dst + g * 64 + c * 4, src + g * 4, 4);
          }
          for (; g < groups; ++g) {
            for (int64_t j = 0; j < 4; ++j) {
              const int64_t k = g * 4 + j;
              dst[g * 64 + c * 4 + j] = k < K ? src[k] : 0;
            }
          }
          for (int64_t k = 0; k < K; ++k) s += src[k];
          colsum[n] = s;
        } else {
          for (int64_t g = 0; g < groups; ++g) std::memset(dst + g * 64 + c * 4, 0, 4);
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------
// 2-D convolutions, NHWC, valid (the caller pads): the GEMM of their patches,
//
//   acc[b, oh, ow, n] = sum_{i, j, c} x[b, oh * SH + i * DH, ow * SW + j * DW, c] w[n, (i, j, c)]
//
// with w (N, KH * KW * C) (an HWIO kernel reshaped to (-1, N), transposed). Row m = (b, oh, ow)
// of the patch matrix is gathered when its block of rows is needed (vnni), or all of them
// first (avx2, portable).

struct ConvGeom {
  int64_t B = 0, H = 0, W = 0, C = 0, KH = 1, KW = 1, SH = 1, SW = 1, DH = 1, DW = 1;
  int64_t OH = 0, OW = 0;
  int64_t K() const { return KH * KW * C; }
  int64_t M() const { return B * OH * OW; }
};

// The first input byte of output pixel m's window, and a walk over the pixels from there
// (integer division once per block of rows, not per row).
struct PixelWalk {
  const ConvGeom& g;
  int64_t b, oh, ow;
  PixelWalk(const ConvGeom& geom, int64_t m) : g(geom) {
    ow = m % g.OW;
    const int64_t t = m / g.OW;
    oh = t % g.OH;
    b = t / g.OH;
  }
  const int8_t* Base(const int8_t* x) const {
    return x + ((b * g.H + oh * g.SH) * g.W + ow * g.SW) * g.C;
  }
  void Next() {
    if (++ow == g.OW) {
      ow = 0;
      if (++oh == g.OH) {
        oh = 0;
        ++b;
      }
    }
  }
};

// Row of the patch matrix (K bytes in (i, j, c) order) whose window starts at base, into dst.
inline void PatchRow(const int8_t* base, const ConvGeom& g, int8_t* dst) {
  if (g.DW == 1) {  // a window row is KW * C contiguous bytes
    const int64_t run = g.KW * g.C;
    for (int64_t i = 0; i < g.KH; ++i, dst += run) {
      std::memcpy(dst, base + i * g.DH * g.W * g.C, static_cast<size_t>(run));
    }
    return;
  }
  for (int64_t i = 0; i < g.KH; ++i) {
    for (int64_t j = 0; j < g.KW; ++j, dst += g.C) {
      std::memcpy(dst, base + (i * g.DH * g.W + j * g.DW) * g.C, static_cast<size_t>(g.C));
    }
  }
}

// All M rows of the patch matrix, (M, K) row-major.
void Im2Col(const int8_t* x, const ConvGeom& g, int8_t* out, int threads) {
  const int64_t K = g.K();
  ParallelFor(g.M(), threads, [&](int64_t m0, int64_t m1) {
    PixelWalk at(g, m0);
    for (int64_t m = m0; m < m1; ++m, at.Next()) PatchRow(at.Base(x), g, out + m * K);
  });
}

#ifdef QJAX_X86

// ------------------------------------------------------------------------------------------
// AVX-512 VNNI path.

// Each section is compiled for its instruction set (lambdas inside included); the file's
// baseline stays x86-64, so that only the path the CPU supports ever runs.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq")

// IntegerQ on 16 lanes: the 64-bit products of the even and the odd lanes apart.
inline __m512i IntegerQ16(const Epilogue& e, __m512i a, __m512i m0, __m512i shift) {
  const __m512i one = _mm512_set1_epi64(1), low32 = _mm512_set1_epi64(0xFFFFFFFF);
  const __m512i lo = _mm512_set1_epi64(e.lo_q), hi = _mm512_set1_epi64(e.hi_q);
  const auto half = [&](__m512i av, __m512i mv, __m512i r) {
    const __m512i p = _mm512_add_epi64(_mm512_mul_epi32(av, mv),
                                       _mm512_sllv_epi64(one, _mm512_sub_epi64(r, one)));
    return _mm512_min_epi64(_mm512_max_epi64(_mm512_srav_epi64(p, r), lo), hi);
  };
  const __m512i even = half(a, m0, _mm512_and_si512(shift, low32));
  const __m512i odd = half(_mm512_srli_epi64(a, 32), _mm512_srli_epi64(m0, 32),
                           _mm512_srli_epi64(shift, 32));
  const __m512i q = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  return _mm512_add_epi32(q, _mm512_set1_epi32(e.zp));
}

// The float requantization on 16 lanes, Z added.
inline __m512i FloatQ16(const Epilogue& e, __m512i a, __m512 bias, __m512 mult) {
  const __m512 y = _mm512_mul_ps(_mm512_add_ps(_mm512_cvtepi32_ps(a), bias), mult);
  const __mmask16 nan = _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
  const __m512 c = _mm512_min_ps(_mm512_max_ps(y, _mm512_set1_ps(e.lo_f)),
                                 _mm512_set1_ps(e.hi_f));
  __m512i q = _mm512_cvt_roundps_epi32(c, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  q = _mm512_mask_mov_epi32(q, nan, _mm512_set1_epi32(e.q_nan));
  return _mm512_add_epi32(q, _mm512_set1_epi32(e.zp));
}

inline void Epilogue16(const Epilogue& e, int64_t m, int64_t n, __m512i acc,
                                 __mmask16 valid) {
  if (e.offset) acc = _mm512_add_epi32(acc, _mm512_maskz_loadu_epi32(valid, e.offset + n));
  if (Int32Out(e)) {
    _mm512_mask_storeu_epi32(e.out32 + m * e.ldo + n, valid, acc);
    return;
  }
  if (e.m0) {  // lanes beyond `valid`: m0 = shift = 0, never stored
    const __m512i q = IntegerQ16(e, acc, _mm512_maskz_loadu_epi32(valid, e.m0 + n),
                                 _mm512_maskz_loadu_epi32(valid, e.shift + n));
    _mm_mask_storeu_epi8(e.out8 + m * e.ldo + n, valid, _mm512_cvtepi32_epi8(q));
    return;
  }
  const __m512i q = FloatQ16(e, acc, _mm512_maskz_loadu_ps(valid, e.bias + n),
                             _mm512_maskz_loadu_ps(valid, e.mult + n));
  _mm_mask_storeu_epi8(e.out8 + m * e.ldo + n, valid, _mm512_cvtepi32_epi8(q));
}

// Epilogue16 on rows m..m + MR - 1 of one block of 16 columns: the columns' offsets and
// requantizer loaded once. Called with a local copy of the Epilogue, whose fields then stay in
// registers (the int8 stores could alias the fields of a struct behind a reference).
template <int MR>
inline __attribute__((always_inline)) void EpilogueColumn(const Epilogue& e, int64_t m,
                                                          int64_t n, __m512i (&acc)[MR],
                                                          __mmask16 valid) {
  if (e.offset) {
    const __m512i off = _mm512_maskz_loadu_epi32(valid, e.offset + n);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) acc[r] = _mm512_add_epi32(acc[r], off);
  }
  const int64_t ldo = e.ldo;
  if (Int32Out(e)) {
    int32_t* out = e.out32 + m * ldo + n;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) _mm512_mask_storeu_epi32(out + r * ldo, valid, acc[r]);
    return;
  }
  int8_t* out = e.out8 + m * ldo + n;
  // Two loops rather than one over a requantizing lambda: capturing acc by reference sent
  // the accumulators through memory (the tile ran 3x slower).
  if (e.m0) {  // lanes beyond `valid`: m0 = shift = 0, never stored
    const __m512i m0 = _mm512_maskz_loadu_epi32(valid, e.m0 + n);
    const __m512i shift = _mm512_maskz_loadu_epi32(valid, e.shift + n);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512i q = IntegerQ16(e, acc[r], m0, shift);
      _mm_mask_storeu_epi8(out + r * ldo, valid, _mm512_cvtepi32_epi8(q));
    }
    return;
  }
  const __m512 bias = _mm512_maskz_loadu_ps(valid, e.bias + n);
  const __m512 mult = _mm512_maskz_loadu_ps(valid, e.mult + n);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const __m512i q = FloatQ16(e, acc[r], bias, mult);
    _mm_mask_storeu_epi8(out + r * ldo, valid, _mm512_cvtepi32_epi8(q));
  }
}

// acc += vpdpbusd(u8, s8). Inline asm: GCC 12 copies the accumulators of the intrinsic
// through extra registers and the stack every iteration.
inline __attribute__((always_inline)) void Dp(__m512i& acc, __m512i u8, __m512i s8) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
}

// r[i] = 16 dwords of row i -> r[g] = dword g of the 16 rows (a 16 x 16 dword transpose).
inline void Transpose16(__m512i r[16]) {
  __m512i t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // Per 128-bit lane L, u[4q + j] holds rows 4q..4q+3 of dword 4L + j.
  __m512i u[16];
#pragma GCC unroll 16
  for (int q = 0; q < 4; ++q) {
    u[4 * q] = _mm512_unpacklo_epi64(t[4 * q], t[4 * q + 2]);
    u[4 * q + 1] = _mm512_unpackhi_epi64(t[4 * q], t[4 * q + 2]);
    u[4 * q + 2] = _mm512_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);
    u[4 * q + 3] = _mm512_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);
  }
  // A 4 x 4 transpose of 128-bit lanes for each j.
#pragma GCC unroll 16
  for (int j = 0; j < 4; ++j) {
    const __m512i a = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x44);
    const __m512i b = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xEE);
    const __m512i c = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x44);
    const __m512i d = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xEE);
    r[j] = _mm512_shuffle_i32x4(a, c, 0x88);
    r[4 + j] = _mm512_shuffle_i32x4(a, c, 0xDD);
    r[8 + j] = _mm512_shuffle_i32x4(b, d, 0x88);
    r[12 + j] = _mm512_shuffle_i32x4(b, d, 0xDD);
  }
}

// PackPanels with AVX-512: 16 rows x 64 bytes of k at a time, transposed in registers (K's
// tail loaded masked, so zero padded); the column sums by vpdpbusd with a vector of ones
// (lane c sums channel c).
void PackPanelsVnni(const int8_t* w, int64_t N, int64_t K, int64_t Kp, int8_t* packed,
                    int32_t* colsum, int threads) {
  const int64_t panels = (N + 15) / 16, groups = Kp / 4;
  ParallelFor(panels, threads, [&](int64_t p0, int64_t p1) {
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t rows = std::min<int64_t>(16, N - p * 16);
      const int8_t* base = w + p * 16 * K;
      int8_t* dst = packed + p * groups * 64;
      __m512i sum = _mm512_setzero_si512();
      for (int64_t k = 0; k < K; k += 64) {
        const int64_t left = K - k;
        const __mmask64 mask = left >= 64 ? ~__mmask64{0} : (~uint64_t{0} >> (64 - left));
        __m512i r[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) {
          r[i] = i < rows ? _mm512_maskz_loadu_epi8(mask, base + i * K + k)
                          : _mm512_setzero_si512();
        }
        Transpose16(r);
        const int64_t g0 = k / 4, count = std::min<int64_t>(16, groups - g0);
        for (int64_t g = 0; g < count; ++g) {
          _mm512_store_si512(reinterpret_cast<void*>(dst + (g0 + g) * 64), r[g]);
          Dp(sum, ones, r[g]);
        }
      }
      const __mmask16 valid = Lanes16(rows);
      _mm512_mask_storeu_epi32(colsum + p * 16, valid, sum);
    }
  });
}

// MR rows x NP panels of 16 columns over all of K; xr: the block's MR rows of activations
// + 128 as uint8, Kp bytes apart; m: the block's first output row.
template <int MR, int NP>
void VnniTile(const uint8_t* xr, int64_t Kp, const int8_t* panel0,
                        int64_t panel_stride, int64_t m, int64_t n, int64_t N,
                        const Epilogue& e) {
  __m512i acc[MR][NP];
  #pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
    #pragma GCC unroll 8
    for (int j = 0; j < NP; ++j) acc[r][j] = _mm512_setzero_si512();
  const int64_t groups = Kp / 4;
  for (int64_t g = 0; g < groups; ++g) {
    __m512i wv[NP];
    #pragma GCC unroll 8
    for (int j = 0; j < NP; ++j) {
      wv[j] = _mm512_loadu_si512(reinterpret_cast<const void*>(panel0 + j * panel_stride +
                                                              g * 64));
    }
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t xv;
      std::memcpy(&xv, xr + r * Kp + g * 4, 4);
      const __m512i xb = _mm512_set1_epi32(xv);
      #pragma GCC unroll 8
      for (int j = 0; j < NP; ++j) Dp(acc[r][j], xb, wv[j]);
    }
  }
  const Epilogue local = e;
  #pragma GCC unroll 8
  for (int j = 0; j < NP; ++j) {
    const int64_t col = n + 16 * j;
    __m512i column[MR];
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) column[r] = acc[r][j];
    EpilogueColumn<MR>(local, m, col, column, Lanes16(N - col));
  }
}

template <int MR>
void VnniRowBlock(const uint8_t* xr, int64_t Kp, const int8_t* packed, int64_t m,
                            int64_t p0, int64_t p1, int64_t N, const Epilogue& e) {
  const int64_t stride = Kp * 16;  // bytes per panel
  int64_t p = p0;
  for (; p + 4 <= p1; p += 4) VnniTile<MR, 4>(xr, Kp, packed + p * stride, stride, m, p * 16, N, e);
  switch (p1 - p) {
    case 3: VnniTile<MR, 3>(xr, Kp, packed + p * stride, stride, m, p * 16, N, e); break;
    case 2: VnniTile<MR, 2>(xr, Kp, packed + p * stride, stride, m, p * 16, N, e); break;
    case 1: VnniTile<MR, 1>(xr, Kp, packed + p * stride, stride, m, p * 16, N, e); break;
    default: break;
  }
}

// The mask of the first min(max(n, 0), 64) bytes of a 64-byte vector.
inline __mmask64 Bytes64(int64_t n) {
  return n <= 0 ? 0 : (n >= 64 ? ~__mmask64{0} : (~__mmask64{0} >> (64 - n)));
}

// Rows m0..m1 of x (M, K) + 128 as uint8 into dst, Kp bytes a row (zero beyond K: w is zero
// there too).
struct MatrixRows {
  const int8_t* x;
  int64_t K, Kp;
  void operator()(int64_t m0, int64_t m1, uint8_t* dst) const {
    for (int64_t m = m0; m < m1; ++m, dst += Kp) {
      const int8_t* src = x + m * K;
      int64_t k = 0;
      for (; k + 64 <= K; k += 64) {
        const __m512i v = _mm512_loadu_si512(src + k);
        _mm512_storeu_si512(dst + k, _mm512_xor_si512(v, _mm512_set1_epi8(-128)));
      }
      // The last bytes of x and the zeros up to Kp (up to 63 of them on the tile path, whose
      // rows are whole 64-byte chunks) as masked vectors: byte loops here made the tile path
      // 2-5x slower than with K a multiple of 64 (char pointers may alias: not vectorised).
      for (; k < Kp; k += 64) {
        const __mmask64 in = Bytes64(K - k), out = Bytes64(Kp - k);
        const __m512i v = _mm512_xor_si512(_mm512_maskz_loadu_epi8(in, src + k),
                                           _mm512_set1_epi8(-128));
        _mm512_mask_storeu_epi8(dst + k, out, _mm512_maskz_mov_epi8(in, v));
      }
    }
  }
};

// n < 64 bytes from src to dst, each xor 0x80 (masked: nothing read or written beyond n).
inline void CopyFlip(const int8_t* src, uint8_t* dst, int64_t n) {
  int64_t k = 0;
  for (; k + 64 <= n; k += 64) {
    const __m512i v = _mm512_loadu_si512(src + k);
    _mm512_storeu_si512(dst + k, _mm512_xor_si512(v, _mm512_set1_epi8(-128)));
  }
  if (k < n) {
    const __mmask64 tail = (~0ULL) >> (64 - (n - k));
    const __m512i v = _mm512_maskz_loadu_epi8(tail, src + k);
    _mm512_mask_storeu_epi8(dst + k, tail, _mm512_xor_si512(v, _mm512_set1_epi8(-128)));
  }
}

// The same for the rows of a convolution's patch matrix, gathered from x.
struct PatchRows {
  const int8_t* x;
  ConvGeom g;
  int64_t Kp;
  void operator()(int64_t m0, int64_t m1, uint8_t* dst) const {
    const int64_t K = g.K(), C = g.C, row = g.DH * g.W * C;
    const int64_t run = g.DW == 1 ? g.KW * C : C;  // contiguous bytes per copy
    PixelWalk at(g, m0);
    for (int64_t m = m0; m < m1; ++m, dst += Kp, at.Next()) {
      const int8_t* base = at.Base(x);
      uint8_t* d = dst;
      for (int64_t i = 0; i < g.KH; ++i) {
        if (g.DW == 1) {
          CopyFlip(base + i * row, d, run);
          d += run;
        } else {
          for (int64_t j = 0; j < g.KW; ++j, d += C) {
            CopyFlip(base + i * row + j * g.DW * C, d, C);
          }
        }
      }
      for (int64_t k = K; k < Kp; k += 64) {
        _mm512_mask_storeu_epi8(dst + k, Bytes64(Kp - k), _mm512_setzero_si512());
      }
    }
  }
};

// The epilogue of a GEMM on activations + 128: offset' = offset - 128 * colsum (mod 2^32),
// in the calling thread's buffer.
Epilogue Unsigned(const Epilogue& e0, const int32_t* colsum, int64_t N) {
  int32_t* off = static_cast<int32_t*>(tls_misc.Get(N * sizeof(int32_t)));
  for (int64_t n = 0; n < N; ++n) {
    const uint32_t base = e0.offset ? static_cast<uint32_t>(e0.offset[n]) : 0u;
    off[n] = static_cast<int32_t>(base - 128u * static_cast<uint32_t>(colsum[n]));
  }
  Epilogue e = e0;
  e.offset = off;
  return e;
}

// Bytes of one core's L2 cache (sysconf's, from CPUID); 1 MB where it does not say.
int64_t L2CacheBytes() {
  static const int64_t bytes = [] {
#if defined(_SC_LEVEL2_CACHE_SIZE)
    const long n = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (n > 0) return int64_t{n};
#endif
    return int64_t{1} << 20;
  }();
  return bytes;
}

// The VNNI GEMM on packed panels ([N/16][Kp/4][16][4]) with the weights' column sums; rows
// (+ 128, as uint8) from `to_unsigned` (MatrixRows, PatchRows).
// `packed_now`: the panels were packed by this call, each panel by the thread that will use
// it where the threads split the panels.
template <class Rows>
void RunVnniPanelsOn(const Rows& to_unsigned, const int8_t* packed, const int32_t* colsum,
                     int64_t M, int64_t N, int64_t K, const Epilogue& e0, int threads,
                     bool packed_now = false) {
  const int64_t Kp = (K + 3) / 4 * 4;
  const int64_t panels = (N + 15) / 16;
  const Epilogue e = Unsigned(e0, colsum, N);
  // Row blocks m..m_end of xu (its row m at xrows) against panels p0..p1.
  const auto rows = [&](const uint8_t* xrows, int64_t m, int64_t m_end, int64_t p0,
                        int64_t p1) {
    for (; m + 6 <= m_end; m += 6, xrows += 6 * Kp) {
      VnniRowBlock<6>(xrows, Kp, packed, m, p0, p1, N, e);
    }
    switch (m_end - m) {
      case 5: VnniRowBlock<5>(xrows, Kp, packed, m, p0, p1, N, e); break;
      case 4: VnniRowBlock<4>(xrows, Kp, packed, m, p0, p1, N, e); break;
      case 3: VnniRowBlock<3>(xrows, Kp, packed, m, p0, p1, N, e); break;
      case 2: VnniRowBlock<2>(xrows, Kp, packed, m, p0, p1, N, e); break;
      case 1: VnniRowBlock<1>(xrows, Kp, packed, m, p0, p1, N, e); break;
      default: break;
    }
  };
  const int64_t groups4 = (panels + 3) / 4, row_blocks = (M + 5) / 6;
  const bool in_l2 = !packed_now && panels * Kp * 16 <= L2CacheBytes() &&
                     row_blocks >= 2 * threads;
  // Panels per pass over a thread's rows: a quarter of L2 (4 KB-page colours spread the
  // rest of the cache unevenly; with all of a 1 MB set of weights in one pass the time per
  // call took two values, 1.35 or 1.60 ms at 1024^3, by where its pages fell).
  const int64_t chunk =
      std::max<int64_t>(4, L2CacheBytes() / 4 / std::max<int64_t>(Kp * 16, 1) / 4 * 4);
  if (groups4 <= 2 || (threads > 1 && groups4 < 2 * threads && row_blocks >= 4 * threads) ||
      in_l2) {
    // Few panels (a layer of <= 128 channels; or ~100 channels on two threads: 7 panels, two
    // groups of 4 would leave one thread 4 panels and the other 2.25), or pre-packed weights
    // that fit in a core's L2: threads split the rows, every thread all the panels, a chunk
    // of them at a time. Each block of rows becomes unsigned just before its tiles, in the
    // thread's own buffer (in L1: no pass over all of x, no second round of threads). On a
    // 2-core Xeon (2 MB L2, AMX denied), against the split of the panels: 1024^3 1,360 ->
    // 1,560 GOP/s, 1024 x 1024 x 2048 1,420 -> 1,510, 4096 x 1024 x 1024 1,320 -> 1,600,
    // 512^3 1,210 -> 1,440, 64 x 1024 x 1024 1,200 -> 1,320; 256 x 4096 x 4096 (16 MB) stays
    // split by panels (1,600, against 1,270 by rows). Weights packed by this call
    // (`packed_now`) keep the split of the panels: each thread then mostly reads the panels
    // it packed, from its own cache (the split of the rows ran 1,350 -> 1,230 there).
    ParallelFor(row_blocks, threads, [&](int64_t b0, int64_t b1) {
      uint8_t* block = static_cast<uint8_t*>(tls_xrows.Get(6 * Kp));
      for (int64_t p0 = 0; p0 < panels; p0 += chunk) {
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t m = b * 6, m_end = std::min(M, m + 6);
          to_unsigned(m, m_end, block);
          rows(block, m, m_end, p0, std::min(panels, p0 + chunk));
        }
      }
    });
    return;
  }
  // Threads split the panels (each thread's weights stay in its own L2); rows inner, over x
  // made unsigned once.
  uint8_t* xu = static_cast<uint8_t*>(tls_xpack.Get(M * Kp));
  ParallelFor(M, threads, [&](int64_t m0, int64_t m1) { to_unsigned(m0, m1, xu + m0 * Kp); });
  ParallelFor(groups4, threads, [&](int64_t g0, int64_t g1) {
    // One group of 4 panels (64 channels) at a time over all rows: its weights stay in L2
    // (a chunk of several groups swept per block of rows would stream them all each time).
    for (int64_t g = g0; g < g1; ++g) rows(xu, 0, M, g * 4, std::min(panels, g * 4 + 4));
  });
}

void RunVnniPanels(const int8_t* x, const int8_t* packed, const int32_t* colsum, int64_t M,
                   int64_t N, int64_t K, const Epilogue& e0, int threads,
                   bool packed_now = false) {
  RunVnniPanelsOn(MatrixRows{x, K, (K + 3) / 4 * 4}, packed, colsum, M, N, K, e0, threads,
                  packed_now);
}

// A convolution on packed weights ([N/16][Kp/4][16][4] with their column sums), its patches
// gathered per block of rows.
void RunVnniConvPanels(const int8_t* x, const ConvGeom& g, const int8_t* packed,
                       const int32_t* colsum, int64_t N, const Epilogue& e0, int threads) {
  const int64_t K = g.K(), Kp = (K + 3) / 4 * 4;
  RunVnniPanelsOn(PatchRows{x, g, Kp}, packed, colsum, g.M(), N, K, e0, threads);
}


// The epilogue alone, on int32 rows m0..m1 of acc (M, N) computed elsewhere.
void EpilogueRowsVnni(const int32_t* acc, int64_t m0, int64_t m1, int64_t N,
                      const Epilogue& e) {
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t n = 0; n < N; n += 16) {
      const int64_t left = N - n;
      const __mmask16 valid = Lanes16(left);
      Epilogue16(e, m, n, _mm512_maskz_loadu_epi32(valid, acc + m * N + n), valid);
    }
  }
}

void RunVnniPacked(const int8_t* x, const int8_t* w, int64_t M, int64_t N, int64_t K,
                   const Epilogue& e0, int threads) {
  const int64_t Kp = (K + 3) / 4 * 4;
  const int64_t panels = (N + 15) / 16;
  int8_t* packed = static_cast<int8_t*>(tls_wpack.Get(panels * Kp * 16));
  int32_t* colsum = static_cast<int32_t*>(tls_sums.Get(panels * 16 * sizeof(int32_t)));
  PackPanelsVnni(w, N, K, Kp, packed, colsum, threads);
  RunVnniPanels(x, packed, colsum, M, N, K, e0, threads, /*packed_now=*/true);
}

// The lane sums of four vectors, [sum a, sum b, sum c, sum d] (wrapping).
inline __m128i Reduce4(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  // Per 128-bit lane: [a, b, a, b] + ... -> [a, b, c, d] partial sums.
  const __m512i abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd),
                                        _mm512_unpackhi_epi64(ab, cd));
  const __m256i half = _mm256_add_epi32(_mm512_castsi512_si256(abcd),
                                        _mm512_extracti64x4_epi64(abcd, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(half), _mm256_extracti128_si256(half, 1));
}

// Small M: w streamed as stored. sum_k (w + 128) x = acc + 128 sum_k x: w is the unsigned
// operand (xor 0x80), the per-row correction -128 * sum_k x[m, k].
template <int MR>
void VnniDotRows(const int8_t* x, const int8_t* w, int64_t K, int64_t m,
                           int64_t n0, int64_t n1, const int32_t* rowfix, int32_t* out,
                           int64_t ldo) {
  const __m512i flip = _mm512_set1_epi8(-128);
  const int64_t full = K / 64 * 64;
  const __mmask64 tail = K - full == 0 ? 0 : (~uint64_t{0} >> (64 - (K - full)));
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    __m512i acc[MR][4];
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
      #pragma GCC unroll 8
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 64) {
      const __mmask64 mask = k < full ? ~__mmask64{0} : tail;
      __m512i wv[4];
      #pragma GCC unroll 8
      for (int j = 0; j < 4; ++j)
        wv[j] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, w + (n + j) * K + k), flip);
      #pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512i xv = _mm512_maskz_loadu_epi8(mask, x + (m + r) * K + k);
        #pragma GCC unroll 8
        for (int j = 0; j < 4; ++j) Dp(acc[r][j], wv[j], xv);
      }
    }
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m128i sums = Reduce4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + r * ldo + n),
                       _mm_add_epi32(sums, _mm_set1_epi32(rowfix[r])));
    }
  }
  for (; n < n1; ++n) {
    __m512i acc[MR];
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 64) {
      const __mmask64 mask = k < full ? ~__mmask64{0} : tail;
      const __m512i wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, w + n * K + k), flip);
      #pragma GCC unroll 8
      for (int r = 0; r < MR; ++r)
        Dp(acc[r], wv, _mm512_maskz_loadu_epi8(mask, x + (m + r) * K + k));
    }
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
      out[r * ldo + n] = static_cast<int32_t>(static_cast<uint32_t>(_mm512_reduce_add_epi32(acc[r])) +
                                              static_cast<uint32_t>(rowfix[r]));
  }
}

void RunVnniDot(const int8_t* x, const int8_t* w, int64_t M, int64_t N, int64_t K,
                          const Epilogue& e, int threads) {
  int32_t* acc = static_cast<int32_t*>(tls_misc.Get((M * N + M) * sizeof(int32_t)));
  int32_t* rowfix = acc + M * N;
  for (int64_t m = 0; m < M; ++m) {
    uint32_t s = 0;
    for (int64_t k = 0; k < K; ++k) s += static_cast<uint32_t>(static_cast<int32_t>(x[m * K + k]));
    rowfix[m] = static_cast<int32_t>(0u - 128u * s);
  }
  const int64_t blocks = (N + 63) / 64;
  ParallelFor(blocks, threads, [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * 64, n1 = std::min(N, b1 * 64);
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) VnniDotRows<4>(x, w, K, m, n0, n1, rowfix + m, acc + m * N, N);
    switch (M - m) {
      case 3: VnniDotRows<3>(x, w, K, m, n0, n1, rowfix + m, acc + m * N, N); break;
      case 2: VnniDotRows<2>(x, w, K, m, n0, n1, rowfix + m, acc + m * N, N); break;
      case 1: VnniDotRows<1>(x, w, K, m, n0, n1, rowfix + m, acc + m * N, N); break;
      default: break;
    }
    for (int64_t r = 0; r < M; ++r) {
      for (int64_t n = n0; n < n1; n += 16) {
        const int64_t left = n1 - n;
        const __mmask16 valid = Lanes16(left);
        Epilogue16(e, r, n, _mm512_maskz_loadu_epi32(valid, acc + r * N + n), valid);
      }
    }
  });
}

// ------------------------------------------------------------------------------------------
// A convolution of one input channel (LeNet-5's first layer: 5 x 5, 6 channels), stride and
// dilation 1, up to 8 output channels, as a direct kernel: 16 output pixels of a row in the
// lanes of a vector, one vector per output channel. For each window row, one 64-byte load of
// the input row (+ 128, as uint8), and per group of 4 taps a vpermb that puts pixel l's 4
// input bytes in lane l; vpdpbusd against the group's 4 weights broadcast (zero beyond the
// window's width). The epilogue requantizes each channel's 16 pixels and interleaves the
// channels into NHWC order (vpermt2b). Needs AVX-512 VBMI. The GEMM of the patches would run
// 16-channel panels 6 / 16 full, and XLA's int32 convolution writes 4 bytes a result.

constexpr int64_t kDirectMaxChannels = 8, kDirectMaxWidth = 48, kDirectMaxHeight = 64;

#pragma GCC push_options
#pragma GCC target("avx512vbmi")

// Epilogue16's requantization (Z added) for 16 pixels of channel n: its scalars broadcast.
inline __m512i RequantPixels(const Epilogue& e, int64_t n, __m512i acc) {
  if (e.offset) acc = _mm512_add_epi32(acc, _mm512_set1_epi32(e.offset[n]));
  if (e.m0) {
    return IntegerQ16(e, acc, _mm512_set1_epi32(e.m0[n]), _mm512_set1_epi32(e.shift[n]));
  }
  return FloatQ16(e, acc, _mm512_set1_ps(e.bias[n]), _mm512_set1_ps(e.mult[n]));
}

// Output row (b, oy), pixels ox0.. ox0 + 16 (`valid` of them) of NC <= 8 channels.
template <int NC>
void DirectBlock(const uint8_t* const* rows, int64_t KH, int64_t groups, const int32_t* wd,
                 const __m512i* idx, int64_t avail, int64_t valid, const Epilogue& e,
                 int64_t pixel, const __m512i* interleave) {
  __m512i acc[NC];
#pragma GCC unroll 8
  for (int n = 0; n < NC; ++n) acc[n] = _mm512_setzero_si512();
  const __mmask64 load = avail >= 64 ? ~__mmask64{0} : (~uint64_t{0} >> (64 - avail));
  for (int64_t i = 0; i < KH; ++i) {
    // Beyond the row: 0 ^ 0x80, read by pixels that are not stored only.
    const __m512i u = _mm512_xor_si512(_mm512_maskz_loadu_epi8(load, rows[i]),
                                       _mm512_set1_epi8(-128));
    for (int64_t g = 0; g < groups; ++g) {
      const __m512i win = _mm512_permutexvar_epi8(idx[g], u);
      const int32_t* w = wd + (i * groups + g) * NC;
#pragma GCC unroll 8
      for (int n = 0; n < NC; ++n) Dp(acc[n], win, _mm512_set1_epi32(w[n]));
    }
  }
  // Channel n's 16 bytes at byte 16 n of lo (n < 4) or of hi (n >= 4).
  __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
#pragma GCC unroll 8
  for (int n = 0; n < NC; ++n) {
    const __m128i b = _mm512_cvtepi32_epi8(RequantPixels(e, n, acc[n]));
    if (n < 4) {
      lo = _mm512_mask_broadcast_i32x4(lo, static_cast<__mmask16>(0xF << (4 * n)), b);
    } else {
      hi = _mm512_mask_broadcast_i32x4(hi, static_cast<__mmask16>(0xF << (4 * (n - 4))), b);
    }
  }
  const int64_t bytes = valid * NC;
  int8_t* out = e.out8 + pixel * NC;
  const __m512i first = _mm512_permutex2var_epi8(lo, interleave[0], hi);
  _mm512_mask_storeu_epi8(out, bytes >= 64 ? ~__mmask64{0} : (~uint64_t{0} >> (64 - bytes)),
                          first);
  if (bytes > 64) {
    const __m512i second = _mm512_permutex2var_epi8(lo, interleave[1], hi);
    _mm512_mask_storeu_epi8(out + 64, ~uint64_t{0} >> (128 - bytes), second);
  }
}

template <int NC>
void RunDirect(const int8_t* x, const ConvGeom& g, const int8_t* w, const Epilogue& e0,
               int threads) {
  const int64_t KW = g.KW, KH = g.KH, groups = (KW + 3) / 4;
  // Weights as dwords [i][group][n] (taps beyond KW zero), their sums for the + 128.
  std::vector<int32_t> wd(KH * groups * NC, 0), colsum(NC, 0);
  for (int64_t n = 0; n < NC; ++n) {
    for (int64_t i = 0; i < KH; ++i) {
      for (int64_t j = 0; j < KW; ++j) {
        const int8_t v = w[n * KH * KW + i * KW + j];
        uint8_t* d = reinterpret_cast<uint8_t*>(&wd[(i * groups + j / 4) * NC + n]);
        d[j % 4] = static_cast<uint8_t>(v);
        colsum[n] += v;
      }
    }
  }
  const Epilogue e = Unsigned(e0, colsum.data(), NC);
  __m512i idx[kDirectMaxWidth / 4];
  for (int64_t q = 0; q < groups; ++q) {
    alignas(64) uint8_t b[64];
    for (int l = 0; l < 16; ++l) {
      for (int t = 0; t < 4; ++t) b[4 * l + t] = static_cast<uint8_t>(l + 4 * q + t);
    }
    idx[q] = _mm512_load_si512(b);
  }
  // Output byte j = pixel j / NC, channel j % NC: source byte 16 (j % NC) + j / NC of
  // (lo, hi) (vpermt2b: 0..63 lo, 64..127 hi).
  __m512i interleave[2];
  for (int h = 0; h < 2; ++h) {
    alignas(64) uint8_t b[64];
    for (int j = 0; j < 64; ++j) {
      const int o = 64 * h + j, p = o / NC, c = o % NC;
      b[j] = static_cast<uint8_t>(p < 16 ? 16 * c + p : 0);
    }
    interleave[h] = _mm512_load_si512(b);
  }
  ParallelFor(g.B * g.OH, threads, [&](int64_t r0, int64_t r1) {
    const uint8_t* rows[kDirectMaxHeight];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / g.OH, oy = r % g.OH;
      for (int64_t ox0 = 0; ox0 < g.OW; ox0 += 16) {
        for (int64_t i = 0; i < KH; ++i) {
          rows[i] = reinterpret_cast<const uint8_t*>(x + (b * g.H + oy + i) * g.W + ox0);
        }
        DirectBlock<NC>(rows, KH, groups, wd.data(), idx, g.W - ox0,
                        std::min<int64_t>(16, g.OW - ox0), e, r * g.OW + ox0, interleave);
      }
    }
  });
}

#pragma GCC pop_options

bool DirectConv(const ConvGeom& g, int64_t N) {
  return Cpu().vbmi && g.C == 1 && g.SH == 1 && g.SW == 1 && g.DH == 1 && g.DW == 1 &&
         N >= 1 && N <= kDirectMaxChannels && g.KW <= kDirectMaxWidth && g.KH <= kDirectMaxHeight;
}

void RunDirectConv(const int8_t* x, const ConvGeom& g, const int8_t* w, int64_t N,
                   const Epilogue& e, int threads) {
  switch (N) {
    case 1: return RunDirect<1>(x, g, w, e, threads);
    case 2: return RunDirect<2>(x, g, w, e, threads);
    case 3: return RunDirect<3>(x, g, w, e, threads);
    case 4: return RunDirect<4>(x, g, w, e, threads);
    case 5: return RunDirect<5>(x, g, w, e, threads);
    case 6: return RunDirect<6>(x, g, w, e, threads);
    case 7: return RunDirect<7>(x, g, w, e, threads);
    default: return RunDirect<8>(x, g, w, e, threads);
  }
}

// ------------------------------------------------------------------------------------------
// AMX-INT8 path: the VNNI path's operands on tiles. tdpbusd is vpdpbusd on tiles: a tile A
// of 16 rows x 64 bytes (uint8: activations + 128) against a tile B of 16 rows of 4-byte
// groups x 16 channels (int8), into a tile C of 16 x 16 int32. A packed panel's 16
// consecutive groups (1 KB) are one B tile as they lie, so the panels, the column sums and
// the folded offsets are the VNNI path's. Blocks of 32 rows x 2 panels: C tiles 0-3, A tiles
// 4-5 (rows 0-15, 16-31), B tiles 6-7. K runs in chunks of 64: rows are padded with zeros
// to a multiple of 64, and each panel's last, shorter chunk is copied into a zero-padded
// 1 KB tile (no tile reads beyond a buffer). Blocks of 16 rows or fewer use half the tiles.
//
// The tile instructions go through a Tiles class: AmxTiles runs them; EmulatedTiles computes
// the same in C++ on 8 tiles of 16 x 64 bytes, so that the blocking, the padding and the
// epilogue of the tile kernel are checked bit for bit on CPUs without AMX (path
// "amx_emulated"; slow, for tests).

constexpr int64_t kTileRows = 16, kTileBytes = 64, kTile = kTileRows * kTileBytes;

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};  // bytes per row of each tile
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads 64 bytes");

// Tile instructions as inline asm: the tile number is an immediate ("%c"), the same
// encoding as GCC's _tile_* macros, which take only literal numbers. Every asm clobbers
// memory, so that the compiler keeps the stores into a block's rows before its loads.
struct AmxTiles {
  static void Begin() {
    TileConfig cfg;
    for (int t = 0; t < 8; ++t) {
      cfg.colsb[t] = kTileBytes;
      cfg.rows[t] = kTileRows;
    }
    __asm__ volatile("ldtilecfg %0" ::"m"(cfg) : "memory");
  }
  static void End() { __asm__ volatile("tilerelease" ::: "memory"); }
  template <int T>
  static void Zero() {
    __asm__ volatile("tilezero %%tmm%c0" ::"i"(T));
  }
  template <int T>
  static void Load(const void* p, int64_t stride) {
    __asm__ volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(p), "r"(stride), "i"(T) : "memory");
  }
  // tileloaddt1: the tile's data is not expected to be reused soon (a weight panel's chunk,
  // read once per block of rows): it should not push the rows of x out of L1. On a 2-core
  // Xeon, 1024^3 on packed weights with int32 out 3,550-3,760 -> 4,350-4,460 GOP/s, with
  // the int8 epilogue 3,950-4,320 -> 4,080-4,310 (alternating runs); inference unchanged.
  template <int T>
  static void LoadOnce(const void* p, int64_t stride) {
    __asm__ volatile("tileloaddt1 (%0,%1,1), %%tmm%c2" ::"r"(p), "r"(stride), "i"(T) : "memory");
  }
  template <int T>
  static void Store(int32_t* p, int64_t stride) {
    __asm__ volatile("tilestored %%tmm%c2, (%0,%1,1)" ::"r"(p), "r"(stride), "i"(T) : "memory");
  }
  // C += A (uint8) . B (int8), per 4-byte group.
  template <int C, int A, int B>
  static void Dp() {
    __asm__ volatile("tdpbusd %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(C), "i"(A), "i"(B));
  }
};

struct EmulatedTiles {
  struct Registers {
    alignas(64) uint8_t t[8][kTileRows][kTileBytes];
  };
  static Registers& R() {
    static thread_local Registers r;
    return r;
  }
  static void Begin() { std::memset(&R(), 0, sizeof(Registers)); }  // ldtilecfg zeroes them
  static void End() {}
  template <int T>
  static void Zero() {
    std::memset(R().t[T], 0, kTile);
  }
  template <int T>
  static void Load(const void* p, int64_t stride) {
    for (int r = 0; r < kTileRows; ++r) {
      std::memcpy(R().t[T][r], static_cast<const uint8_t*>(p) + r * stride, kTileBytes);
    }
  }
  template <int T>
  static void LoadOnce(const void* p, int64_t stride) {
    Load<T>(p, stride);
  }
  template <int T>
  static void Store(int32_t* p, int64_t stride) {
    for (int r = 0; r < kTileRows; ++r) {
      std::memcpy(reinterpret_cast<uint8_t*>(p) + r * stride, R().t[T][r], kTileBytes);
    }
  }
  template <int C, int A, int B>
  static void Dp() {
    Registers& g = R();
    for (int m = 0; m < kTileRows; ++m) {
      for (int n = 0; n < 16; ++n) {
        uint32_t acc;
        std::memcpy(&acc, &g.t[C][m][4 * n], 4);
        for (int k = 0; k < kTileRows; ++k) {
          for (int j = 0; j < 4; ++j) {
            acc += static_cast<uint32_t>(static_cast<int32_t>(g.t[A][m][4 * k + j]) *
                                         static_cast<int32_t>(static_cast<int8_t>(
                                             g.t[B][k][4 * n + j])));
          }
        }
        std::memcpy(&g.t[C][m][4 * n], &acc, 4);
      }
    }
  }
};

// The operands of a tile GEMM: rows (+ 128) ld bytes apart, padded to whole 64-byte chunks;
// the panels; the panels' last chunks (null: K is whole chunks).
struct TileOperands {
  const int8_t* packed;
  int64_t panel_stride;  // bytes per panel: Kp * 16
  const int8_t* tails;   // [panels][1 KB]
  int64_t chunks;        // whole 64-byte chunks of Kp
  int64_t ld;            // bytes per row: Kp rounded up to 64
};

// One block: rows m.. m + rows (<= 32; A at xr) x panel p (and p + 1 when TWO), epilogue
// through c (4 tiles of int32).
template <class T, bool TWO, bool LOWER>
void TileBlock(const uint8_t* xr, const TileOperands& o, int64_t p, int64_t m, int64_t rows,
               int64_t N, const Epilogue& e, int32_t* c) {
  T::template Zero<0>();
  if (TWO) T::template Zero<1>();
  if (LOWER) T::template Zero<2>();
  if (TWO && LOWER) T::template Zero<3>();
  // A chunk: rows at a, panel p's B tile at b, panel p + 1's `next` bytes further.
  const auto step = [&](const uint8_t* a, const int8_t* b, int64_t next) {
    T::template Load<4>(a, o.ld);
    T::template LoadOnce<6>(b, kTileBytes);
    T::template Dp<0, 4, 6>();
    if (TWO) {
      T::template LoadOnce<7>(b + next, kTileBytes);
      T::template Dp<1, 4, 7>();
    }
    if (LOWER) {
      T::template Load<5>(a + kTileRows * o.ld, o.ld);
      T::template Dp<2, 5, 6>();
      if (TWO) T::template Dp<3, 5, 7>();
    }
  };
  const int8_t* panel = o.packed + p * o.panel_stride;
  for (int64_t k = 0; k < o.chunks; ++k) {
    step(xr + k * kTileBytes, panel + k * kTile, o.panel_stride);
  }
  if (o.tails) step(xr + o.chunks * kTileBytes, o.tails + p * kTile, kTile);
  T::template Store<0>(c, kTileBytes);
  if (TWO) T::template Store<1>(c + 256, kTileBytes);
  if (LOWER) T::template Store<2>(c + 512, kTileBytes);
  if (TWO && LOWER) T::template Store<3>(c + 768, kTileBytes);
  for (int j = 0; j < (TWO ? 2 : 1); ++j) {
    const int64_t col = (p + j) * 16, left = N - col;
    const __mmask16 valid = Lanes16(left);
    for (int64_t r = 0; r < rows; ++r) {
      const int32_t* tile = c + ((r >= kTileRows ? 2 : 0) + j) * 256;
      Epilogue16(e, m + r, col, _mm512_load_si512(tile + (r % kTileRows) * 16), valid);
    }
  }
}

// Rows m.. m + rows (<= 32) against panels p0..p1.
template <class T>
void TileRows(const uint8_t* xr, const TileOperands& o, int64_t m, int64_t rows, int64_t p0,
              int64_t p1, int64_t N, const Epilogue& e, int32_t* c) {
  for (int64_t p = p0; p < p1; p += 2) {
    const bool two = p + 1 < p1;
    if (rows > kTileRows) {
      two ? TileBlock<T, true, true>(xr, o, p, m, rows, N, e, c)
          : TileBlock<T, false, true>(xr, o, p, m, rows, N, e, c);
    } else {
      two ? TileBlock<T, true, false>(xr, o, p, m, rows, N, e, c)
          : TileBlock<T, false, false>(xr, o, p, m, rows, N, e, c);
    }
  }
}

thread_local Scratch tls_tails, tls_tile_out;

// The AMX GEMM on packed panels with their column sums; `to_unsigned` (MatrixRows,
// PatchRows) built with a row length of Kp rounded up to 64.
template <class T, class Rows>
void RunTilePanelsOn(const Rows& to_unsigned, const int8_t* packed, const int32_t* colsum,
                     int64_t M, int64_t N, int64_t K, const Epilogue& e0, int threads) {
  const int64_t Kp = (K + 3) / 4 * 4, ld = (Kp + 63) / 64 * 64, panels = (N + 15) / 16;
  const Epilogue e = Unsigned(e0, colsum, N);
  TileOperands o{packed, Kp * 16, nullptr, Kp / 64, ld};
  const int64_t tail_groups = (Kp % 64) / 4;
  if (tail_groups) {
    int8_t* tails = static_cast<int8_t*>(tls_tails.Get(panels * kTile));
    for (int64_t p = 0; p < panels; ++p) {
      std::memcpy(tails + p * kTile, packed + p * o.panel_stride + o.chunks * kTile,
                  tail_groups * 64);
      std::memset(tails + p * kTile + tail_groups * 64, 0, kTile - tail_groups * 64);
    }
    o.tails = tails;
  }
  const int64_t blocks = (M + 31) / 32;
  // Weights that stay in a core's L2 (1 MB): threads split the blocks of rows, each block
  // made unsigned in the thread's own buffer just before its tiles, against all panels.
  if (panels * o.panel_stride <= (int64_t{1} << 20) || panels <= 2) {
    ParallelFor(blocks, threads, [&](int64_t b0, int64_t b1) {
      uint8_t* block = static_cast<uint8_t*>(tls_xrows.Get(32 * ld));
      int32_t* c = static_cast<int32_t*>(tls_tile_out.Get(4 * 256 * sizeof(int32_t)));
      T::Begin();
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t m = b * 32, rows = std::min<int64_t>(32, M - m);
        to_unsigned(m, m + rows, block);
        TileRows<T>(block, o, m, rows, 0, panels, N, e, c);
      }
      T::End();
    });
    return;
  }
  // Larger weights: all rows made unsigned once; threads split groups of 8 panels (256 KB
  // to 1 MB of weights at K = 1024..4096, kept in L2 while all row blocks pass).
  uint8_t* xu = static_cast<uint8_t*>(tls_xpack.Get(blocks * 32 * ld));
  ParallelFor(M, threads, [&](int64_t m0, int64_t m1) { to_unsigned(m0, m1, xu + m0 * ld); });
  ParallelFor((panels + 7) / 8, threads, [&](int64_t g0, int64_t g1) {
    int32_t* c = static_cast<int32_t*>(tls_tile_out.Get(4 * 256 * sizeof(int32_t)));
    T::Begin();
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t m = b * 32;
        TileRows<T>(xu + m * ld, o, m, std::min<int64_t>(32, M - m), g * 8,
                    std::min(panels, g * 8 + 8), N, e, c);
      }
    }
    T::End();
  });
}

template <class T>
void RunTilePanels(const int8_t* x, const int8_t* packed, const int32_t* colsum, int64_t M,
                   int64_t N, int64_t K, const Epilogue& e0, int threads) {
  const int64_t ld = ((K + 3) / 4 * 4 + 63) / 64 * 64;
  RunTilePanelsOn<T>(MatrixRows{x, K, ld}, packed, colsum, M, N, K, e0, threads);
}

template <class T>
void RunTileConvPanels(const int8_t* x, const ConvGeom& g, const int8_t* packed,
                       const int32_t* colsum, int64_t N, const Epilogue& e0, int threads) {
  const int64_t K = g.K(), ld = ((K + 3) / 4 * 4 + 63) / 64 * 64;
  RunTilePanelsOn<T>(PatchRows{x, g, ld}, packed, colsum, g.M(), N, K, e0, threads);
}

// Before path kAmx is offered: a 40 x 40 x 100 product (two row blocks, one of them below 16
// rows; a pair of panels and a single one; a whole chunk of K and a tail) on tiles T equals
// the same on the emulated tiles and a plain int64 reference. A CPU or OS that runs the tiles
// differently from what the kernel assumes loses the path instead of computing wrong
// integers. (TileCheck<EmulatedTiles> runs the check's own code on any AVX-512 CPU.)
template <class T>
bool TileCheck() {
  constexpr int64_t M = 40, N = 40, K = 100, Kp = 100, panels = 3;
  std::vector<int8_t> x(M * K), w(N * K);
  uint32_t state = 12345;
  for (auto* v : {&x, &w}) {
    for (int8_t& b : *v) {
      state = state * 1664525u + 1013904223u;
      b = static_cast<int8_t>(state >> 24);
    }
  }
  x[0] = -128;
  w[0] = -128;
  Scratch aligned;  // the panels are stored 64 bytes at a time, aligned
  int8_t* packed = static_cast<int8_t*>(aligned.Get(panels * Kp * 16));
  std::vector<int32_t> colsum(panels * 16), hw(M * N, 1), emulated(M * N, 2);
  PackPanelsVnni(w.data(), N, K, Kp, packed, colsum.data(), 1);
  Epilogue e;
  e.ldo = N;
  e.out32 = hw.data();
  RunTilePanels<T>(x.data(), packed, colsum.data(), M, N, K, e, 1);
  e.out32 = emulated.data();
  RunTilePanels<EmulatedTiles>(x.data(), packed, colsum.data(), M, N, K, e, 1);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      int64_t sum = 0;
      for (int64_t k = 0; k < K; ++k) sum += int64_t{x[m * K + k]} * w[n * K + k];
      if (Wrap(sum) != emulated[m * N + n]) return false;
    }
  }
  return hw == emulated;
}

bool AmxSelfCheck() { return TileCheck<AmxTiles>(); }
bool EmulatedTileCheck() { return TileCheck<EmulatedTiles>(); }

// Path kAmx or kAmxEmulated: the tile kernel from 17 rows on, the VNNI kernel below (a tile
// has 16 rows: fewer rows waste its work, and the VNNI kernel streams the weights).
bool TileRowsFor(int64_t M) { return M > kTileRows; }

void RunTiles(Path p, const int8_t* x, const int8_t* packed, const int32_t* colsum, int64_t M,
              int64_t N, int64_t K, const Epilogue& e, int threads) {
  if (!TileRowsFor(M)) return RunVnniPanels(x, packed, colsum, M, N, K, e, threads);
  if (p == kAmx) return RunTilePanels<AmxTiles>(x, packed, colsum, M, N, K, e, threads);
  RunTilePanels<EmulatedTiles>(x, packed, colsum, M, N, K, e, threads);
}

void RunTilesConv(Path p, const int8_t* x, const ConvGeom& g, const int8_t* packed,
                  const int32_t* colsum, int64_t N, const Epilogue& e, int threads) {
  if (!TileRowsFor(g.M())) return RunVnniConvPanels(x, g, packed, colsum, N, e, threads);
  if (p == kAmx) return RunTileConvPanels<AmxTiles>(x, g, packed, colsum, N, e, threads);
  RunTileConvPanels<EmulatedTiles>(x, g, packed, colsum, N, e, threads);
}


#pragma GCC pop_options

// ------------------------------------------------------------------------------------------
// AVX2 path: int8 -> int16 (vpmovsxbw), vpmaddwd: exact.

#pragma GCC push_options
#pragma GCC target("avx2")

inline void Epilogue8(const Epilogue& e, int64_t m, int64_t n, __m256i acc,
                                int64_t valid) {
  if (valid < 8 || e.m0) {  // the integer requantization one lane at a time
    alignas(32) int32_t tmp[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), acc);
    for (int64_t j = 0; j < valid; ++j) ScalarEpilogue(e, m, n + j, tmp[j]);
    return;
  }
  if (e.offset) {
    acc = _mm256_add_epi32(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(e.offset + n)));
  }
  if (Int32Out(e)) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(e.out32 + m * e.ldo + n), acc);
    return;
  }
  const __m256 y = _mm256_mul_ps(_mm256_add_ps(_mm256_cvtepi32_ps(acc), _mm256_loadu_ps(e.bias + n)),
                                 _mm256_loadu_ps(e.mult + n));
  const __m256 nan = _mm256_cmp_ps(y, y, _CMP_UNORD_Q);
  const __m256 c = _mm256_min_ps(_mm256_max_ps(y, _mm256_set1_ps(e.lo_f)),
                                 _mm256_set1_ps(e.hi_f));
  __m256i q = _mm256_cvtps_epi32(_mm256_round_ps(c, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  q = _mm256_blendv_epi8(q, _mm256_set1_epi32(e.q_nan), _mm256_castps_si256(nan));
  q = _mm256_add_epi32(q, _mm256_set1_epi32(e.zp));
  // int32 -> int8 (values already in range): packs, then gather the 8 bytes.
  const __m256i p16 = _mm256_packs_epi32(q, q);         // per 128-bit lane
  const __m256i p8 = _mm256_packs_epi16(p16, p16);
  const int32_t lo4 = _mm256_extract_epi32(p8, 0), hi4 = _mm256_extract_epi32(p8, 4);
  int8_t* dst = e.out8 + m * e.ldo + n;
  std::memcpy(dst, &lo4, 4);
  std::memcpy(dst + 4, &hi4, 4);
}

// MR rows x 8 columns (half a 16-column panel) over all of K; x16: (M, Kp) int16.
template <int MR>
void Avx2Tile(const int16_t* x16, int64_t Kp, const int8_t* panel, int half,
                        int64_t m, int64_t n, int64_t N, const Epilogue& e) {
  __m256i acc[MR][2];
  #pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  const int64_t groups = Kp / 4;
  const int8_t* wp = panel + half * 32;
  for (int64_t g = 0; g < groups; ++g) {
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wp + g * 64)));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wp + g * 64 + 16)));
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int64_t xv;
      std::memcpy(&xv, x16 + (m + r) * Kp + g * 4, 8);
      const __m256i xb = _mm256_set1_epi64x(xv);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(w0, xb));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(w1, xb));
    }
  }
  const int64_t left = std::min<int64_t>(8, N - n);
  #pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    // Lanes hold (column, k pair) partial sums: add the pairs, restore the column order.
    const __m256i h = _mm256_hadd_epi32(acc[r][0], acc[r][1]);
    Epilogue8(e, m + r, n, _mm256_permute4x64_epi64(h, 0xD8), left);
  }
}

template <int MR>
void Avx2RowBlock(const int16_t* x16, int64_t Kp, const int8_t* packed, int64_t m,
                            int64_t h0, int64_t h1, int64_t N, const Epilogue& e) {
  const int64_t stride = Kp * 16;
  for (int64_t h = h0; h < h1; ++h) {
    const int64_t n = h * 8;
    if (n >= N) break;
    Avx2Tile<MR>(x16, Kp, packed + (h / 2) * stride, static_cast<int>(h % 2), m, n, N, e);
  }
}

// The AVX2 GEMM on packed panels ([N/16][Kp/4][16][4]).
void RunAvx2Panels(const int8_t* x, const int8_t* packed, int64_t M, int64_t N, int64_t K,
                   const Epilogue& e, int threads) {
  const int64_t Kp = (K + 3) / 4 * 4;
  int16_t* x16 = static_cast<int16_t*>(tls_xpack.Get(M * Kp * sizeof(int16_t)));
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) x16[m * Kp + k] = x[m * K + k];
    for (int64_t k = K; k < Kp; ++k) x16[m * Kp + k] = 0;
  }
  const int64_t halves = (N + 7) / 8;
  ParallelFor((halves + 1) / 2, threads, [&](int64_t a, int64_t b) {
    const int64_t h0 = a * 2, h1 = std::min(halves, b * 2);
    int64_t m = 0;
    for (; m + 6 <= M; m += 6) Avx2RowBlock<6>(x16, Kp, packed, m, h0, h1, N, e);
    switch (M - m) {
      case 5: Avx2RowBlock<5>(x16, Kp, packed, m, h0, h1, N, e); break;
      case 4: Avx2RowBlock<4>(x16, Kp, packed, m, h0, h1, N, e); break;
      case 3: Avx2RowBlock<3>(x16, Kp, packed, m, h0, h1, N, e); break;
      case 2: Avx2RowBlock<2>(x16, Kp, packed, m, h0, h1, N, e); break;
      case 1: Avx2RowBlock<1>(x16, Kp, packed, m, h0, h1, N, e); break;
      default: break;
    }
  });
}

void RunAvx2Packed(const int8_t* x, const int8_t* w, int64_t M, int64_t N, int64_t K,
                   const Epilogue& e, int threads) {
  const int64_t Kp = (K + 3) / 4 * 4;
  const int64_t panels = (N + 15) / 16;
  int8_t* packed = static_cast<int8_t*>(tls_wpack.Get(panels * Kp * 16));
  int32_t* colsum = static_cast<int32_t*>(tls_misc.Get(panels * 16 * sizeof(int32_t)));
  PackPanels(w, N, K, Kp, packed, colsum, threads);
  RunAvx2Panels(x, packed, M, N, K, e, threads);
}

// Small M on AVX2: one dot product per (row, channel), 16 k at a time.
void RunAvx2Dot(const int8_t* x, const int8_t* w, int64_t M, int64_t N, int64_t K,
                          const Epilogue& e, int threads) {
  const int64_t blocks = (N + 63) / 64;
  const int64_t full = K / 16 * 16;
  ParallelFor(blocks, threads, [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * 64, n1 = std::min(N, b1 * 64);
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* xr = x + m * K;
      int64_t n = n0;
      for (; n + 4 <= n1; n += 4) {
        __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(),
                          _mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int64_t k = 0; k < full; k += 16) {
          const __m256i xv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xr + k)));
          #pragma GCC unroll 8
          for (int j = 0; j < 4; ++j) {
            const __m256i wv = _mm256_cvtepi8_epi16(
                _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (n + j) * K + k)));
            acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(xv, wv));
          }
        }
        // Sum the 4 x 8 lanes to 4 values.
        const __m256i h01 = _mm256_hadd_epi32(acc[0], acc[1]);
        const __m256i h23 = _mm256_hadd_epi32(acc[2], acc[3]);
        const __m256i h = _mm256_hadd_epi32(h01, h23);  // [a b c d | a' b' c' d']
        const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        alignas(16) int32_t v[4];
        _mm_store_si128(reinterpret_cast<__m128i*>(v), s);
        #pragma GCC unroll 8
        for (int j = 0; j < 4; ++j) {
          uint32_t t = static_cast<uint32_t>(v[j]);
          const int8_t* wr = w + (n + j) * K;
          for (int64_t k = full; k < K; ++k)
            t += static_cast<uint32_t>(static_cast<int32_t>(xr[k]) * static_cast<int32_t>(wr[k]));
          ScalarEpilogue(e, m, n + j, static_cast<int32_t>(t));
        }
      }
      if (n < n1) PortableRows(x, w, K, m, m + 1, n, n1, e);
    }
  });
}

// The epilogue alone, on int32 rows m0..m1 of acc (M, N) computed elsewhere (Epilogue8's
// formula; a tail of fewer than 8 channels through masked loads).
void EpilogueRowsAvx2(const int32_t* acc, int64_t m0, int64_t m1, int64_t N,
                      const Epilogue& e) {
  for (int64_t m = m0; m < m1; ++m) {
    int64_t n = 0;
    for (; n + 8 <= N; n += 8) {
      Epilogue8(e, m, n, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + m * N + n)),
                8);
    }
    if (n == N) continue;
    const int64_t valid = N - n;
    if (e.m0) {
      for (; n < N; ++n) ScalarEpilogue(e, m, n, acc[m * N + n]);
      continue;
    }
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(valid)),
                                            lanes);
    __m256i a = _mm256_maskload_epi32(acc + m * N + n, mask);
    a = _mm256_add_epi32(a, _mm256_maskload_epi32(e.offset + n, mask));
    const __m256 y = _mm256_mul_ps(
        _mm256_add_ps(_mm256_cvtepi32_ps(a), _mm256_maskload_ps(e.bias + n, mask)),
        _mm256_maskload_ps(e.mult + n, mask));
    const __m256 nan = _mm256_cmp_ps(y, y, _CMP_UNORD_Q);
    const __m256 c = _mm256_min_ps(_mm256_max_ps(y, _mm256_set1_ps(e.lo_f)),
                                   _mm256_set1_ps(e.hi_f));
    __m256i q = _mm256_cvtps_epi32(_mm256_round_ps(c, _MM_FROUND_TO_NEAREST_INT |
                                                          _MM_FROUND_NO_EXC));
    q = _mm256_blendv_epi8(q, _mm256_set1_epi32(e.q_nan), _mm256_castps_si256(nan));
    q = _mm256_add_epi32(q, _mm256_set1_epi32(e.zp));
    alignas(32) int32_t tmp[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), q);
    int8_t* dst = e.out8 + m * e.ldo + n;
    for (int64_t j = 0; j < valid; ++j) dst[j] = static_cast<int8_t>(tmp[j]);
  }
}

#pragma GCC pop_options

#endif  // QJAX_X86

#ifndef QJAX_X86
bool AmxSelfCheck() { return false; }
bool EmulatedTileCheck() { return false; }
#endif

// ------------------------------------------------------------------------------------------
// Dispatch and the FFI handlers.

// Up to this many rows: stream w as stored, no packing.
int64_t SmallM() {
  static const int64_t v = [] {
    const char* env = std::getenv("QJAX_INT8_SMALL_M");
    return env ? std::atoll(env) : 16;
  }();
  return v;
}

ffi::Error CheckPath(int64_t path, Path* p) {
  *p = path == kAuto ? Best() : static_cast<Path>(path);
  if (*p < kPortable || *p > kAmxEmulated) {
    return ffi::Error::InvalidArgument("qjax int8 gemm: path must be 0 (auto), 1 (portable), "
                                       "2 (avx2), 3 (vnni), 4 (amx) or 5 (amx emulated); got " +
                                       std::to_string(path));
  }
  if (!Supported(*p)) {
    return ffi::Error::InvalidArgument("qjax int8 gemm: this CPU lacks the instructions of "
                                       "path " + std::to_string(path));
  }
  return ffi::Error::Success();
}

// w pre-packed ([N/16][Kp/4][16][4]) with its column sums: every M on the panel kernels.
ffi::Error RunPanels(const int8_t* x, const int8_t* packed, const int32_t* colsum, int64_t M,
                     int64_t N, int64_t K, const Epilogue& e, int64_t path,
                     int64_t threads_attr) {
  Path p;
  ffi::Error err = CheckPath(path, &p);
  if (err.failure()) return err;
  if (M == 0 || N == 0) return ffi::Error::Success();
  const int threads = ThreadsFor(M * N * std::max<int64_t>(K, 1), threads_attr);
#ifdef QJAX_X86
  if (Tiles(p)) {
    RunTiles(p, x, packed, colsum, M, N, K, e, threads);
    return ffi::Error::Success();
  }
  if (p == kVnni) {
    RunVnniPanels(x, packed, colsum, M, N, K, e, threads);
    return ffi::Error::Success();
  }
  if (p == kAvx2) {
    RunAvx2Panels(x, packed, M, N, K, e, threads);
    return ffi::Error::Success();
  }
#endif
  RunPortablePanels(x, packed, M, N, K, e, threads);
  return ffi::Error::Success();
}

ffi::Error Run(const int8_t* x, const int8_t* w, int64_t M, int64_t N, int64_t K,
               const Epilogue& e, int64_t path, int64_t threads_attr) {
  Path p;
  ffi::Error err = CheckPath(path, &p);
  if (err.failure()) return err;
  if (M == 0 || N == 0) return ffi::Error::Success();
  const int threads = ThreadsFor(M * N * std::max<int64_t>(K, 1), threads_attr);
#ifdef QJAX_X86
  if (Avx512(p)) {
    if (M <= SmallM()) {
      RunVnniDot(x, w, M, N, K, e, threads);
    } else if (Tiles(p)) {
      const int64_t Kp = (K + 3) / 4 * 4, panels = (N + 15) / 16;
      int8_t* packed = static_cast<int8_t*>(tls_wpack.Get(panels * Kp * 16));
      int32_t* colsum = static_cast<int32_t*>(tls_sums.Get(panels * 16 * sizeof(int32_t)));
      PackPanelsVnni(w, N, K, Kp, packed, colsum, threads);
      RunTiles(p, x, packed, colsum, M, N, K, e, threads);
    } else {
      RunVnniPacked(x, w, M, N, K, e, threads);
    }
    return ffi::Error::Success();
  }
  if (p == kAvx2) {
    if (M <= SmallM()) {
      RunAvx2Dot(x, w, M, N, K, e, threads);
    } else {
      RunAvx2Packed(x, w, M, N, K, e, threads);
    }
    return ffi::Error::Success();
  }
#endif
  RunPortable(x, w, M, N, K, e, threads);
  return ffi::Error::Success();
}

ffi::Error Shapes(const ffi::AnyBuffer::Dimensions& xd, const ffi::AnyBuffer::Dimensions& wd,
                  size_t offset_count, int64_t* M, int64_t* N, int64_t* K) {
  if (wd.size() != 2 || xd.size() < 1 || xd.back() != wd[1]) {
    return ffi::Error::InvalidArgument("qjax int8 gemm: x (..., K) and w (N, K) must share K");
  }
  *N = wd[0];
  *K = wd[1];
  int64_t m = 1;
  for (size_t i = 0; i + 1 < xd.size(); ++i) m *= xd[i];
  *M = m;
  if (static_cast<int64_t>(offset_count) != *N) {
    return ffi::Error::InvalidArgument("qjax int8 gemm: offset must have N elements");
  }
  return ffi::Error::Success();
}

ffi::Error GemmS32(ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::S32> offset,
                   ffi::ResultBuffer<ffi::S32> out, int64_t path, int64_t threads) {
  int64_t M, N, K;
  ffi::Error err = Shapes(x.dimensions(), w.dimensions(), offset.element_count(), &M, &N, &K);
  if (err.failure()) return err;
  Epilogue e;
  e.offset = offset.typed_data();
  e.out32 = out->typed_data();
  e.ldo = N;
  return Run(x.typed_data(), w.typed_data(), M, N, K, e, path, threads);
}

// The requantizing epilogue of a GEMM with N output channels.
ffi::Error RequantEpilogue(ffi::Buffer<ffi::S32>& offset, ffi::AnyBuffer& bias,
                           ffi::AnyBuffer& mult, ffi::Buffer<ffi::S32>& zero_point,
                           ffi::ResultBuffer<ffi::S8>& out, int64_t N, int64_t lo, int64_t hi,
                           bool relu, bool integer, Epilogue* e) {
  if (static_cast<int64_t>(bias.element_count()) != N ||
      static_cast<int64_t>(mult.element_count()) != N || zero_point.element_count() != 1) {
    return ffi::Error::InvalidArgument("qjax int8 gemm: bias and multiplier must have N "
                                       "elements, zero_point one");
  }
  const ffi::DataType want = integer ? ffi::DataType::S32 : ffi::DataType::F32;
  if (bias.element_type() != want || mult.element_type() != want) {
    return ffi::Error::InvalidArgument("qjax int8 gemm: the requantizer's two arrays must be "
                                       "float32 (bias, multiplier) or, for the integer "
                                       "requantization, int32 (m0, shift)");
  }
  e->offset = offset.typed_data();
  if (integer) {
    e->m0 = static_cast<const int32_t*>(bias.untyped_data());
    e->shift = static_cast<const int32_t*>(mult.untyped_data());
    for (int64_t n = 0; n < N; ++n) {
      if (e->shift[n] < 1 || e->shift[n] > 62) {
        return ffi::Error::InvalidArgument(
            "qjax int8 gemm: the integer requantization's shift must lie in [1, 62] (as "
            "qjax.integer.arith.quantize_multiplier makes it); got " +
            std::to_string(e->shift[n]));
      }
    }
  } else {
    e->bias = static_cast<const float*>(bias.untyped_data());
    e->mult = static_cast<const float*>(mult.untyped_data());
  }
  e->zp = zero_point.typed_data()[0];
  const int64_t low = relu ? std::max<int64_t>(lo, e->zp) : lo;
  e->lo_f = static_cast<float>(low - e->zp);
  e->hi_f = static_cast<float>(hi - e->zp);
  e->lo_q = static_cast<int32_t>(low - e->zp);
  e->hi_q = static_cast<int32_t>(hi - e->zp);
  e->q_nan = static_cast<int32_t>(std::min<int64_t>(std::max<int64_t>(0, low - e->zp),
                                                    hi - e->zp));
  e->out8 = out->typed_data();
  e->ldo = N;
  return ffi::Error::Success();
}

ffi::Error GemmRequant(ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w,
                       ffi::Buffer<ffi::S32> offset, ffi::AnyBuffer bias,
                       ffi::AnyBuffer mult, ffi::Buffer<ffi::S32> zero_point,
                       ffi::ResultBuffer<ffi::S8> out, int64_t lo, int64_t hi, bool relu, bool integer,
                       int64_t path, int64_t threads) {
  int64_t M, N, K;
  ffi::Error err = Shapes(x.dimensions(), w.dimensions(), offset.element_count(), &M, &N, &K);
  if (err.failure()) return err;
  Epilogue e;
  err = RequantEpilogue(offset, bias, mult, zero_point, out, N, lo, hi, relu, integer, &e);
  if (err.failure()) return err;
  return Run(x.typed_data(), w.typed_data(), M, N, K, e, path, threads);
}

// A 2-D convolution (ConvGeom) on weights pre-packed ([N/16][Kp/4][16][4]) with their
// column sums.
ffi::Error RunConvPanels(const int8_t* x, const ConvGeom& g, const int8_t* packed,
                         const int32_t* colsum, int64_t N, const Epilogue& e, int64_t path,
                         int64_t threads_attr) {
  Path p;
  ffi::Error err = CheckPath(path, &p);
  if (err.failure()) return err;
  const int64_t M = g.M(), K = g.K();
  if (M == 0 || N == 0) return ffi::Error::Success();
  const int threads = ThreadsFor(M * N * std::max<int64_t>(K, 1), threads_attr);
#ifdef QJAX_X86
  if (Tiles(p)) {
    RunTilesConv(p, x, g, packed, colsum, N, e, threads);
    return ffi::Error::Success();
  }
  if (p == kVnni) {
    RunVnniConvPanels(x, g, packed, colsum, N, e, threads);
    return ffi::Error::Success();
  }
#endif
  int8_t* patches = static_cast<int8_t*>(tls_patches.Get(M * K));
  Im2Col(x, g, patches, threads);
#ifdef QJAX_X86
  if (p == kAvx2) {
    RunAvx2Panels(patches, packed, M, N, K, e, threads);
    return ffi::Error::Success();
  }
#endif
  RunPortablePanels(patches, packed, M, N, K, e, threads);
  return ffi::Error::Success();
}

// The same with w (N, KH * KW * C) as stored, packed here.
ffi::Error RunConv(const int8_t* x, const ConvGeom& g, const int8_t* w, int64_t N,
                   const Epilogue& e, int64_t path, int64_t threads_attr) {
  Path p;
  ffi::Error err = CheckPath(path, &p);
  if (err.failure()) return err;
  const int64_t K = g.K(), Kp = (K + 3) / 4 * 4, panels = (N + 15) / 16;
  int8_t* packed = static_cast<int8_t*>(tls_wpack.Get(panels * Kp * 16));
  int32_t* colsum = static_cast<int32_t*>(tls_sums.Get(panels * 16 * sizeof(int32_t)));
  const int threads = ThreadsFor(g.M() * N * std::max<int64_t>(K, 1), threads_attr);
#ifdef QJAX_X86
  if (Avx512(p) && DirectConv(g, N) && !Int32Out(e)) {  // it requantizes only
    if (g.M() == 0) return ffi::Error::Success();
    RunDirectConv(x, g, w, N, e, threads);
    return ffi::Error::Success();
  }
  if (Avx512(p)) {
    PackPanelsVnni(w, N, K, Kp, packed, colsum, threads);
  } else {
    PackPanels(w, N, K, Kp, packed, colsum, threads);
  }
#else
  PackPanels(w, N, K, Kp, packed, colsum, threads);
#endif
  return RunConvPanels(x, g, packed, colsum, N, e, path, threads_attr);
}

// x (B, H, W, C), w (N, KH * KW * C), out (B, OH, OW, N) of a valid convolution.
ffi::Error ConvShapes(const ffi::AnyBuffer::Dimensions& xd, const ffi::AnyBuffer::Dimensions& wd,
                      const ffi::AnyBuffer::Dimensions& od, size_t offset_count, int64_t kh,
                      int64_t kw, int64_t sh, int64_t sw, int64_t dh, int64_t dw,
                      ConvGeom* g, int64_t* N) {
  if (xd.size() != 4 || wd.size() != 2 || od.size() != 4) {
    return ffi::Error::InvalidArgument("qjax int8 conv: x must be (B, H, W, C), w (N, KH*KW*C), "
                                       "the output (B, OH, OW, N)");
  }
  if (kh < 1 || kw < 1 || sh < 1 || sw < 1 || dh < 1 || dw < 1) {
    return ffi::Error::InvalidArgument("qjax int8 conv: window, strides and dilation must be "
                                       "positive");
  }
  g->B = xd[0]; g->H = xd[1]; g->W = xd[2]; g->C = xd[3];
  g->KH = kh; g->KW = kw; g->SH = sh; g->SW = sw; g->DH = dh; g->DW = dw;
  const int64_t eh = (kh - 1) * dh + 1, ew = (kw - 1) * dw + 1;
  g->OH = g->H >= eh ? (g->H - eh) / sh + 1 : 0;
  g->OW = g->W >= ew ? (g->W - ew) / sw + 1 : 0;
  *N = wd[0];
  if (wd[1] != g->K() || static_cast<int64_t>(offset_count) != *N || od[0] != g->B ||
      od[1] != g->OH || od[2] != g->OW || od[3] != *N) {
    return ffi::Error::InvalidArgument("qjax int8 conv: w must be (N, KH*KW*C), offset (N,) "
                                       "and the output (B, OH, OW, N)");
  }
  return ffi::Error::Success();
}

// x (B, H, W, C), panels (ceil(N/16), ceil(K/4), 16, 4) and N column sums, K = KH * KW * C,
// N = the offset's length, out (B, OH, OW, N).
ffi::Error ConvPackedShapes(const ffi::AnyBuffer::Dimensions& xd,
                            const ffi::AnyBuffer::Dimensions& pd,
                            const ffi::AnyBuffer::Dimensions& od, size_t colsum_count,
                            size_t offset_count, int64_t kh, int64_t kw, int64_t sh,
                            int64_t sw, int64_t dh, int64_t dw, ConvGeom* g, int64_t* N) {
  if (xd.size() != 4 || pd.size() != 4 || od.size() != 4) {
    return ffi::Error::InvalidArgument("qjax int8 conv: x must be (B, H, W, C), the panels "
                                       "4-D, the output (B, OH, OW, N)");
  }
  const int64_t n = static_cast<int64_t>(offset_count);
  const int64_t k = kh * kw * xd[3];
  const int64_t dims[2] = {n, k};
  const ffi::AnyBuffer::Dimensions wd(dims, 2);
  ffi::Error err = ConvShapes(xd, wd, od, offset_count, kh, kw, sh, sw, dh, dw, g, N);
  if (err.failure()) return err;
  if (pd[0] != (n + 15) / 16 || pd[1] != (k + 3) / 4 || pd[2] != 16 || pd[3] != 4 ||
      static_cast<int64_t>(colsum_count) != n) {
    return ffi::Error::InvalidArgument("qjax int8 conv: packed weights must be "
                                       "(ceil(N/16), ceil(KH*KW*C/4), 16, 4) with N column "
                                       "sums");
  }
  return ffi::Error::Success();
}

ffi::Error ConvPackedRequant(ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> panels,
                             ffi::Buffer<ffi::S32> colsum, ffi::Buffer<ffi::S32> offset,
                             ffi::AnyBuffer bias, ffi::AnyBuffer mult,
                             ffi::Buffer<ffi::S32> zero_point, ffi::ResultBuffer<ffi::S8> out,
                             int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh,
                             int64_t dw, int64_t lo, int64_t hi, bool relu, bool integer, int64_t path,
                             int64_t threads) {
  ConvGeom g;
  int64_t N;
  ffi::Error err = ConvPackedShapes(x.dimensions(), panels.dimensions(), out->dimensions(),
                                    colsum.element_count(), offset.element_count(), kh, kw,
                                    sh, sw, dh, dw, &g, &N);
  if (err.failure()) return err;
  Epilogue e;
  err = RequantEpilogue(offset, bias, mult, zero_point, out, N, lo, hi, relu, integer, &e);
  if (err.failure()) return err;
  return RunConvPanels(x.typed_data(), g, panels.typed_data(), colsum.typed_data(), N, e,
                       path, threads);
}

ffi::Error ConvRequant(ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w,
                       ffi::Buffer<ffi::S32> offset, ffi::AnyBuffer bias,
                       ffi::AnyBuffer mult, ffi::Buffer<ffi::S32> zero_point,
                       ffi::ResultBuffer<ffi::S8> out, int64_t kh, int64_t kw, int64_t sh,
                       int64_t sw, int64_t dh, int64_t dw, int64_t lo, int64_t hi, bool relu, bool integer,
                       int64_t path, int64_t threads) {
  ConvGeom g;
  int64_t N;
  ffi::Error err = ConvShapes(x.dimensions(), w.dimensions(), out->dimensions(),
                              offset.element_count(), kh, kw, sh, sw, dh, dw, &g, &N);
  if (err.failure()) return err;
  Epilogue e;
  err = RequantEpilogue(offset, bias, mult, zero_point, out, N, lo, hi, relu, integer, &e);
  if (err.failure()) return err;
  return RunConv(x.typed_data(), g, w.typed_data(), N, e, path, threads);
}

// A valid 2-D convolution's int32 accumulators (+ offset): the patch GEMM without an
// epilogue's requantization (the direct single-channel kernel requantizes only).
ffi::Error ConvS32(ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::S32> offset,
                   ffi::ResultBuffer<ffi::S32> out, int64_t kh, int64_t kw, int64_t sh,
                   int64_t sw, int64_t dh, int64_t dw, int64_t path, int64_t threads) {
  ConvGeom g;
  int64_t N;
  ffi::Error err = ConvShapes(x.dimensions(), w.dimensions(), out->dimensions(),
                              offset.element_count(), kh, kw, sh, sw, dh, dw, &g, &N);
  if (err.failure()) return err;
  Epilogue e;
  e.offset = offset.typed_data();
  e.out32 = out->typed_data();
  e.ldo = N;
  return RunConv(x.typed_data(), g, w.typed_data(), N, e, path, threads);
}

// The fused requantization alone, on an int32 accumulator (..., N) that XLA computed (a
// convolution the kernel does not take): no float intermediate in memory.
ffi::Error RequantS32(ffi::Buffer<ffi::S32> acc, ffi::Buffer<ffi::S32> offset,
                      ffi::AnyBuffer bias, ffi::AnyBuffer mult,
                      ffi::Buffer<ffi::S32> zero_point, ffi::ResultBuffer<ffi::S8> out,
                      int64_t lo, int64_t hi, bool relu, bool integer, int64_t path) {
  Path p;
  ffi::Error err = CheckPath(path, &p);
  if (err.failure()) return err;
  const auto dims = acc.dimensions();
  if (dims.size() < 1 || static_cast<int64_t>(offset.element_count()) != dims.back()) {
    return ffi::Error::InvalidArgument("qjax int8 requant: acc must be (..., N), offset (N,)");
  }
  const int64_t N = dims.back();
  const int64_t M = N ? static_cast<int64_t>(acc.element_count()) / N : 0;
  Epilogue e;
  err = RequantEpilogue(offset, bias, mult, zero_point, out, N, lo, hi, relu, integer, &e);
  if (err.failure()) return err;
  if (M == 0 || N == 0) return ffi::Error::Success();
  const int32_t* a = acc.typed_data();
  const auto run = [&](int64_t m0, int64_t m1) {
#ifdef QJAX_X86
    if (Avx512(p)) return EpilogueRowsVnni(a, m0, m1, N, e);
    if (p == kAvx2) return EpilogueRowsAvx2(a, m0, m1, N, e);
#endif
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t n = 0; n < N; ++n) ScalarEpilogue(e, m, n, a[m * N + n]);
    }
  };
  const int64_t rows_per_block = std::max<int64_t>(1, (int64_t{1} << 16) / N);
  const int64_t blocks = (M + rows_per_block - 1) / rows_per_block;
  if (blocks >= 8) {  // ~0.5M elements: both cores
    ParallelFor(blocks, HardwareThreads(), [&](int64_t b0, int64_t b1) {
      run(b0 * rows_per_block, std::min(M, b1 * rows_per_block));
    });
  } else {
    run(0, M);
  }
  return ffi::Error::Success();
}

// Pre-packed weights: panels (ceil(N/16), ceil(K/4), 16, 4), column sums (N,), N = the
// offset's length, K = x's last dimension.
ffi::Error PackedShapes(const ffi::AnyBuffer::Dimensions& xd,
                        const ffi::AnyBuffer::Dimensions& pd, size_t colsum_count,
                        size_t offset_count, int64_t* M, int64_t* N, int64_t* K) {
  if (xd.size() < 1) return ffi::Error::InvalidArgument("qjax int8 gemm: x must be (..., K)");
  *K = xd.back();
  *N = static_cast<int64_t>(offset_count);
  int64_t m = 1;
  for (size_t i = 0; i + 1 < xd.size(); ++i) m *= xd[i];
  *M = m;
  if (pd.size() != 4 || pd[0] != (*N + 15) / 16 || pd[1] != (*K + 3) / 4 || pd[2] != 16 ||
      pd[3] != 4 || static_cast<int64_t>(colsum_count) != *N) {
    return ffi::Error::InvalidArgument("qjax int8 gemm: packed weights must be "
                                       "(ceil(N/16), ceil(K/4), 16, 4) with N column sums");
  }
  return ffi::Error::Success();
}

ffi::Error PackedS32(ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> panels,
                     ffi::Buffer<ffi::S32> colsum, ffi::Buffer<ffi::S32> offset,
                     ffi::ResultBuffer<ffi::S32> out, int64_t path, int64_t threads) {
  int64_t M, N, K;
  ffi::Error err = PackedShapes(x.dimensions(), panels.dimensions(), colsum.element_count(),
                                offset.element_count(), &M, &N, &K);
  if (err.failure()) return err;
  Epilogue e;
  e.offset = offset.typed_data();
  e.out32 = out->typed_data();
  e.ldo = N;
  return RunPanels(x.typed_data(), panels.typed_data(), colsum.typed_data(), M, N, K, e, path,
                   threads);
}

ffi::Error PackedRequant(ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> panels,
                         ffi::Buffer<ffi::S32> colsum, ffi::Buffer<ffi::S32> offset,
                         ffi::AnyBuffer bias, ffi::AnyBuffer mult,
                         ffi::Buffer<ffi::S32> zero_point, ffi::ResultBuffer<ffi::S8> out,
                         int64_t lo, int64_t hi, bool relu, bool integer, int64_t path, int64_t threads) {
  int64_t M, N, K;
  ffi::Error err = PackedShapes(x.dimensions(), panels.dimensions(), colsum.element_count(),
                                offset.element_count(), &M, &N, &K);
  if (err.failure()) return err;
  Epilogue e;
  err = RequantEpilogue(offset, bias, mult, zero_point, out, N, lo, hi, relu, integer, &e);
  if (err.failure()) return err;
  return RunPanels(x.typed_data(), panels.typed_data(), colsum.typed_data(), M, N, K, e, path,
                   threads);
}

// ------------------------------------------------------------------------------------------
// Float -> int8: out = int8(clamp(rne(fma(y, mul, shift)), low, high) + add), NaN ->
// nan_value (XLA's float -> integer conversion is scalar on CPU: ~2 ns an element, 20-40x
// this). fma(y, mul, shift) is y * mul + shift with one rounding, as XLA contracts
// `x * (1/S) + Z` (qjax.numerics.scaled); mul = 1, shift = 0 gives y itself.

struct RoundParams {
  float mul = 1, shift = 0;
  float low = 0, high = 0;
  int32_t add = 0, nan_value = 0;
};

void RoundPortable(const float* y, int8_t* out, int64_t n, const RoundParams& r) {
  for (int64_t i = 0; i < n; ++i) {
    float v = std::fma(y[i], r.mul, r.shift);
    int32_t q;
    if (std::isnan(v)) {
      q = r.nan_value;
    } else {
      v = v < r.low ? r.low : (v > r.high ? r.high : v);
      q = static_cast<int32_t>(std::nearbyint(v)) + r.add;
    }
    out[i] = static_cast<int8_t>(q);
  }
}

#ifdef QJAX_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,fma")
void RoundAvx512(const float* y, int8_t* out, int64_t n, const RoundParams& r) {
  const __m512 lo = _mm512_set1_ps(r.low), hi = _mm512_set1_ps(r.high);
  const __m512 mul = _mm512_set1_ps(r.mul), shift = _mm512_set1_ps(r.shift);
  const __m512i add = _mm512_set1_epi32(r.add), nanv = _mm512_set1_epi32(r.nan_value);
  const auto convert = [&](__m512 v) {
    v = _mm512_fmadd_ps(v, mul, shift);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __m512 c = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    __m512i q = _mm512_cvt_roundps_epi32(c, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm512_add_epi32(q, add);
    return _mm512_cvtepi32_epi8(_mm512_mask_mov_epi32(q, nan, nanv));
  };
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m128i a = convert(_mm512_loadu_ps(y + i));
    const __m128i b = convert(_mm512_loadu_ps(y + i + 16));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_set_m128i(b, a));
  }
  for (; i < n; i += 16) {
    const int64_t left = n - i;
    const __mmask16 valid = Lanes16(left);
    _mm_mask_storeu_epi8(out + i, valid, convert(_mm512_maskz_loadu_ps(valid, y + i)));
  }
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
void RoundAvx2(const float* y, int8_t* out, int64_t n, const RoundParams& r) {
  const __m256 lo = _mm256_set1_ps(r.low), hi = _mm256_set1_ps(r.high);
  const __m256 mul = _mm256_set1_ps(r.mul), shift = _mm256_set1_ps(r.shift);
  const __m256i add = _mm256_set1_epi32(r.add), nanv = _mm256_set1_epi32(r.nan_value);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_fmadd_ps(_mm256_loadu_ps(y + i), mul, shift);
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    const __m256 c = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
    __m256i q = _mm256_cvtps_epi32(_mm256_round_ps(c, _MM_FROUND_TO_NEAREST_INT |
                                                          _MM_FROUND_NO_EXC));
    q = _mm256_add_epi32(q, add);
    q = _mm256_blendv_epi8(q, nanv, _mm256_castps_si256(nan));
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), q);
    for (int j = 0; j < 8; ++j) out[i + j] = static_cast<int8_t>(lanes[j]);
  }
  RoundPortable(y + i, out + i, n - i, r);
}
#pragma GCC pop_options
#endif

// Whether y[0, n) holds a NaN or +-inf (y - y is NaN exactly there).
bool NonFinitePortable(const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(y[i])) return true;
  }
  return false;
}

#ifdef QJAX_X86
#pragma GCC push_options
#pragma GCC target("avx512f")
bool NonFiniteAvx512(const float* y, int64_t n) {
  const __m512 zero = _mm512_setzero_ps();
  __mmask16 bad = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(y + i);
    bad |= _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), zero, _CMP_UNORD_Q);
  }
  if (i < n) {  // masked-off lanes load 0, which is finite
    const __mmask16 valid = Lanes16(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(valid, y + i);
    bad |= _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), zero, _CMP_UNORD_Q);
  }
  return bad != 0;
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2")
bool NonFiniteAvx2(const float* y, int64_t n) {
  __m256 bad = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(y + i);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(v, v), v, _CMP_UNORD_Q));
  }
  return _mm256_movemask_ps(bad) != 0 || NonFinitePortable(y + i, n - i);
}
#pragma GCC pop_options
#endif

ffi::Error ParseRound(ffi::Buffer<ffi::F32>& affine, ffi::Buffer<ffi::S32>& params,
                      RoundParams* r) {
  if (params.element_count() != 4) {
    return ffi::Error::InvalidArgument("qjax int8 round: params must be (low, high, add, "
                                       "nan_value)");
  }
  if (affine.element_count() != 2) {
    return ffi::Error::InvalidArgument("qjax int8 round: affine must be (mul, shift)");
  }
  const int32_t* prm = params.typed_data();
  r->mul = affine.typed_data()[0];
  r->shift = affine.typed_data()[1];
  r->low = static_cast<float>(prm[0]);
  r->high = static_cast<float>(prm[1]);
  r->add = prm[2];
  r->nan_value = prm[3];
  return ffi::Error::Success();
}

void RoundOn(Path p, const float* src, int8_t* dst, int64_t n, const RoundParams& r) {
#ifdef QJAX_X86
  if (Avx512(p)) return RoundAvx512(src, dst, n, r);
  if (p == kAvx2) return RoundAvx2(src, dst, n, r);
#endif
  RoundPortable(src, dst, n, r);
}

bool NonFiniteOn(Path p, const float* y, int64_t n) {
#ifdef QJAX_X86
  if (Avx512(p)) return NonFiniteAvx512(y, n);
  if (p == kAvx2) return NonFiniteAvx2(y, n);
#endif
  return NonFinitePortable(y, n);
}

ffi::Error RoundInt8(ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> affine,
                     ffi::Buffer<ffi::S32> params, ffi::ResultBuffer<ffi::S8> out,
                     int64_t path) {
  Path p;
  ffi::Error err = CheckPath(path, &p);
  if (err.failure()) return err;
  RoundParams r;
  err = ParseRound(affine, params, &r);
  if (err.failure()) return err;
  const int64_t n = static_cast<int64_t>(y.element_count());
  const float* src = y.typed_data();
  int8_t* dst = out->typed_data();
  const auto run = [&](int64_t b, int64_t e) { RoundOn(p, src + b, dst + b, e - b, r); };
  constexpr int64_t kBlock = int64_t{1} << 16;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  if (blocks >= 8) {  // ~0.5M elements: both cores
    ParallelFor(blocks, HardwareThreads(), [&](int64_t b0, int64_t b1) {
      run(b0 * kBlock, std::min(n, b1 * kBlock));
    });
  } else {
    run(0, n);
  }
  return ffi::Error::Success();
}

// RoundInt8 over the rows of y (its leading axis; y of rank <= 1 is one row), each row's
// NaN / +-inf read as 0, and bad[i] = 1 where row i held one (0 elsewhere): a model input's
// quantization and its non-finite samples in one pass over the input.
// The QAT passes over floats (the fused point's fake quantization, the int8 forward's
// rounding of activations and packing of weights) run on every core from this many floats
// on; 256 x 100 stays on one (the hand-off would cost more than it saves). On a 2-core Xeon:
// a 256 x 784 fake quantization alone 54 -> 40 us, its rounding 30 -> 22 us; the MNIST MLP's
// int8-forward QAT step 1.23-1.25x -> 1.19x (the point) -> 1.11-1.13x (the rounding) the
// float step.
constexpr int64_t kFakeQuantParallel = int64_t{1} << 16;

ffi::Error RoundInt8Rows(ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> affine,
                         ffi::Buffer<ffi::S32> params, ffi::ResultBuffer<ffi::S8> out,
                         ffi::ResultBuffer<ffi::PRED> bad, int64_t path) {
  Path p;
  ffi::Error err = CheckPath(path, &p);
  if (err.failure()) return err;
  RoundParams r;
  err = ParseRound(affine, params, &r);
  if (err.failure()) return err;
  const int64_t n = static_cast<int64_t>(y.element_count());
  const auto dims = y.dimensions();
  const int64_t rows = dims.size() >= 2 ? dims[0] : 1;
  if (static_cast<int64_t>(bad->element_count()) != rows) {
    return ffi::Error::InvalidArgument("qjax int8 round rows: bad must have one entry a row");
  }
  if (rows == 0) return ffi::Error::Success();
  const int64_t row = n / rows;
  const float* src = y.typed_data();
  int8_t* dst = out->typed_data();
  bool* flags = bad->typed_data();
  const auto run = [&](int64_t r0, int64_t r1) {
    std::vector<float> clean;
    for (int64_t i = r0; i < r1; ++i) {
      const float* in = src + i * row;
      const bool nonfinite = NonFiniteOn(p, in, row);
      flags[i] = nonfinite;
      if (nonfinite) {  // rare: round a copy with the non-finite entries set to 0
        clean.assign(in, in + row);
        for (float& v : clean) v = std::isfinite(v) ? v : 0.0f;
        in = clean.data();
      }
      RoundOn(p, in, dst + i * row, row, r);
    }
  };
  // From 2^16 floats on, both cores (as the fused QAT point): tasks of ~2^14 floats, whole
  // rows (a 256 x 784 batch: 30 -> 20 us).
  constexpr int64_t kBlock = int64_t{1} << 14;
  const int64_t rows_per_task = std::max<int64_t>(1, kBlock / std::max<int64_t>(row, 1));
  const int64_t tasks = (rows + rows_per_task - 1) / rows_per_task;
  if (n >= kFakeQuantParallel && tasks >= 2) {
    ParallelFor(tasks, HardwareThreads(), [&](int64_t t0, int64_t t1) {
      run(t0 * rows_per_task, std::min(rows, t1 * rows_per_task));
    });
  } else {
    run(0, rows);
  }
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------------------
// int8 -> float32 at an integer region's end: out = float(q - zero_point) * scale (the
// difference is exact in float32, so one rounding, as XLA's convert-subtract-multiply), and
// NaN for the rows whose model input held a NaN or +-inf: bad has one entry a row of q (its
// leading axis; q of rank <= 1 is one row), one entry (then every row), or none.

ffi::Error DequantRows(ffi::Buffer<ffi::S8> q, ffi::Buffer<ffi::F32> scale,
                       ffi::Buffer<ffi::S32> zero_point, ffi::Buffer<ffi::PRED> bad,
                       ffi::ResultBuffer<ffi::F32> out) {
  if (scale.element_count() != 1 || zero_point.element_count() != 1) {
    return ffi::Error::InvalidArgument("qjax int8 dequant: scale and zero_point must be "
                                       "scalars");
  }
  const int64_t n = static_cast<int64_t>(q.element_count());
  const auto dims = q.dimensions();
  const int64_t rows = dims.size() >= 2 ? dims[0] : 1;
  const int64_t flags = static_cast<int64_t>(bad.element_count());
  if (flags != rows && flags > 1) {
    return ffi::Error::InvalidArgument("qjax int8 dequant: bad must have one entry a row, "
                                       "one entry or none");
  }
  if (n == 0) return ffi::Error::Success();
  const int64_t row = n / rows;
  const float s = scale.typed_data()[0];
  const int32_t z = zero_point.typed_data()[0];
  const int8_t* src = q.typed_data();
  const bool* marks = bad.typed_data();
  float* dst = out->typed_data();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t i = 0; i < rows; ++i) {
    const bool masked = flags != 0 && marks[flags == 1 ? 0 : i];
    const int8_t* in = src + i * row;
    float* o = dst + i * row;
    if (masked) {
      for (int64_t j = 0; j < row; ++j) o[j] = nan;
    } else {
      for (int64_t j = 0; j < row; ++j) {
        o[j] = static_cast<float>(static_cast<int32_t>(in[j]) - z) * s;
      }
    }
  }
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------------------
// The grid integers of fake-quantized float weights w (K, N) (nn.Dense's layout), packed for
// the GEMM: panels[p][g][c][j] = sat8(rne(w[4g + j][16p + c] * inv[16p + c])) (0 beyond K or
// N, and for NaN / +-inf), their column sums, and the columns holding a NaN or +-inf. One
// pass; the transposing copy and the rounding that XLA:CPU runs as separate slow loops.

// Panels p0..p1 (each writes only its own panel, column sums and flags).
void PackRoundPortable(const float* w, const float* inv, int64_t K, int64_t N, int8_t* panels,
                       int32_t* colsum, bool* bad, int64_t p0, int64_t p1) {
  const int64_t G = (K + 3) / 4;
  for (int64_t n = 16 * p0; n < std::min(N, 16 * p1); ++n) colsum[n] = 0, bad[n] = false;
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t g = 0; g < G; ++g) {
      int8_t* dst = panels + (p * G + g) * 64;
      for (int64_t c = 0; c < 16; ++c) {
        for (int64_t j = 0; j < 4; ++j) {
          const int64_t k = 4 * g + j, n = 16 * p + c;
          int8_t v = 0;
          if (k < K && n < N) {
            const float f = w[k * N + n];
            if (!std::isfinite(f)) {
              bad[n] = true;
            } else {
              const float r = std::nearbyint(f * inv[n]);  // product rounded, then rne
              v = static_cast<int8_t>(r < -128.0f ? -128.0f : (r > 127.0f ? 127.0f : r));
              colsum[n] += v;
            }
          }
          dst[c * 4 + j] = v;
        }
      }
    }
  }
}

#ifdef QJAX_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")
void PackRoundAvx512(const float* w, const float* inv, int64_t K, int64_t N, int8_t* panels,
                     int32_t* colsum, bool* bad, int64_t p0, int64_t p1) {
  const int64_t G = (K + 3) / 4;
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n0 = 16 * p;
    const __mmask16 valid = Lanes16(N - n0);
    const __m512 vinv = _mm512_maskz_loadu_ps(valid, inv + n0);
    __m512i sum = _mm512_setzero_si512();
    __mmask16 nonfinite = 0;
    for (int64_t g = 0; g < G; ++g) {
      __m128i b[4];
      for (int j = 0; j < 4; ++j) {
        const int64_t k = 4 * g + j;
        const __m512 v = k < K ? _mm512_maskz_loadu_ps(valid, w + k * N + n0) : zero;
        const __mmask16 odd = _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), zero, _CMP_UNORD_Q);
        nonfinite |= odd;
        // Clamped as floats, then vcvtps2dq rounds to nearest even (MXCSR's default); NaN /
        // inf lanes become 0.
        const __m512 prod = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, vinv),
                                                        _mm512_set1_ps(-128.0f)),
                                          _mm512_set1_ps(127.0f));
        const __m512i s = _mm512_maskz_cvtps_epi32(static_cast<__mmask16>(~odd), prod);
        sum = _mm512_add_epi32(sum, s);
        b[j] = _mm512_cvtepi32_epi8(s);
      }
      // Bytes c of the four rows side by side: [c][j].
      const __m128i lo01 = _mm_unpacklo_epi8(b[0], b[1]), hi01 = _mm_unpackhi_epi8(b[0], b[1]);
      const __m128i lo23 = _mm_unpacklo_epi8(b[2], b[3]), hi23 = _mm_unpackhi_epi8(b[2], b[3]);
      __m128i* dst = reinterpret_cast<__m128i*>(panels + (p * G + g) * 64);
      _mm_storeu_si128(dst, _mm_unpacklo_epi16(lo01, lo23));
      _mm_storeu_si128(dst + 1, _mm_unpackhi_epi16(lo01, lo23));
      _mm_storeu_si128(dst + 2, _mm_unpacklo_epi16(hi01, hi23));
      _mm_storeu_si128(dst + 3, _mm_unpackhi_epi16(hi01, hi23));
    }
    _mm512_mask_storeu_epi32(colsum + n0, valid, sum);
    const __m128i flags = _mm_maskz_mov_epi8(nonfinite, _mm_set1_epi8(1));
    _mm_mask_storeu_epi8(bad + n0, valid, flags);
  }
}
#pragma GCC pop_options
#endif

ffi::Error PackRound(ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> inv,
                     ffi::ResultBuffer<ffi::S8> panels, ffi::ResultBuffer<ffi::S32> colsum,
                     ffi::ResultBuffer<ffi::PRED> bad, int64_t path) {
  Path p;
  if (ffi::Error e = CheckPath(path, &p); e.failure()) return e;
  const auto wd = w.dimensions();
  if (wd.size() != 2) return ffi::Error::InvalidArgument("qjax pack_round: w must be (K, N)");
  const int64_t K = wd[0], N = wd[1];
  const auto pd = panels->dimensions();
  if (static_cast<int64_t>(inv.element_count()) != N ||
      static_cast<int64_t>(colsum->element_count()) != N ||
      static_cast<int64_t>(bad->element_count()) != N || pd.size() != 4 ||
      pd[0] != (N + 15) / 16 || pd[1] != (K + 3) / 4 || pd[2] != 16 || pd[3] != 4) {
    return ffi::Error::InvalidArgument("qjax pack_round: inv, column sums and flags must be "
                                       "(N,), the panels (ceil(N / 16), ceil(K / 4), 16, 4)");
  }
  if (K == 0 || N == 0) {
    std::memset(panels->typed_data(), 0, panels->element_count());
    std::memset(colsum->typed_data(), 0, N * sizeof(int32_t));
    std::memset(bad->typed_data(), 0, N);
    return ffi::Error::Success();
  }
  // Panels split over the cores from 2^16 weights on (as the fused QAT point).
  const int threads = K * N >= kFakeQuantParallel ? HardwareThreads() : 1;
  ParallelFor((N + 15) / 16, threads, [&](int64_t p0, int64_t p1) {
#ifdef QJAX_X86
    if (Avx512(p)) {
      PackRoundAvx512(w.typed_data(), inv.typed_data(), K, N, panels->typed_data(),
                      colsum->typed_data(), bad->typed_data(), p0, p1);
      return;
    }
#endif
    PackRoundPortable(w.typed_data(), inv.typed_data(), K, N, panels->typed_data(),
                      colsum->typed_data(), bad->typed_data(), p0, p1);
  });
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------------------
// A QAT quantization point in one call, as PyTorch's fused_moving_avg_obs_fake_quant: the
// batch's min / max (per tensor or per channel), the observer's update (running min / max,
// or the moving average with PyTorch's three float32 roundings), the qparams of the new
// state (qjax.numerics.qparams_from_minmax) and the fake quantization of x with the mask of
// its in-range entries (qjax.numerics.fake_quant_with_mask), each float32 operation rounded
// as qjax's XLA form rounds it. x is viewed as (outer, channels, inner); per tensor it is
// one channel. A batch holding NaN / +-inf, or one that makes the range too wide for
// float32, leaves the state as it was and counts as skipped (XLA's observer: the same).

struct FqGrid {
  float qmin = 0, qmax = 0;
};

#ifdef QJAX_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")
// Four min / max accumulator pairs (one chain is latency-bound) and a NaN / inf detector:
// v - v is 0 for a finite v and NaN for NaN / inf, and a sum of them is NaN iff one is.
struct Fold4 {
  __m512 lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3, odd;

  Fold4(__m512 lo, __m512 hi)
      : lo0(lo), lo1(lo), lo2(lo), lo3(lo), hi0(hi), hi1(hi), hi2(hi), hi3(hi),
        odd(_mm512_setzero_ps()) {}

  void Add4(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
    odd = _mm512_add_ps(odd, _mm512_add_ps(
        _mm512_add_ps(_mm512_sub_ps(v0, v0), _mm512_sub_ps(v1, v1)),
        _mm512_add_ps(_mm512_sub_ps(v2, v2), _mm512_sub_ps(v3, v3))));
    lo0 = _mm512_min_ps(lo0, v0), hi0 = _mm512_max_ps(hi0, v0);
    lo1 = _mm512_min_ps(lo1, v1), hi1 = _mm512_max_ps(hi1, v1);
    lo2 = _mm512_min_ps(lo2, v2), hi2 = _mm512_max_ps(hi2, v2);
    lo3 = _mm512_min_ps(lo3, v3), hi3 = _mm512_max_ps(hi3, v3);
  }

  // v's `valid` lanes (the others must be 0, as a masked load leaves them).
  void Add(__m512 v, __mmask16 valid) {
    odd = _mm512_add_ps(odd, _mm512_sub_ps(v, v));
    lo0 = _mm512_mask_min_ps(lo0, valid, lo0, v);
    hi0 = _mm512_mask_max_ps(hi0, valid, hi0, v);
  }

  __m512 Lo() const { return _mm512_min_ps(_mm512_min_ps(lo0, lo1), _mm512_min_ps(lo2, lo3)); }
  __m512 Hi() const { return _mm512_max_ps(_mm512_max_ps(hi0, hi1), _mm512_max_ps(hi2, hi3)); }
  bool Finite() const { return _mm512_cmp_ps_mask(odd, _mm512_setzero_ps(), _CMP_UNORD_Q) == 0; }
};

// Folds x[0, n) into *lo / *hi; false when x holds NaN or inf (*lo / *hi are then meaningless).
bool FoldRangeAvx512(const float* x, int64_t n, float* lo, float* hi) {
  Fold4 f(_mm512_set1_ps(*lo), _mm512_set1_ps(*hi));
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    f.Add4(_mm512_loadu_ps(x + i), _mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i + 32),
           _mm512_loadu_ps(x + i + 48));
  }
  for (; i < n; i += 16) {
    const __mmask16 valid = Lanes16(n - i);
    f.Add(_mm512_maskz_loadu_ps(valid, x + i), valid);
  }
  *lo = _mm512_reduce_min_ps(f.Lo());
  *hi = _mm512_reduce_max_ps(f.Hi());
  return f.Finite();
}

// Folds the rows x[r, 0, c) (row stride c) into lo[0, c) / hi[0, c); false when they hold
// NaN or inf. Four rows at a time, all their columns, so x streams in order.
bool FoldRowsAvx512(const float* x, int64_t rows, int64_t c, float* lo, float* hi) {
  __m512 odd = _mm512_setzero_ps();
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const float* row = x + r * c;
    for (int64_t j = 0; j < c; j += 16) {
      const __mmask16 valid = Lanes16(c - j);
      const __m512 v0 = _mm512_maskz_loadu_ps(valid, row + j);
      const __m512 v1 = _mm512_maskz_loadu_ps(valid, row + c + j);
      const __m512 v2 = _mm512_maskz_loadu_ps(valid, row + 2 * c + j);
      const __m512 v3 = _mm512_maskz_loadu_ps(valid, row + 3 * c + j);
      odd = _mm512_add_ps(odd, _mm512_add_ps(
          _mm512_add_ps(_mm512_sub_ps(v0, v0), _mm512_sub_ps(v1, v1)),
          _mm512_add_ps(_mm512_sub_ps(v2, v2), _mm512_sub_ps(v3, v3))));
      const __m512 l = _mm512_min_ps(_mm512_min_ps(v0, v1), _mm512_min_ps(v2, v3));
      const __m512 h = _mm512_max_ps(_mm512_max_ps(v0, v1), _mm512_max_ps(v2, v3));
      _mm512_mask_storeu_ps(lo + j, valid, _mm512_min_ps(_mm512_maskz_loadu_ps(valid, lo + j), l));
      _mm512_mask_storeu_ps(hi + j, valid, _mm512_max_ps(_mm512_maskz_loadu_ps(valid, hi + j), h));
    }
  }
  for (; r < rows; ++r) {
    for (int64_t j = 0; j < c; j += 16) {
      const __mmask16 valid = Lanes16(c - j);
      const __m512 v = _mm512_maskz_loadu_ps(valid, x + r * c + j);
      odd = _mm512_add_ps(odd, _mm512_sub_ps(v, v));
      _mm512_mask_storeu_ps(lo + j, valid, _mm512_min_ps(_mm512_maskz_loadu_ps(valid, lo + j), v));
      _mm512_mask_storeu_ps(hi + j, valid, _mm512_max_ps(_mm512_maskz_loadu_ps(valid, hi + j), v));
    }
  }
  return _mm512_cmp_ps_mask(odd, _mm512_setzero_ps(), _CMP_UNORD_Q) == 0;
}

// With r = rne(x * inv), lo = qmin - zp, hi = qmax - zp (exact: small integers):
//   out = clamp(r, lo, hi) * scale + 0,   inside = lo <= r <= hi,
// the same floats as (clamp(r + zp, qmin, qmax) - zp) * scale: r + zp is exact wherever it
// can land inside [qmin, qmax] (|r| < 2^24), beyond that both clamp to the same bound, and
// the + 0 (in one fma) turns a -0 (a small negative x rounded to zero) into +0 as c - zp
// does. NaN stays NaN (vmaxps / vminps return their second operand on NaN).
// With `clamped`, also clamp(r, lo, hi) (NaN for NaN).
inline __m512 FakeQuantAvx512(__m512 v, __m512 inv, __m512 lo, __m512 hi, __m512 scale,
                              __mmask16* inside, __m512* clamped = nullptr) {
  const __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(v, inv),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  if (inside) {
    *inside = _mm512_cmp_ps_mask(r, lo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(r, hi, _CMP_LE_OQ);
  }
  const __m512 c = _mm512_min_ps(hi, _mm512_max_ps(lo, r));
  if (clamped) *clamped = c;
  return _mm512_fmadd_ps(c, scale, _mm512_setzero_ps());
}

// A vector of grid integers (exact small floats; NaN lanes and those outside `keep` 0) as
// int32.
inline __m512i Codes32(__m512 clamped, __mmask16 keep) {
  const __mmask16 number = _mm512_cmp_ps_mask(clamped, clamped, _CMP_ORD_Q);
  return _mm512_maskz_cvtps_epi32(keep & number, clamped);
}

// With `codes`, also the int8 codes clamp(r, lo, hi) + zp - shift (0 for NaN); returns
// whether y holds no NaN.
bool FakeQuantRunAvx512(const float* x, float* out, bool* mask, int64_t n, float inv, float zp,
                        float scale, const FqGrid& g, int8_t* codes = nullptr,
                        int64_t shift = 0) {
  const __m512 vinv = _mm512_set1_ps(inv), vscale = _mm512_set1_ps(scale);
  const __m512 lo = _mm512_set1_ps(g.qmin - zp), hi = _mm512_set1_ps(g.qmax - zp);
  const __m512 offset = _mm512_set1_ps(zp - static_cast<float>(shift));
  const __m128i one = _mm_set1_epi8(1);
  __mmask16 nan = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 valid = Lanes16(n - i);
    __mmask16 inside;
    __m512 clamped;
    const __m512 y = FakeQuantAvx512(_mm512_maskz_loadu_ps(valid, x + i), vinv, lo, hi, vscale,
                                     mask ? &inside : nullptr, &clamped);
    _mm512_mask_storeu_ps(out + i, valid, y);
    if (mask) _mm_mask_storeu_epi8(mask + i, valid, _mm_maskz_mov_epi8(inside, one));
    if (codes) {
      nan |= _mm512_mask_cmp_ps_mask(valid, y, y, _CMP_UNORD_Q);
      const __m512i q = Codes32(_mm512_add_ps(clamped, offset), valid);
      _mm_mask_storeu_epi8(codes + i, valid, _mm512_cvtepi32_epi8(q));
    }
  }
  return nan == 0;
}

// The panels of a fake-quantized (K, N) weight over the groups of four rows [g0, g1): y and
// the mask as FakeQuantRowsAvx512, the codes k = clamp(r, qmin - zp, qmax - zp) in
// PackRound's layout (0 beyond K and for NaN), their column sums added into sums[0, N).
// Returns whether y holds no NaN.
bool FakeQuantPanelsAvx512(const float* x, float* out, bool* mask, int64_t K, int64_t N,
                           const float* inv, const float* zp, const float* scale,
                           const FqGrid& g, int8_t* panels, int32_t* sums, int64_t g0,
                           int64_t g1) {
  const int64_t G = (K + 3) / 4;
  const __m512 qmin = _mm512_set1_ps(g.qmin), qmax = _mm512_set1_ps(g.qmax);
  const __m128i one = _mm_set1_epi8(1);
  __mmask16 nan = 0;
  for (int64_t gi = g0; gi < g1; ++gi) {
    for (int64_t n0 = 0; n0 < N; n0 += 16) {
      const __mmask16 valid = Lanes16(N - n0);
      const __m512 vzp = _mm512_maskz_loadu_ps(valid, zp + n0);
      const __m512 vinv = _mm512_maskz_loadu_ps(valid, inv + n0);
      const __m512 vscale = _mm512_maskz_loadu_ps(valid, scale + n0);
      const __m512 lo = _mm512_sub_ps(qmin, vzp), hi = _mm512_sub_ps(qmax, vzp);
      __m512i sum = _mm512_maskz_loadu_epi32(valid, sums + n0);
      __m128i b[4];
      for (int j = 0; j < 4; ++j) {
        const int64_t k = 4 * gi + j;
        if (k >= K) {
          b[j] = _mm_setzero_si128();
          continue;
        }
        __mmask16 inside;
        __m512 clamped;
        const __m512 y = FakeQuantAvx512(_mm512_maskz_loadu_ps(valid, x + k * N + n0), vinv,
                                         lo, hi, vscale, mask ? &inside : nullptr, &clamped);
        _mm512_mask_storeu_ps(out + k * N + n0, valid, y);
        if (mask) _mm_mask_storeu_epi8(mask + k * N + n0, valid, _mm_maskz_mov_epi8(inside, one));
        nan |= _mm512_mask_cmp_ps_mask(valid, y, y, _CMP_UNORD_Q);
        const __m512i q = Codes32(clamped, valid);
        sum = _mm512_add_epi32(sum, q);
        b[j] = _mm512_cvtepi32_epi8(q);
      }
      // Bytes c of the four rows side by side: [c][j] (PackRoundAvx512's interleave).
      const __m128i lo01 = _mm_unpacklo_epi8(b[0], b[1]), hi01 = _mm_unpackhi_epi8(b[0], b[1]);
      const __m128i lo23 = _mm_unpacklo_epi8(b[2], b[3]), hi23 = _mm_unpackhi_epi8(b[2], b[3]);
      __m128i* dst = reinterpret_cast<__m128i*>(panels + ((n0 / 16) * G + gi) * 64);
      _mm_storeu_si128(dst, _mm_unpacklo_epi16(lo01, lo23));
      _mm_storeu_si128(dst + 1, _mm_unpackhi_epi16(lo01, lo23));
      _mm_storeu_si128(dst + 2, _mm_unpacklo_epi16(hi01, hi23));
      _mm_storeu_si128(dst + 3, _mm_unpackhi_epi16(hi01, hi23));
      _mm512_mask_storeu_epi32(sums + n0, valid, sum);
    }
  }
  return nan == 0;
}

void FakeQuantRowsAvx512(const float* x, float* out, bool* mask, int64_t rows, int64_t c,
                         const float* inv, const float* zp, const float* scale,
                         const FqGrid& g) {
  const __m512 qmin = _mm512_set1_ps(g.qmin), qmax = _mm512_set1_ps(g.qmax);
  const __m128i one = _mm_set1_epi8(1);
  // Row by row (x and out stream in order); a channel's parameters come from L1. Column
  // blocks running down all the rows took 22 us for 784 x 100 weights with the mask on a
  // Xeon core, rows 13 us.
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < c; j += 16) {
      const __mmask16 valid = Lanes16(c - j);
      const __m512 vzp = _mm512_maskz_loadu_ps(valid, zp + j);
      __mmask16 inside;
      const __m512 y = FakeQuantAvx512(
          _mm512_maskz_loadu_ps(valid, x + r * c + j), _mm512_maskz_loadu_ps(valid, inv + j),
          _mm512_sub_ps(qmin, vzp), _mm512_sub_ps(qmax, vzp),
          _mm512_maskz_loadu_ps(valid, scale + j), mask ? &inside : nullptr);
      _mm512_mask_storeu_ps(out + r * c + j, valid, y);
      if (mask) _mm_mask_storeu_epi8(mask + r * c + j, valid, _mm_maskz_mov_epi8(inside, one));
    }
  }
}
#pragma GCC pop_options
#endif

// NaN-propagating min / max (jnp.minimum / jnp.maximum).
inline float MinNan(float a, float b) {
  return std::isnan(a) || std::isnan(b) ? NAN : (a < b ? a : b);
}
inline float MaxNan(float a, float b) {
  return std::isnan(a) || std::isnan(b) ? NAN : (a > b ? a : b);
}

bool FoldRange(Path p, const float* x, int64_t n, float* lo, float* hi) {
#ifdef QJAX_X86
  if (Avx512(p)) return FoldRangeAvx512(x, n, lo, hi);
#endif
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    finite &= std::isfinite(v);
    *lo = v < *lo ? v : *lo;
    *hi = v > *hi ? v : *hi;
  }
  return finite;
}

bool FoldRows(Path p, const float* x, int64_t rows, int64_t c, float* lo, float* hi) {
#ifdef QJAX_X86
  if (Avx512(p)) return FoldRowsAvx512(x, rows, c, lo, hi);
#endif
  bool finite = true;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < c; ++j) {
      const float v = x[r * c + j];
      finite &= std::isfinite(v);
      lo[j] = v < lo[j] ? v : lo[j];
      hi[j] = v > hi[j] ? v : hi[j];
    }
  }
  return finite;
}

inline float FakeQuantOne(float v, float inv, float zp, float scale, const FqGrid& g,
                          bool* inside) {
  const float shifted = std::nearbyint(v * inv) + zp;
  if (inside) *inside = shifted >= g.qmin && shifted <= g.qmax;
  return (MinNan(g.qmax, MaxNan(g.qmin, shifted)) - zp) * scale;
}

// With `codes`, also y's int8 codes clamp(rne(x inv) + zp, qmin, qmax) - shift (0 for NaN);
// returns whether y holds no NaN (checked only with `codes`).
bool FakeQuantRun(Path p, const float* x, float* out, bool* mask, int64_t n, float inv,
                  float zp, float scale, const FqGrid& g, int8_t* codes = nullptr,
                  int64_t shift = 0) {
#ifdef QJAX_X86
  if (Avx512(p)) return FakeQuantRunAvx512(x, out, mask, n, inv, zp, scale, g, codes, shift);
#endif
  bool clean = true;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = FakeQuantOne(x[i], inv, zp, scale, g, mask ? mask + i : nullptr);
    if (codes) {
      // y is S k exactly, so rne(y (1/S)) recovers k (|k| <= 255).
      const bool number = !std::isnan(out[i]);
      clean &= number;
      codes[i] = number ? static_cast<int8_t>(static_cast<int32_t>(std::nearbyint(out[i] * inv)) +
                                              static_cast<int32_t>(zp) - shift)
                        : 0;
    }
  }
  return clean;
}

void FakeQuantRows(Path p, const float* x, float* out, bool* mask, int64_t rows, int64_t c,
                   const float* inv, const float* zp, const float* scale, const FqGrid& g) {
#ifdef QJAX_X86
  if (Avx512(p)) return FakeQuantRowsAvx512(x, out, mask, rows, c, inv, zp, scale, g);
#endif
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < c; ++j) {
      out[r * c + j] = FakeQuantOne(x[r * c + j], inv[j], zp[j], scale[j], g,
                                    mask ? mask + r * c + j : nullptr);
    }
  }
}

// float32 -> int32 as XLA converts: NaN -> 0, out of range saturates.
inline int32_t ToInt32(float v) {
  if (std::isnan(v)) return 0;
  if (v >= 2147483648.0f) return std::numeric_limits<int32_t>::max();
  if (v <= -2147483648.0f) return std::numeric_limits<int32_t>::min();
  return static_cast<int32_t>(v);
}

// What a fused point emits beside y for the int8 forward (`emit`): nothing; an activation's
// int8 codes clamp(rne(x / S) + Z, qmin, qmax) - shift, x's shape (per tensor); or a (K, N)
// weight's codes packed as PackRound packs them, with their column sums. Either comes with a
// flag: y holds a NaN (its codes are 0 there).
constexpr int64_t kEmitNone = 0, kEmitRows = 1, kEmitPanels = 2;

ffi::Error FakeQuantObserve(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> min_in,
                            ffi::Buffer<ffi::F32> max_in, ffi::Buffer<ffi::S32> count_in,
                            ffi::Buffer<ffi::S32> skipped_in, ffi::ResultBuffer<ffi::F32> out,
                            ffi::ResultBuffer<ffi::PRED> mask,
                            ffi::ResultBuffer<ffi::F32> min_out,
                            ffi::ResultBuffer<ffi::F32> max_out,
                            ffi::ResultBuffer<ffi::S32> count_out,
                            ffi::ResultBuffer<ffi::S32> skipped_out,
                            ffi::ResultBuffer<ffi::F32> scale_out,
                            ffi::ResultBuffer<ffi::S32> zero_point_out,
                            ffi::ResultBuffer<ffi::S8> codes_out,
                            ffi::ResultBuffer<ffi::S32> sums_out,
                            ffi::ResultBuffer<ffi::PRED> nan_out, int64_t axis,
                            float averaging,  // 0: running min / max; else the average's c
                            int64_t qmin, int64_t qmax, float eps,
                            int64_t symmetric, int64_t symmetric_zero_point, int64_t emit,
                            int64_t shift, int64_t path) {
  Path p;
  ffi::Error err = CheckPath(path, &p);
  if (err.failure()) return err;
  const auto dims = x.dimensions();
  const int64_t n = static_cast<int64_t>(x.element_count());
  int64_t outer = 1, channels = 1, inner = n;
  if (axis >= 0) {
    if (axis >= static_cast<int64_t>(dims.size())) {
      return ffi::Error::InvalidArgument("qjax fake quant: axis out of range");
    }
    for (int64_t d = 0; d < axis; ++d) outer *= dims[d];
    channels = dims[axis];
    inner = channels == 0 || outer == 0 ? 0 : n / (outer * channels);
  }
  if (n == 0 || static_cast<int64_t>(min_in.element_count()) != channels ||
      static_cast<int64_t>(max_in.element_count()) != channels) {
    return ffi::Error::InvalidArgument("qjax fake quant: x must be non-empty and the state "
                                       "must have one entry a channel");
  }
  const int64_t mask_size = static_cast<int64_t>(mask->element_count());
  if (mask_size != n && mask_size != 0) {
    return ffi::Error::InvalidArgument("qjax fake quant: the mask must have x's size or none");
  }
  // The grid integers for the int8 forward (kEmit*), checked before anything is written.
  const int64_t K = dims.size() == 2 ? dims[0] : 0, N = dims.size() == 2 ? dims[1] : 0;
  if (emit == kEmitRows) {
    if (channels != 1 || static_cast<int64_t>(codes_out->element_count()) != n ||
        qmin - shift < -128 || qmax - shift > 127) {
      return ffi::Error::InvalidArgument("qjax fake quant: row codes need a per-tensor grid "
                                         "whose integers minus shift fit int8, and x's size");
    }
  } else if (emit == kEmitPanels) {
    const auto cd = codes_out->dimensions();
    if (dims.size() != 2 || (axis >= 0 && axis != 1) || !symmetric ||
        qmin - symmetric_zero_point < -128 || qmax - symmetric_zero_point > 127 ||
        cd.size() != 4 || cd[0] != (N + 15) / 16 || cd[1] != (K + 3) / 4 || cd[2] != 16 ||
        cd[3] != 4 || static_cast<int64_t>(sums_out->element_count()) != N) {
      return ffi::Error::InvalidArgument("qjax fake quant: panels need a (K, N) weight on a "
                                         "symmetric 8-bit grid (per tensor or along axis 1), "
                                         "panels (ceil(N / 16), ceil(K / 4), 16, 4), sums (N,)");
    }
  } else if (emit != kEmitNone) {
    return ffi::Error::InvalidArgument("qjax fake quant: emit must be 0, 1 or 2");
  }
  if (emit != kEmitNone && nan_out->element_count() != 1) {
    return ffi::Error::InvalidArgument("qjax fake quant: the NaN flag must be a scalar");
  }
  const FqGrid g{static_cast<float>(qmin), static_cast<float>(qmax)};
  const float* src = x.typed_data();
  std::vector<float> lo(channels, INFINITY), hi(channels, -INFINITY);
  bool finite = true;
  // Per tensor or per channel along the last axis, both passes run over chunks of whole rows
  // (of 16-float vectors per tensor), split over the cores from kFakeQuantParallel floats on
  // (one chunk below), the ranges of the chunks folded after (min / max are exact: the same
  // floats in any order). Other axes: one pass per (outer index, channel) run.
  const int64_t rows = inner == 1 ? outer : (channels == 1 && outer == 1 ? (n + 15) / 16 : 0);
  const int64_t row_len = inner == 1 ? channels : 16;
  const int64_t chunks = n >= kFakeQuantParallel ? std::min<int64_t>(rows, 16) : 1;
  const auto chunk_rows = [&](int64_t i) { return rows * i / chunks; };
  if (rows > 0) {
    std::vector<float> clo(chunks * channels, INFINITY), chi(chunks * channels, -INFINITY);
    std::vector<char> cfinite(chunks, 1);
    ParallelFor(chunks, HardwareThreads(), [&](int64_t c0, int64_t c1) {
      for (int64_t i = c0; i < c1; ++i) {
        const int64_t r0 = chunk_rows(i), r1 = chunk_rows(i + 1);
        cfinite[i] = inner == 1
            ? FoldRows(p, src + r0 * row_len, r1 - r0, channels, &clo[i * channels],
                       &chi[i * channels])
            : FoldRange(p, src + r0 * 16, std::min(n, r1 * 16) - r0 * 16, &clo[i], &chi[i]);
      }
    });
    for (int64_t i = 0; i < chunks; ++i) {
      finite &= cfinite[i] != 0;
      for (int64_t c = 0; c < channels; ++c) {
        lo[c] = std::min(lo[c], clo[i * channels + c]);
        hi[c] = std::max(hi[c], chi[i * channels + c]);
      }
    }
  } else {
    for (int64_t a = 0; a < outer; ++a) {
      for (int64_t c = 0; c < channels; ++c) {
        finite &= FoldRange(p, src + (a * channels + c) * inner, inner, &lo[c], &hi[c]);
      }
    }
  }
  // The observer's update (qjax.observers.minmax).
  const float* old_min = min_in.typed_data();
  const float* old_max = max_in.typed_data();
  const int32_t count = count_in.typed_data()[0], skipped = skipped_in.typed_data()[0];
  const bool seen = count > 0;
  bool fits = true;
  for (int64_t c = 0; c < channels; ++c) {
    const float glo = MinNan(seen ? MinNan(old_min[c], lo[c]) : lo[c], 0.0f);
    const float ghi = MaxNan(seen ? MaxNan(old_max[c], hi[c]) : hi[c], 0.0f);
    fits &= std::isfinite(glo) && std::isfinite(ghi) && std::isfinite(ghi - glo);
  }
  const bool ok = finite && fits;
  float* new_min = min_out->typed_data();
  float* new_max = max_out->typed_data();
  for (int64_t c = 0; c < channels; ++c) {
    if (!ok) {
      new_min[c] = old_min[c];
      new_max[c] = old_max[c];
    } else if (averaging == 0.0f) {
      new_min[c] = MinNan(old_min[c], lo[c]);
      new_max[c] = MaxNan(old_max[c], hi[c]);
    } else if (count == 0) {
      new_min[c] = lo[c];
      new_max[c] = hi[c];
    } else {
      const float step_lo = averaging * (lo[c] - old_min[c]);
      const float step_hi = averaging * (hi[c] - old_max[c]);
      new_min[c] = old_min[c] + step_lo;
      new_max[c] = old_max[c] + step_hi;
    }
  }
  constexpr int32_t kMax = std::numeric_limits<int32_t>::max();
  count_out->typed_data()[0] = count + (ok && count < kMax ? 1 : 0);
  skipped_out->typed_data()[0] = skipped + (!ok && skipped < kMax ? 1 : 0);
  // The qparams of the new state (qjax.numerics.qparams_from_minmax).
  float* scale = scale_out->typed_data();
  int32_t* zero_point = zero_point_out->typed_data();
  std::vector<float> inv(channels), zpf(channels);
  for (int64_t c = 0; c < channels; ++c) {
    const float l = MinNan(new_min[c], 0.0f), h = MaxNan(new_max[c], 0.0f);
    float s;
    int32_t z;
    if (symmetric) {
      s = MaxNan(-l, h) / static_cast<float>(static_cast<double>(qmax - qmin) / 2.0);
      s = MaxNan(s, eps);
      z = static_cast<int32_t>(symmetric_zero_point);
    } else {
      s = MaxNan((h - l) / static_cast<float>(qmax - qmin), eps);
      const int64_t shifted = qmin - static_cast<int64_t>(ToInt32(std::nearbyint(l / s)));
      z = static_cast<int32_t>(static_cast<uint32_t>(shifted));  // int32 wrap, as XLA's
      z = z < qmin ? static_cast<int32_t>(qmin) : (z > qmax ? static_cast<int32_t>(qmax) : z);
    }
    const bool valid = std::isfinite(new_min[c]) && std::isfinite(new_max[c]) &&
                       new_min[c] <= new_max[c] && std::isfinite(s);
    scale[c] = valid ? s : NAN;
    zero_point[c] = z;
    inv[c] = 1.0f / scale[c];
    zpf[c] = static_cast<float>(z);
  }
  // The fake quantization (qjax.numerics.fake_quant_with_mask).
  float* dst = out->typed_data();
  bool* inside = mask_size == 0 ? nullptr : mask->typed_data();  // none: no gradient taken
  if (emit == kEmitPanels) {
    // Chunks of whole groups of four rows, each with its own column sums, added after.
    std::vector<float> cinv(N), czp(N), cscale(N);
    for (int64_t c = 0; c < N; ++c) {
      const int64_t from = channels == 1 ? 0 : c;
      cinv[c] = inv[from], czp[c] = zpf[from], cscale[c] = scale[from];
    }
    const int64_t G = (K + 3) / 4;
    const int64_t pchunks = n >= kFakeQuantParallel ? std::min<int64_t>(G, 16) : 1;
    std::vector<int32_t> psums(pchunks * N, 0);
    std::vector<char> pclean(pchunks, 1);
    int8_t* panels = codes_out->typed_data();
    int32_t* sums = sums_out->typed_data();
    ParallelFor(pchunks, HardwareThreads(), [&](int64_t c0, int64_t c1) {
      for (int64_t i = c0; i < c1; ++i) {
        const int64_t g0 = G * i / pchunks, g1 = G * (i + 1) / pchunks;
#ifdef QJAX_X86
        if (Avx512(p)) {
          pclean[i] = FakeQuantPanelsAvx512(src, dst, inside, K, N, cinv.data(), czp.data(),
                                            cscale.data(), g, panels, &psums[i * N], g0, g1);
          continue;
        }
#endif
        const int64_t k0 = std::min(K, 4 * g0), k1 = std::min(K, 4 * g1);
        FakeQuantRows(p, src + k0 * N, dst + k0 * N, inside ? inside + k0 * N : nullptr,
                      k1 - k0, N, cinv.data(), czp.data(), cscale.data(), g);
      }
    });
    bool clean = true;
    if (Avx512(p)) {
      for (int64_t c = 0; c < N; ++c) sums[c] = 0;
      for (int64_t i = 0; i < pchunks; ++i) {
        clean &= pclean[i] != 0;
        for (int64_t c = 0; c < N; ++c) sums[c] += psums[i * N + c];
      }
    } else {
      // y = S k exactly, so PackRound's rounding of y recovers k; y is never +-inf (the grid
      // clamps), so its non-finite columns are those holding a NaN.
      std::unique_ptr<bool[]> bad(new bool[N]);
      PackRoundPortable(dst, cinv.data(), K, N, panels, sums, bad.get(), 0, (N + 15) / 16);
      for (int64_t c = 0; c < N; ++c) clean &= !bad[c];
    }
    nan_out->typed_data()[0] = !clean;
    return ffi::Error::Success();
  }
  int8_t* codes = emit == kEmitRows ? codes_out->typed_data() : nullptr;
  if (rows > 0) {
    std::vector<char> cclean(chunks, 1);
    ParallelFor(chunks, HardwareThreads(), [&](int64_t c0, int64_t c1) {
      for (int64_t i = c0; i < c1; ++i) {
        const int64_t r0 = chunk_rows(i), r1 = chunk_rows(i + 1);
        if (inner == 1 && !codes) {  // codes: per tensor, x of one float a row of 16 too
          const int64_t at = r0 * channels;
          FakeQuantRows(p, src + at, dst + at, inside ? inside + at : nullptr, r1 - r0,
                        channels, inv.data(), zpf.data(), scale, g);
        } else {
          const int64_t at = r0 * 16;
          cclean[i] = FakeQuantRun(p, src + at, dst + at, inside ? inside + at : nullptr,
                                   std::min(n, r1 * 16) - at, inv[0], zpf[0], scale[0], g,
                                   codes ? codes + at : nullptr, shift);
        }
      }
    });
    if (codes) {
      bool clean = true;
      for (int64_t i = 0; i < chunks; ++i) clean &= cclean[i] != 0;
      nan_out->typed_data()[0] = !clean;
    }
  } else {
    for (int64_t a = 0; a < outer; ++a) {
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t at = (a * channels + c) * inner;
        FakeQuantRun(p, src + at, dst + at, inside ? inside + at : nullptr, inner, inv[c],
                     zpf[c], scale[c], g);
      }
    }
  }
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------------------
// int8 max pooling, NHWC, VALID windows: out[b, i, j, c] = max over the window of
// x[b, i sh + di, j sw + dj, c]. Max pooling commutes with the (monotone) quantization, so
// it runs on the int8 values as PyTorch's quantized max_pool2d does; each output pixel is
// the vpmaxsb of its window's channel vectors (64 channels a vector).

struct PoolGeom {
  int64_t batch, height, width, channels, window_h, window_w, stride_h, stride_w;
  int64_t out_h() const { return (height - window_h) / stride_h + 1; }
  int64_t out_w() const { return (width - window_w) / stride_w + 1; }
};

#ifdef QJAX_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw")
void MaxPoolRowsAvx512(const int8_t* x, int8_t* out, const PoolGeom& g, int64_t r0,
                       int64_t r1) {
  const int64_t oh = g.out_h(), ow = g.out_w(), c = g.channels;
  for (int64_t r = r0; r < r1; ++r) {  // r = b * oh + i
    const int64_t b = r / oh, i = r % oh;
    for (int64_t j = 0; j < ow; ++j) {
      int8_t* o = out + (r * ow + j) * c;
      for (int64_t c0 = 0; c0 < c; c0 += 64) {
        const int64_t left = c - c0;
        const __mmask64 valid = left >= 64 ? ~__mmask64{0} : ((__mmask64{1} << left) - 1);
        __m512i m = _mm512_set1_epi8(-128);
        for (int64_t di = 0; di < g.window_h; ++di) {
          const int8_t* row = x + ((b * g.height + i * g.stride_h + di) * g.width +
                                   j * g.stride_w) * c + c0;
          for (int64_t dj = 0; dj < g.window_w; ++dj) {
            m = _mm512_max_epi8(m, _mm512_maskz_loadu_epi8(valid, row + dj * c));
          }
        }
        _mm512_mask_storeu_epi8(o + c0, valid, m);
      }
    }
  }
}
#pragma GCC pop_options
#endif

void MaxPoolRowsPortable(const int8_t* x, int8_t* out, const PoolGeom& g, int64_t r0,
                         int64_t r1) {
  const int64_t oh = g.out_h(), ow = g.out_w(), c = g.channels;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / oh, i = r % oh;
    for (int64_t j = 0; j < ow; ++j) {
      int8_t* o = out + (r * ow + j) * c;
      for (int64_t k = 0; k < c; ++k) o[k] = -128;
      for (int64_t di = 0; di < g.window_h; ++di) {
        const int8_t* row = x + ((b * g.height + i * g.stride_h + di) * g.width +
                                 j * g.stride_w) * c;
        for (int64_t dj = 0; dj < g.window_w; ++dj) {
          for (int64_t k = 0; k < c; ++k) o[k] = std::max(o[k], row[dj * c + k]);
        }
      }
    }
  }
}

ffi::Error MaxPoolInt8(ffi::Buffer<ffi::S8> x, ffi::ResultBuffer<ffi::S8> out,
                       int64_t window_h, int64_t window_w, int64_t stride_h, int64_t stride_w,
                       int64_t path) {
  Path p;
  ffi::Error err = CheckPath(path, &p);
  if (err.failure()) return err;
  const auto dims = x.dimensions();
  if (dims.size() != 4) return ffi::Error::InvalidArgument("qjax max pool: x must be NHWC");
  const PoolGeom g{dims[0], dims[1], dims[2], dims[3], window_h, window_w, stride_h, stride_w};
  if (window_h < 1 || window_w < 1 || stride_h < 1 || stride_w < 1 || window_h > g.height ||
      window_w > g.width) {
    return ffi::Error::InvalidArgument("qjax max pool: windows must fit the input");
  }
  const auto od = out->dimensions();
  if (od.size() != 4 || od[0] != g.batch || od[1] != g.out_h() || od[2] != g.out_w() ||
      od[3] != g.channels) {
    return ffi::Error::InvalidArgument("qjax max pool: output shape mismatch");
  }
  const int64_t rows = g.batch * g.out_h();
  const int64_t work = out->element_count() * window_h * window_w;
  const auto run = [&](int64_t r0, int64_t r1) {
#ifdef QJAX_X86
    if (Avx512(p)) return MaxPoolRowsAvx512(x.typed_data(), out->typed_data(), g, r0, r1);
#endif
    MaxPoolRowsPortable(x.typed_data(), out->typed_data(), g, r0, r1);
  };
  ParallelFor(rows, work >= (int64_t{1} << 20) ? HardwareThreads() : 1, run);
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------------------
// Depthwise int8 convolution, NHWC: groups = C, output channel o reads input channel o / m
// (m = O / C, the channel multiplier), x_pad being x padded with pad_value:
//
//   acc[b, i, j, o] = offset[o] + sum_{u, v} x_pad[b, i sh + u dh, j sw + v dw, o / m] w[u, v, o]
//
// in int32, wrapping as XLA's, the padding handled in the kernel (no padded copy); then the
// epilogue: the int32 result or one of the requantizations. XLA:CPU runs a grouped
// convolution as a loop of scalar products (32 x 56 x 56 x 128, 3 x 3: ~0.44 s as int8 ->
// int32, ~0.41 s in float32). Here 16 output channels share a vector and several output
// pixels each weight vector: a product x w (int8 x int8) is the low 16-bit lane pair of
// vpdpwssd against the weight widened with a zero high half, so x's sign in the high half
// meets 0 and the lane adds exactly x w.
//
// The same kernel runs grouped convolutions of small groups: G groups of cg = 2..16 input
// channels (cg even), output channel o of group o / og (og = O / G) reading input channels
// [(o / og) cg, + cg), wherever the groups of a block of 16 output channels hold at most 32
// input bytes (`GroupedFits`). A block's input bytes of one pixel are widened once to 16 int16
// pairs; pair q of lane l's group is moved to lane l by vpermd, and vpdpwssd adds the two
// products x[2q] w[2q] + x[2q + 1] w[2q + 1] exactly (16-bit products, 32-bit sums). Groups
// of a multiple of 16 output channels and of 4 input channels (each block inside one group)
// run as a direct GEMM instead: 4 input bytes of the group broadcast, flipped to unsigned
// (x + 128), against 4 weights a lane by vpdpbusd, the -128 sum w correction in the start.
// The avx2 path runs small groups as the int16 pairs on 8 lanes (vpmaddwd, GroupedRowAvx2),
// other groupings (and the portable path all) as plain loops.

struct DwGeom {
  int64_t batch, height, width, channels, kh, kw, sh, sw, dh, dw, out_c;
  int64_t pt, pb, pl, pr;  // padding: top, bottom, left, right (each >= 0)
  int32_t pad;             // what a padded position holds (the input's zero point)
  int64_t cg = 1;          // input channels a group (1: depthwise)
  int64_t out_h() const { return (height + pt + pb - (kh - 1) * dh - 1) / sh + 1; }
  int64_t out_w() const { return (width + pl + pr - (kw - 1) * dw - 1) / sw + 1; }
  int64_t mult() const { return out_c / channels; }
  int64_t out_per_group() const { return out_c / (channels / cg); }
  // Output channels [o0, o0 + lanes)'s groups: the first, and their input bytes of one pixel.
  int64_t first_group(int64_t o0) const { return o0 / out_per_group(); }
  int64_t block_bytes(int64_t o0, int64_t lanes = 16) const {
    const int64_t og = out_per_group();
    return ((std::min(out_c, o0 + lanes) - 1) / og - o0 / og + 1) * cg;
  }
  // Groups of an even count of 2..16 input channels, each block of `lanes` output channels
  // within `bytes` input bytes of a pixel: the int16 pairs kernels (GwBlock, GroupedRowAvx2).
  bool pairs_fit(int64_t lanes, int64_t bytes) const {
    if (cg < 2 || cg % 2 != 0 || cg > 16) return false;
    for (int64_t o0 = 0; o0 < out_c; o0 += lanes) {
      if (block_bytes(o0, lanes) > bytes) return false;
    }
    return true;
  }
  // Every block of 16 output channels inside one group, 4 input bytes at a time: GbPixels.
  bool wide_groups() const { return cg > 1 && cg % 4 == 0 && out_per_group() % 16 == 0; }
  // The input row of output row i's tap u, the input column of output column j's tap v
  // (outside [0, height) / [0, width): in the padding).
  int64_t in_row(int64_t i, int64_t u) const { return i * sh + u * dh - pt; }
  int64_t in_col(int64_t j, int64_t v) const { return j * sw + v * dw - pl; }
};

#ifdef QJAX_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq")
// x's channels [c, c + 16) as int32 (the lanes past the block's last channel read 0),
// spread to the output lanes (lane l: input channel (o0 + l) / m) where m > 1.
template <bool kSpread, bool kFull>
inline __m512i DwLoad(const int8_t* x, __mmask16 in_valid, __m512i spread) {
  const __m128i bytes = kFull ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(x))
                              : _mm_maskz_loadu_epi8(in_valid, x);
  const __m512i v = _mm512_cvtepi8_epi32(bytes);
  return kSpread ? _mm512_permutexvar_epi32(spread, v) : v;
}

// DwLoad of input pixel (ih, col) of the block's `image`, or `pad` where col lies in the
// padding (the row is inside: padded rows are summed into the start once).
template <bool kSpread, bool kFull>
inline __m512i DwTap(const int8_t* image, const DwGeom& g, int64_t ih, int64_t col,
                     __mmask16 in_valid, __m512i spread, __m512i pad) {
  return col >= 0 && col < g.width
             ? DwLoad<kSpread, kFull>(image + (ih * g.width + col) * g.channels, in_valid, spread)
             : pad;
}

// Stride SW (1 or 2) and dilation 1 along the row, a KW-wide window: NP output pixels (8 or 4)
// read (NP - 1) SW + KW neighbouring input pixels, each widened once (`widen(ih, col)`: the
// pad value for a column in the padding) for all the taps that use it (`row(u, xv, a)` adds
// input row u's taps to the NP accumulators). Runs the columns [j, j_end) NP at a time through
// the epilogue; returns where it stopped. The depthwise and the grouped blocks share it.
template <int KW, int SW, int NP, class Widen, class Row>
inline int64_t SharedLoadUnit(const Epilogue& e, const DwGeom& g, int64_t i, int64_t o0,
                              int64_t j, int64_t j_end, __mmask16 valid, __m512i init,
                              const Widen& widen, const Row& row) {
  constexpr int kCols = (NP - 1) * SW + KW;
  for (; j + NP <= j_end; j += NP) {
    __m512i a[NP];
#pragma GCC unroll 8
    for (int t = 0; t < NP; ++t) a[t] = init;
    const int64_t col0 = g.in_col(j, 0);
    for (int64_t u = 0; u < g.kh; ++u) {
      const int64_t ih = g.in_row(i, u);
      if (ih < 0 || ih >= g.height) continue;
      __m512i xv[kCols];
#pragma GCC unroll 16
      for (int c = 0; c < kCols; ++c) xv[c] = widen(ih, col0 + c);
      row(u, xv, a);
    }
#pragma GCC unroll 2
    for (int t = 0; t < NP; t += 4) {
      __m512i four[4] = {a[t], a[t + 1], a[t + 2], a[t + 3]};
      EpilogueColumn<4>(e, j + t, o0, four, valid);
    }
  }
  return j;
}

// The depthwise taps of SharedLoadUnit: tap v of column t reads widened pixel t SW + v.
template <bool kSpread, bool kFull, int KW, int SW, int NP>
inline int64_t DwRunUnit(const int8_t* image, const int32_t* w16, const Epilogue& e,
                         const DwGeom& g, int64_t i, int64_t o0, int64_t j, int64_t j_end,
                         __mmask16 valid, __mmask16 in_valid, __m512i spread, __m512i init,
                         __m512i pad) {
  const int64_t O = g.out_c;
  const auto widen = [&](int64_t ih, int64_t col) {
    return DwTap<kSpread, kFull>(image, g, ih, col, in_valid, spread, pad);
  };
  const auto row = [&](int64_t u, const auto& xv, auto& a) {
    const int32_t* wu = w16 + u * KW * O + o0;
#pragma GCC unroll 5
    for (int v = 0; v < KW; ++v) {
      const __m512i wv = kFull ? _mm512_loadu_si512(wu + v * O)
                               : _mm512_maskz_loadu_epi32(valid, wu + v * O);
#pragma GCC unroll 8
      for (int t = 0; t < NP; ++t) a[t] = _mm512_dpwssd_epi32(a[t], xv[t * SW + v], wv);
    }
  };
  return SharedLoadUnit<KW, SW, NP>(e, g, i, o0, j, j_end, valid, init, widen, row);
}

// The 16 output channels [o0, o0 + 16) of output row i: `image` points at the row's image at
// the block's first input channel. The taps of padded rows are summed once into every
// column's start (`init`); a tap in a padded column reads the pad value. Windows 3 or 5 wide
// at stride 1 or 2 (dilation 1) run through `DwRunUnit`'s shared loads; other geometries four
// columns a weight load. kFull: all 16 lanes real and 16 input bytes readable (m = 1, a whole
// block): plain loads.
template <bool kSpread, bool kFull>
inline void DwBlock(const int8_t* image, const int32_t* w16, const Epilogue& e_row,
                    const DwGeom& g, int64_t i, int64_t o0, __mmask16 valid, __mmask16 in_valid,
                    __m512i spread) {
  // A local copy: its fields stay in registers (the int8 stores could alias a struct behind a
  // reference, which made every requantization reload them).
  const Epilogue e = e_row;
  const int64_t ow = g.out_w(), O = g.out_c;
  const __m512i pad = _mm512_set1_epi32(g.pad);  // (pad, its sign) against (w, 0): pad w
  const auto weights = [&](int64_t u, int64_t v) {
    return kFull ? _mm512_loadu_si512(w16 + (u * g.kw + v) * O + o0)
                 : _mm512_maskz_loadu_epi32(valid, w16 + (u * g.kw + v) * O + o0);
  };
  __m512i init = _mm512_setzero_si512();
  for (int64_t u = 0; u < g.kh; ++u) {
    const int64_t ih = g.in_row(i, u);
    if (ih >= 0 && ih < g.height) continue;
    for (int64_t v = 0; v < g.kw; ++v) init = _mm512_dpwssd_epi32(init, pad, weights(u, v));
  }
  int64_t j = 0;
  if (g.dw == 1 && (g.sw == 1 || g.sw == 2) && (g.kw == 3 || g.kw == 5)) {
    // Eight then four columns at a time.
#define QJAX_DW_UNIT(KW, SW, NP)                                                              \
  j = DwRunUnit<kSpread, kFull, KW, SW, NP>(image, w16, e, g, i, o0, j, ow, valid, in_valid, \
                                            spread, init, pad)
#define QJAX_DW_UNITS(KW, SW) \
  QJAX_DW_UNIT(KW, SW, 8);    \
  QJAX_DW_UNIT(KW, SW, 4)
    if (g.sw == 1) {
      if (g.kw == 3) { QJAX_DW_UNITS(3, 1); } else { QJAX_DW_UNITS(5, 1); }
    } else {
      if (g.kw == 3) { QJAX_DW_UNITS(3, 2); } else { QJAX_DW_UNITS(5, 2); }
    }
#undef QJAX_DW_UNITS
#undef QJAX_DW_UNIT
  } else {
    for (; j + 4 <= ow; j += 4) {
      __m512i a0 = init, a1 = init, a2 = init, a3 = init;
      for (int64_t u = 0; u < g.kh; ++u) {
        const int64_t ih = g.in_row(i, u);
        if (ih < 0 || ih >= g.height) continue;
        for (int64_t v = 0; v < g.kw; ++v) {
          const __m512i wv = weights(u, v);
          const auto tap = [&](int64_t t) {
            return DwTap<kSpread, kFull>(image, g, ih, g.in_col(j + t, v), in_valid, spread, pad);
          };
          a0 = _mm512_dpwssd_epi32(a0, tap(0), wv);
          a1 = _mm512_dpwssd_epi32(a1, tap(1), wv);
          a2 = _mm512_dpwssd_epi32(a2, tap(2), wv);
          a3 = _mm512_dpwssd_epi32(a3, tap(3), wv);
        }
      }
      __m512i acc[4] = {a0, a1, a2, a3};
      EpilogueColumn<4>(e, j, o0, acc, valid);
    }
  }
  for (; j < ow; ++j) {  // the last columns one at a time
    __m512i a = init;
    for (int64_t u = 0; u < g.kh; ++u) {
      const int64_t ih = g.in_row(i, u);
      if (ih < 0 || ih >= g.height) continue;
      for (int64_t v = 0; v < g.kw; ++v) {
        a = _mm512_dpwssd_epi32(
            a, DwTap<kSpread, kFull>(image, g, ih, g.in_col(j, v), in_valid, spread, pad),
            weights(u, v));
      }
    }
    Epilogue16(e, j, o0, a, valid);
  }
}

// One widened input pixel of a grouped block (`bytes` of it), or the pad pairs in the padding.
inline __m512i GwTap(const int8_t* image, const DwGeom& g, int64_t ih, int64_t col,
                     __mmask32 bytes, __m512i pad) {
  return col >= 0 && col < g.width
             ? _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(
                   bytes, image + (ih * g.width + col) * g.channels))
             : pad;
}

// The grouped taps of SharedLoadUnit (GwBlock's shared loads): each widened pixel's pair q
// spread once and used by every tap that reads it.
template <int Q, int KW, int SW, int NP>
inline int64_t GwRunUnit(const int8_t* image, const int32_t* w2, const __m512i (&spread)[Q],
                         const Epilogue& e, const DwGeom& g, int64_t i, int64_t o0, int64_t j,
                         int64_t j_end, __mmask16 valid, __mmask32 bytes, __m512i init,
                         __m512i pad) {
  constexpr int kCols = (NP - 1) * SW + KW;
  const int64_t O = g.out_c;
  const auto widen = [&](int64_t ih, int64_t col) {
    return GwTap(image, g, ih, col, bytes, pad);
  };
  const auto row = [&](int64_t u, const auto& xw, auto& a) {
#pragma GCC unroll 4
    for (int q = 0; q < Q; ++q) {
      __m512i wv[KW];
#pragma GCC unroll 5
      for (int v = 0; v < KW; ++v) {
        wv[v] = _mm512_maskz_loadu_epi32(valid, w2 + ((u * KW + v) * Q + q) * O + o0);
      }
#pragma GCC unroll 16
      for (int c = 0; c < kCols; ++c) {
        const __m512i xq = _mm512_permutexvar_epi32(spread[q], xw[c]);
#pragma GCC unroll 8
        for (int t = 0; t < NP; ++t) {
          const int v = c - t * SW;
          if (v >= 0 && v < KW) a[t] = _mm512_dpwssd_epi32(a[t], xq, wv[v]);
        }
      }
    }
  };
  return SharedLoadUnit<KW, SW, NP>(e, g, i, o0, j, j_end, valid, init, widen, row);
}

// Grouped, Q = cg / 2 pairs a group: the 16 output channels [o0, o0 + 16) of output row i;
// `image` points at the row's image at the block's first group's first input channel, whose
// `bytes` (mask) hold the block's groups. w2 holds the weights as int16 pairs, [(u kw + v) Q +
// q][O]; idx the block's Q lane indices (lane l: pair q of its group, from the block's first
// group). Taps of padded rows are summed once into the start; a padded column reads the pad
// value (every pair (pad, pad)). Windows 3 or 5 wide at stride 1 or 2 (dilation 1) with Q = 1,
// 2 or 4 run through GwRunUnit's shared loads; then four columns a weight load, then single
// columns.
template <int Q>
void GwBlock(const int8_t* image, const int32_t* w2, const int32_t* idx, const Epilogue& e_row,
             const DwGeom& g, int64_t i, int64_t o0, __mmask16 valid, __mmask32 bytes) {
  const Epilogue e = e_row;  // a local copy, as in DwBlock
  const int64_t ow = g.out_w(), O = g.out_c;
  const __m512i pad = _mm512_set1_epi16(static_cast<int16_t>(g.pad));
  __m512i spread[Q];
#pragma GCC unroll 8
  for (int q = 0; q < Q; ++q) spread[q] = _mm512_loadu_si512(idx + q * 16);
  const auto weights = [&](int64_t u, int64_t v, int q) {
    return _mm512_maskz_loadu_epi32(valid, w2 + ((u * g.kw + v) * Q + q) * O + o0);
  };
  const auto tap = [&](int64_t ih, int64_t col) { return GwTap(image, g, ih, col, bytes, pad); };
  __m512i init = _mm512_setzero_si512();
  for (int64_t u = 0; u < g.kh; ++u) {
    const int64_t ih = g.in_row(i, u);
    if (ih >= 0 && ih < g.height) continue;
    for (int64_t v = 0; v < g.kw; ++v) {
#pragma GCC unroll 8
      for (int q = 0; q < Q; ++q) init = _mm512_dpwssd_epi32(init, pad, weights(u, v, q));
    }
  }
  int64_t j = 0;
  if constexpr (Q == 1 || Q == 2 || Q == 4) {
    if (g.dw == 1 && (g.sw == 1 || g.sw == 2) && (g.kw == 3 || g.kw == 5)) {
      const auto unit = [&](auto kw, auto sw, auto np) {
        j = GwRunUnit<Q, decltype(kw)::value, decltype(sw)::value, decltype(np)::value>(
            image, w2, spread, e, g, i, o0, j, ow, valid, bytes, init, pad);
      };
      using K3 = std::integral_constant<int, 3>;
      using K5 = std::integral_constant<int, 5>;
      using S1 = std::integral_constant<int, 1>;
      using S2 = std::integral_constant<int, 2>;
      using P8 = std::integral_constant<int, 8>;
      using P4 = std::integral_constant<int, 4>;
      if (g.sw == 1) {
        if (g.kw == 3) {
          unit(K3{}, S1{}, P8{});
          unit(K3{}, S1{}, P4{});
        } else {
          unit(K5{}, S1{}, P8{});
          unit(K5{}, S1{}, P4{});
        }
      } else {
        if (g.kw == 3) {
          unit(K3{}, S2{}, P4{});
        } else {
          unit(K5{}, S2{}, P4{});
        }
      }
    }
  }
  for (; j + 4 <= ow; j += 4) {
    __m512i a[4] = {init, init, init, init};
    for (int64_t u = 0; u < g.kh; ++u) {
      const int64_t ih = g.in_row(i, u);
      if (ih < 0 || ih >= g.height) continue;
      for (int64_t v = 0; v < g.kw; ++v) {
        __m512i xv[4];
#pragma GCC unroll 4
        for (int t = 0; t < 4; ++t) xv[t] = tap(ih, g.in_col(j + t, v));
#pragma GCC unroll 8
        for (int q = 0; q < Q; ++q) {
          const __m512i wv = weights(u, v, q);
#pragma GCC unroll 4
          for (int t = 0; t < 4; ++t) {
            a[t] = _mm512_dpwssd_epi32(a[t], _mm512_permutexvar_epi32(spread[q], xv[t]), wv);
          }
        }
      }
    }
    EpilogueColumn<4>(e, j, o0, a, valid);
  }
  for (; j < ow; ++j) {
    __m512i a = init;
    for (int64_t u = 0; u < g.kh; ++u) {
      const int64_t ih = g.in_row(i, u);
      if (ih < 0 || ih >= g.height) continue;
      for (int64_t v = 0; v < g.kw; ++v) {
        const __m512i xv = tap(ih, g.in_col(j, v));
#pragma GCC unroll 8
        for (int q = 0; q < Q; ++q) {
          a = _mm512_dpwssd_epi32(a, _mm512_permutexvar_epi32(spread[q], xv), weights(u, v, q));
        }
      }
    }
    Epilogue16(e, j, o0, a, valid);
  }
}

// Grouped, `wide_groups`: the NB blocks of 16 output channels from o0 of the NP output pixels
// from m (flattened over batch, rows and columns, as a GEMM's rows), all in one group. xu is
// the input + 128 (uint8) with its padding (pad + 128) in place, so g's padding is 0 and
// every tap a plain load: `base` holds each pixel's window start at the group's first input
// channel. Each broadcast input dword serves the NB blocks; w4 holds 4 weights a lane,
// [(u kw + v) cg / 4 + d][O]; init the blocks' -128 sum w corrections.
inline __m512i GbDword(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

template <int NB, int NP>
inline void GbPixels(const uint8_t* const (&base)[NP], const int32_t* w4,
                     const __m512i (&init)[NB], const Epilogue& e, const DwGeom& g, int64_t m,
                     int64_t o0) {
  const int64_t O = g.out_c, D = g.cg / 4, C = g.channels;
  __m512i a[NB][NP];
#pragma GCC unroll 4
  for (int k = 0; k < NB; ++k) {
#pragma GCC unroll 8
    for (int t = 0; t < NP; ++t) a[k][t] = init[k];
  }
  for (int64_t u = 0; u < g.kh; ++u) {
    for (int64_t v = 0; v < g.kw; ++v) {
      const int64_t off = (u * g.dh * g.width + v * g.dw) * C;
      const int32_t* wt = w4 + (u * g.kw + v) * D * O + o0;
      for (int64_t d = 0; d < D; ++d) {
        __m512i xb[NP];
#pragma GCC unroll 8
        for (int t = 0; t < NP; ++t) xb[t] = GbDword(base[t] + off + 4 * d);
#pragma GCC unroll 4
        for (int k = 0; k < NB; ++k) {
          const __m512i wv = _mm512_loadu_si512(wt + d * O + 16 * k);
#pragma GCC unroll 8
          for (int t = 0; t < NP; ++t) a[k][t] = _mm512_dpbusd_epi32(a[k][t], xb[t], wv);
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int k = 0; k < NB; ++k) {
    if constexpr (NP >= 4) {
#pragma GCC unroll 2
      for (int t = 0; t < NP; t += 4) {
        __m512i four[4] = {a[k][t], a[k][t + 1], a[k][t + 2], a[k][t + 3]};
        EpilogueColumn<4>(e, m + t, o0 + 16 * k, four, 0xFFFF);
      }
    } else {
#pragma GCC unroll 4
      for (int t = 0; t < NP; ++t) Epilogue16(e, m + t, o0 + 16 * k, a[k][t], 0xFFFF);
    }
  }
}

// Output pixels [m0, m1) of a `wide_groups` convolution (gp: the padded geometry of xu)
// through `e` (its output at pixel 0): NP pixels at a time (8 where a group has at most 32
// output channels, else 4; then single pixels), each group's blocks four at a time against
// them.
void WideGroupedPixelsAvx512(const uint8_t* xu, const int32_t* w4, const int32_t* corr,
                             const Epilogue& e_in, const DwGeom& gp, int64_t m0, int64_t m1) {
  const Epilogue e = e_in;  // a local copy, as in DwBlock
  const int64_t oh = gp.out_h(), ow = gp.out_w(), O = gp.out_c, og = gp.out_per_group();
  const int64_t C = gp.channels;
  const auto window = [&](int64_t m) {
    const int64_t b = m / (oh * ow), rest = m % (oh * ow);
    return xu + ((b * gp.height + rest / ow * gp.sh) * gp.width + rest % ow * gp.sw) * C;
  };
  const auto pixels = [&](int64_t m, auto np) {
    constexpr int NP = decltype(np)::value;
    const uint8_t* bases[NP];
#pragma GCC unroll 8
    for (int t = 0; t < NP; ++t) bases[t] = window(m + t);
    for (int64_t o0 = 0; o0 < O;) {
      const int64_t nb = std::min<int64_t>(4, (og - o0 % og) / 16), goff = o0 / og * gp.cg;
      const uint8_t* at[NP];
#pragma GCC unroll 8
      for (int t = 0; t < NP; ++t) at[t] = bases[t] + goff;
      const auto blocks = [&](auto nbc) {
        constexpr int NB = decltype(nbc)::value;
        __m512i init[NB];
#pragma GCC unroll 4
        for (int k = 0; k < NB; ++k) init[k] = _mm512_loadu_si512(corr + o0 + 16 * k);
        GbPixels<NB, NP>(at, w4, init, e, gp, m, o0);
      };
      switch (nb) {
        case 4: blocks(std::integral_constant<int, 4>{}); break;
        case 3: blocks(std::integral_constant<int, 3>{}); break;
        case 2: blocks(std::integral_constant<int, 2>{}); break;
        default: blocks(std::integral_constant<int, 1>{}); break;
      }
      o0 += nb * 16;
    }
  };
  int64_t m = m0;
  if (og <= 32) {
    for (; m + 8 <= m1; m += 8) pixels(m, std::integral_constant<int, 8>{});
  }
  for (; m + 4 <= m1; m += 4) pixels(m, std::integral_constant<int, 4>{});
  for (; m < m1; ++m) pixels(m, std::integral_constant<int, 1>{});
}

// Output row r of a grouped convolution (cg = 2..16, even), its blocks through GwBlock<cg / 2>;
// `idx`: each block's Q x 16 lane indices.
void GroupedRowAvx512(const int8_t* x, const int32_t* w2, const int32_t* idx, const Epilogue& e,
                      const DwGeom& g, int64_t r) {
  const int64_t oh = g.out_h(), O = g.out_c, Q = g.cg / 2;
  const int64_t b = r / oh, i = r % oh;
  const int8_t* image = x + b * g.height * g.width * g.channels;
  for (int64_t o0 = 0; o0 < O; o0 += 16) {
    const __mmask16 valid = Lanes16(O - o0);
    const int64_t n = g.block_bytes(o0);
    const __mmask32 bytes = n >= 32 ? ~__mmask32{0} : (__mmask32{1} << n) - 1;
    const int8_t* at = image + g.first_group(o0) * g.cg;
    const int32_t* block_idx = idx + o0 / 16 * Q * 16;
    switch (Q) {
#define QJAX_GW_CASE(N) \
  case N: GwBlock<N>(at, w2, block_idx, e, g, i, o0, valid, bytes); break;
      QJAX_GW_CASE(1) QJAX_GW_CASE(2) QJAX_GW_CASE(3) QJAX_GW_CASE(4)
      QJAX_GW_CASE(5) QJAX_GW_CASE(6) QJAX_GW_CASE(7) QJAX_GW_CASE(8)
#undef QJAX_GW_CASE
      default: break;  // GroupedFits refused it
    }
  }
}

// Output row r = b * out_h + i through the epilogue `e` (its output at the row's first pixel,
// one pixel a row of O values: the sums + offset as int32, or requantized to int8).
// `spreads` (m > 1): each block's 16 lane indices, (o0 + l) / m - o0 / m.
template <bool kSpread>
void DepthwiseRowAvx512(const int8_t* x, const int32_t* w16, const int32_t* spreads,
                        const Epilogue& e, const DwGeom& g, int64_t r) {
  const int64_t oh = g.out_h(), C = g.channels, O = g.out_c, m = g.mult();
  const int64_t b = r / oh, i = r % oh;
  const int8_t* image = x + b * g.height * g.width * C;
  for (int64_t o0 = 0; o0 < O; o0 += 16) {
    const __mmask16 valid = Lanes16(O - o0);
    const int64_t c0 = o0 / m, c1 = (std::min(O, o0 + 16) - 1) / m + 1;
    const __mmask16 in_valid = Lanes16(c1 - c0);
    const __m512i spread = kSpread ? _mm512_loadu_si512(spreads + o0) : _mm512_setzero_si512();
    if (!kSpread && valid == 0xFFFF) {
      DwBlock<false, true>(image + c0, w16, e, g, i, o0, valid, in_valid, spread);
    } else {
      DwBlock<kSpread, false>(image + c0, w16, e, g, i, o0, valid, in_valid, spread);
    }
  }
}
#pragma GCC pop_options
#endif

// Plain C++ (the avx2 path compiles it for AVX2 below): one output pixel at a time, its O
// sums in uint32 (the wrapping of int32 sums without undefined behaviour).
[[gnu::always_inline]] inline void DepthwiseRowLoops(const int8_t* x, const int8_t* w,
                                                     const int32_t* offset, int32_t* dst_row,
                                                     const DwGeom& g, int64_t r) {
  const int64_t oh = g.out_h(), ow = g.out_w(), C = g.channels, O = g.out_c, m = g.mult();
  const int64_t b = r / oh, i = r % oh, cg = g.cg, og = g.out_per_group();
  const uint32_t pad = static_cast<uint32_t>(g.pad);
  for (int64_t j = 0; j < ow; ++j) {
    uint32_t* dst = reinterpret_cast<uint32_t*>(dst_row + j * O);
    for (int64_t o = 0; o < O; ++o) dst[o] = static_cast<uint32_t>(offset[o]);
    for (int64_t u = 0; u < g.kh; ++u) {
      const int64_t ih = g.in_row(i, u);
      for (int64_t v = 0; v < g.kw; ++v) {
        const int64_t iw = g.in_col(j, v);
        const int8_t* wp = w + (u * g.kw + v) * cg * O;  // [c][O]
        if (ih < 0 || ih >= g.height || iw < 0 || iw >= g.width) {
          for (int64_t c = 0; c < cg; ++c) {
            for (int64_t o = 0; o < O; ++o) {
              dst[o] += pad * static_cast<uint32_t>(int32_t{wp[c * O + o]});
            }
          }
          continue;
        }
        const int8_t* xp = x + ((b * g.height + ih) * g.width + iw) * C;
        if (cg > 1) {
          for (int64_t o = 0; o < O; ++o) {
            const int8_t* xg = xp + o / og * cg;
            uint32_t sum = 0;
            for (int64_t c = 0; c < cg; ++c) {
              sum += static_cast<uint32_t>(int32_t{xg[c]} * int32_t{wp[c * O + o]});
            }
            dst[o] += sum;
          }
        } else if (m == 1) {
          for (int64_t o = 0; o < O; ++o) {
            dst[o] += static_cast<uint32_t>(int32_t{xp[o]} * int32_t{wp[o]});
          }
        } else {
          for (int64_t o = 0; o < O; ++o) {
            dst[o] += static_cast<uint32_t>(int32_t{xp[o / m]} * int32_t{wp[o]});
          }
        }
      }
    }
  }
}

void DepthwiseRowPortable(const int8_t* x, const int8_t* w, const int32_t* offset,
                          int32_t* dst_row, const DwGeom& g, int64_t r) {
  DepthwiseRowLoops(x, w, offset, dst_row, g, r);
}

#ifdef QJAX_X86
__attribute__((target("avx2"))) void DepthwiseRowAvx2(const int8_t* x, const int8_t* w,
                                                      const int32_t* offset, int32_t* dst_row,
                                                      const DwGeom& g, int64_t r) {
  DepthwiseRowLoops(x, w, offset, dst_row, g, r);
}

// 16 input bytes from p widened to 8 int16 pairs (copied where a load would pass x_end; the
// bytes past the block's groups are never spread to a lane).
__attribute__((target("avx2"))) inline __m256i Avx2PixelPairs(const int8_t* p,
                                                              const int8_t* x_end) {
  if (p + 16 <= x_end) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  alignas(16) int8_t tail[16] = {};
  std::memcpy(tail, p, static_cast<size_t>(x_end - p));
  return _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(tail)));
}

// GroupedRowAvx2's output columns [j, j + NP) of row i for the block of `lanes` output
// channels from o0: `at` the row's image at the block's first group's first channel.
template <int NP>
__attribute__((target("avx2"))) inline void Avx2GroupedColumns(
    const int8_t* at, const int8_t* x_end, const int32_t* w2, const int32_t* block_idx,
    const int32_t* offset, int32_t* dst_row, const DwGeom& g, int64_t i, int64_t j, int64_t o0,
    int64_t lanes) {
  const int64_t C = g.channels, O = g.out_c, Q = g.cg / 2;
  const __m256i pad = _mm256_set1_epi16(static_cast<int16_t>(g.pad));
  __m256i acc[NP];
  for (int t = 0; t < NP; ++t) acc[t] = _mm256_setzero_si256();
  for (int64_t u = 0; u < g.kh; ++u) {
    const int64_t ih = g.in_row(i, u);
    for (int64_t v = 0; v < g.kw; ++v) {
      __m256i xv[NP];
      for (int t = 0; t < NP; ++t) {
        const int64_t col = g.in_col(j + t, v);
        xv[t] = ih < 0 || ih >= g.height || col < 0 || col >= g.width
                    ? pad
                    : Avx2PixelPairs(at + (ih * g.width + col) * C, x_end);
      }
      const int32_t* wt = w2 + (u * g.kw + v) * Q * O + o0;
      for (int64_t q = 0; q < Q; ++q) {
        const __m256i spread =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block_idx + q * 8));
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt + q * O));
        for (int t = 0; t < NP; ++t) {
          acc[t] = _mm256_add_epi32(
              acc[t], _mm256_madd_epi16(_mm256_permutevar8x32_epi32(xv[t], spread), wv));
        }
      }
    }
  }
  for (int t = 0; t < NP; ++t) {
    alignas(32) uint32_t sums[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(sums), acc[t]);
    uint32_t* dst = reinterpret_cast<uint32_t*>(dst_row + (j + t) * O + o0);
    for (int64_t l = 0; l < lanes; ++l) dst[l] = static_cast<uint32_t>(offset[o0 + l]) + sums[l];
  }
}

// Output row r of a grouped convolution that `pairs_fit(8, 16)`, as GwBlock on 8 lanes: a block's
// input bytes of a pixel widened to 8 int16 pairs, pair q of each lane's group moved to it
// (vpermd), two exact products a lane (vpmaddwd) added in int32; the sums + offset (wrapping)
// into dst_row. w2 / idx8: GroupedPairs with 8 lanes; x_end: the input's end (a 16-byte load
// that would pass it is copied instead).
__attribute__((target("avx2"))) void GroupedRowAvx2(const int8_t* x, const int8_t* x_end,
                                                    const int32_t* w2, const int32_t* idx8,
                                                    const int32_t* offset, int32_t* dst_row,
                                                    const DwGeom& g, int64_t r) {
  const int64_t oh = g.out_h(), ow = g.out_w(), C = g.channels, O = g.out_c, Q = g.cg / 2;
  const int64_t b = r / oh, i = r % oh, og = g.out_per_group();
  const int8_t* image = x + b * g.height * g.width * C;
  for (int64_t o0 = 0; o0 < O; o0 += 8) {
    const int64_t lanes = std::min<int64_t>(8, O - o0);
    const int8_t* at = image + o0 / og * g.cg;
    const int32_t* block_idx = idx8 + o0 / 8 * Q * 8;
    int64_t j = 0;  // four output columns a weight load, then single columns
    for (; j + 4 <= ow; j += 4) {
      Avx2GroupedColumns<4>(at, x_end, w2, block_idx, offset, dst_row, g, i, j, o0, lanes);
    }
    for (; j < ow; ++j) {
      Avx2GroupedColumns<1>(at, x_end, w2, block_idx, offset, dst_row, g, i, j, o0, lanes);
    }
  }
}
#endif

// Whether the kernel runs this grouping: depthwise (cg = 1), `wide_groups`, or groups of an
// even count of cg <= 16 input channels whose blocks of 16 output channels read at most 32
// input bytes.
bool GroupedFits(const DwGeom& g) {
  return g.cg == 1 || g.wide_groups() || g.pairs_fit(16, 32);
}

// The path and the geometry of a depthwise handler's call, checked.
ffi::Error DepthwiseSetup(int64_t path, ffi::Buffer<ffi::S8>& x, ffi::Buffer<ffi::S8>& w,
                          const ffi::AnyBuffer::Dimensions& od, size_t offsets, int64_t sh,
                          int64_t sw, int64_t dh, int64_t dw, int64_t pt, int64_t pb,
                          int64_t pl, int64_t pr, ffi::Buffer<ffi::S32>& pad, Path* p,
                          DwGeom* g) {
  ffi::Error err = CheckPath(path, p);
  if (err.failure()) return err;
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 4 || wd.size() != 4 || od.size() != 4 || xd[3] < 1 || wd[2] < 1 ||
      xd[3] % wd[2] != 0 || wd[3] % (xd[3] / wd[2]) != 0 ||
      static_cast<int64_t>(offsets) != wd[3]) {
    return ffi::Error::InvalidArgument("qjax depthwise conv: x must be NHWC (C >= 1), w (KH, "
                                       "KW, C / G, O) with G = C / w's input channels "
                                       "dividing O, offset (O,)");
  }
  if (pad.element_count() != 1) {
    return ffi::Error::InvalidArgument("qjax depthwise conv: pad_value must be one int32");
  }
  // Taken as int8, as the XLA form pads (pad_value.astype(int8)).
  *g = DwGeom{xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], sh, sw, dh, dw, wd[3],
              pt, pb, pl, pr, static_cast<int8_t>(pad.typed_data()[0]), wd[2]};
  if (!GroupedFits(*g)) {
    return ffi::Error::InvalidArgument("qjax depthwise conv: groups of more than one input "
                                       "channel need an even count of at most 16, and a block "
                                       "of 16 output channels' groups at most 32 input bytes");
  }
  if (sh < 1 || sw < 1 || dh < 1 || dw < 1 || g->kh < 1 || g->kw < 1 || pt < 0 || pb < 0 ||
      pl < 0 || pr < 0 || (g->kh - 1) * dh + 1 > g->height + pt + pb ||
      (g->kw - 1) * dw + 1 > g->width + pl + pr) {
    return ffi::Error::InvalidArgument("qjax depthwise conv: strides and dilations must be "
                                       ">= 1, paddings >= 0 and the dilated window must fit "
                                       "the padded input");
  }
  if (od[0] != g->batch || od[1] != g->out_h() || od[2] != g->out_w() || od[3] != g->out_c) {
    return ffi::Error::InvalidArgument("qjax depthwise conv: output shape mismatch");
  }
  return ffi::Error::Success();
}

// A grouped convolution's weights as int16 pairs (w[2q], w[2q + 1]) of each output channel,
// [(t Q + q)][O] (8 zeros of slack past the end: an AVX2 block reads 8 lanes), and for each
// block of `lanes` output channels its Q x lanes lane indices (lane l: pair q of its group,
// counted from the block's first group).
void GroupedPairs(const DwGeom& g, const int8_t* w8, int64_t lanes, std::vector<int32_t>* w2,
                  std::vector<int32_t>* idx) {
  const int64_t N = g.out_c, Q = g.cg / 2, taps = g.kh * g.kw, og = g.out_per_group();
  w2->assign(taps * Q * N + 8, 0);
  for (int64_t t = 0; t < taps; ++t) {
    for (int64_t q = 0; q < Q; ++q) {
      for (int64_t o = 0; o < N; ++o) {
        const uint16_t lo = static_cast<uint16_t>(int16_t{w8[(t * g.cg + 2 * q) * N + o]});
        const uint16_t hi = static_cast<uint16_t>(int16_t{w8[(t * g.cg + 2 * q + 1) * N + o]});
        (*w2)[(t * Q + q) * N + o] = static_cast<int32_t>(lo | uint32_t{hi} << 16);
      }
    }
  }
  const int64_t blocks = (N + lanes - 1) / lanes;
  idx->assign(blocks * Q * lanes, 0);
  for (int64_t k = 0; k < blocks; ++k) {
    for (int64_t q = 0; q < Q; ++q) {
      for (int64_t l = 0; l < lanes && k * lanes + l < N; ++l) {
        (*idx)[(k * Q + q) * lanes + l] =
            static_cast<int32_t>(((k * lanes + l) / og - (k * lanes) / og) * Q + q);
      }
    }
  }
}

// Runs the output rows on the pool through the epilogue e (its output at the first row; the
// sums + e.offset as int32, or requantized): on the AVX-512 paths straight from the
// accumulators, elsewhere from each row's int32 sums (in the output, or in a buffer of the
// thread that the requantization then reads).
void RunDepthwise(Path p, const int8_t* x, const int8_t* w8, const DwGeom& g,
                  int64_t threads_attr, const Epilogue& e) {
  const int64_t N = g.out_c, ow = g.out_w(), rows = g.batch * g.out_h();
  const int64_t macs = rows * ow * N * g.kh * g.kw * g.cg;
  const auto row_epilogue = [&](int64_t r) {
    Epilogue er = e;  // a local copy: its fields stay in registers
    er.ldo = N;
    if (Int32Out(e)) {
      er.out32 = e.out32 + r * ow * N;
    } else {
      er.out8 = e.out8 + r * ow * N;
    }
    return er;
  };
#ifdef QJAX_X86
  if (Avx512(p) && g.wide_groups()) {
    // 4 weights a lane, [(t cg / 4 + d)][O], and the -128 sum w correction (mod 2^32), once a
    // call.
    const int64_t D = g.cg / 4, taps = g.kh * g.kw;
    std::vector<int32_t> w4(taps * D * N), corr(N, 0);
    for (int64_t t = 0; t < taps; ++t) {
      for (int64_t d = 0; d < D; ++d) {
        for (int64_t o = 0; o < N; ++o) {
          uint32_t packed = 0, sum = 0;
          for (int64_t k = 0; k < 4; ++k) {
            const int8_t v = w8[(t * g.cg + 4 * d + k) * N + o];
            packed |= uint32_t{static_cast<uint8_t>(v)} << (8 * k);
            sum += static_cast<uint32_t>(int32_t{v});
          }
          w4[(t * D + d) * N + o] = static_cast<int32_t>(packed);
          corr[o] = static_cast<int32_t>(static_cast<uint32_t>(corr[o]) - 128u * sum);
        }
      }
    }
    // The input + 128 with its padding (pad + 128) in place, once a call: every tap a load.
    DwGeom gp = g;
    gp.height = g.height + g.pt + g.pb;
    gp.width = g.width + g.pl + g.pr;
    gp.pt = gp.pb = gp.pl = gp.pr = 0;
    const int64_t C = g.channels, row_bytes = gp.width * C;
    uint8_t* xu = static_cast<uint8_t*>(tls_xpack.Get(g.batch * gp.height * row_bytes));
    const uint8_t pad = static_cast<uint8_t>(g.pad) ^ 0x80u;
    const int threads = ThreadsFor(macs, threads_attr);
    ParallelFor(g.batch * gp.height, threads, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        uint8_t* dst = xu + r * row_bytes;
        const int64_t ih = r % gp.height - g.pt;
        if (ih < 0 || ih >= g.height) {
          std::memset(dst, pad, row_bytes);
          continue;
        }
        std::memset(dst, pad, g.pl * C);
        CopyFlip(x + ((r / gp.height) * g.height + ih) * g.width * C, dst + g.pl * C,
                 g.width * C);
        std::memset(dst + (g.pl + g.width) * C, pad, g.pr * C);
      }
    });
    const Epilogue e0 = row_epilogue(0);
    ParallelFor(rows * ow, threads, [&](int64_t m0, int64_t m1) {
      WideGroupedPixelsAvx512(xu, w4.data(), corr.data(), e0, gp, m0, m1);
    });
    return;
  }
  if (Avx512(p) && g.cg > 1) {
    std::vector<int32_t> w2, idx;
    GroupedPairs(g, w8, 16, &w2, &idx);
    ParallelFor(rows, ThreadsFor(macs, threads_attr), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        GroupedRowAvx512(x, w2.data(), idx.data(), row_epilogue(r), g, r);
      }
    });
    return;
  }
  if (Avx512(p)) {
    // The weights widened once a call: int32 lanes of (w, 0) as two int16.
    std::vector<int32_t> w16(g.kh * g.kw * N);
    for (size_t k = 0; k < w16.size(); ++k) {
      w16[k] = static_cast<int32_t>(static_cast<uint16_t>(static_cast<int16_t>(w8[k])));
    }
    const int64_t m = g.mult(), blocks = (N + 15) / 16;
    // Lane l of block o0 reads input channel (o0 + l) / m: its index from o0 / m, once a call.
    std::vector<int32_t> spreads(m > 1 ? blocks * 16 : 0);
    for (int64_t k = 0; k < static_cast<int64_t>(spreads.size()); ++k) {
      const int64_t o0 = k / 16 * 16;
      spreads[k] = static_cast<int32_t>(std::min<int64_t>(k / m - o0 / m, 15));
    }
    ParallelFor(rows, ThreadsFor(macs, threads_attr), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const Epilogue er = row_epilogue(r);
        if (m == 1) {
          DepthwiseRowAvx512<false>(x, w16.data(), nullptr, er, g, r);
        } else {
          DepthwiseRowAvx512<true>(x, w16.data(), spreads.data(), er, g, r);
        }
      }
    });
    return;
  }
  std::vector<int32_t> w2, idx8;  // GroupedRowAvx2's weight pairs and lane indices
  if (p == kAvx2 && g.pairs_fit(8, 16)) GroupedPairs(g, w8, 8, &w2, &idx8);
  const int8_t* x_end = x + g.batch * g.height * g.width * g.channels;
#endif
  const std::vector<int32_t> zeros(N, 0);
  ParallelFor(rows, ThreadsFor(macs, threads_attr), [&](int64_t r0, int64_t r1) {
    std::vector<int32_t> buffer(Int32Out(e) ? 0 : ow * N);
    for (int64_t r = r0; r < r1; ++r) {
      const Epilogue er = row_epilogue(r);
      int32_t* sums = Int32Out(e) ? er.out32 : buffer.data();
      const int32_t* offset = Int32Out(e) && e.offset ? e.offset : zeros.data();
#ifdef QJAX_X86
      if (p == kAvx2 && !w2.empty()) {
        GroupedRowAvx2(x, x_end, w2.data(), idx8.data(), offset, sums, g, r);
      } else if (p == kAvx2) {
        DepthwiseRowAvx2(x, w8, offset, sums, g, r);
      } else {
        DepthwiseRowPortable(x, w8, offset, sums, g, r);
      }
      if (!Int32Out(e) && p == kAvx2) {
        EpilogueRowsAvx2(sums, 0, ow, N, er);
        continue;
      }
#else
      DepthwiseRowPortable(x, w8, offset, sums, g, r);
#endif
      if (!Int32Out(e)) {
        for (int64_t j = 0; j < ow; ++j) {
          for (int64_t n = 0; n < N; ++n) ScalarEpilogue(er, j, n, sums[j * N + n]);
        }
      }
    }
  });
}

ffi::Error DepthwiseS32(ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w,
                        ffi::Buffer<ffi::S32> offset, ffi::Buffer<ffi::S32> pad,
                        ffi::ResultBuffer<ffi::S32> out, int64_t sh, int64_t sw, int64_t dh,
                        int64_t dw, int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                        int64_t path, int64_t threads) {
  Path p;
  DwGeom g;
  ffi::Error err = DepthwiseSetup(path, x, w, out->dimensions(), offset.element_count(), sh,
                                  sw, dh, dw, pt, pb, pl, pr, pad, &p, &g);
  if (err.failure() || out->element_count() == 0) return err;
  Epilogue e;
  e.offset = offset.typed_data();
  e.out32 = out->typed_data();
  RunDepthwise(p, x.typed_data(), w.typed_data(), g, threads, e);
  return ffi::Error::Success();
}

// The same, requantized to int8 by the fused epilogue (no int32 array in memory: 4 bytes a
// result written and read back, and at 32 x 56 x 56 x 128 51 MB of fresh pages a call).
ffi::Error DepthwiseRequant(ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w,
                            ffi::Buffer<ffi::S32> offset, ffi::Buffer<ffi::S32> pad,
                            ffi::AnyBuffer bias, ffi::AnyBuffer mult,
                            ffi::Buffer<ffi::S32> zero_point, ffi::ResultBuffer<ffi::S8> out,
                            int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t pt,
                            int64_t pb, int64_t pl, int64_t pr, int64_t lo, int64_t hi,
                            bool relu, bool integer, int64_t path, int64_t threads) {
  Path p;
  DwGeom g;
  ffi::Error err = DepthwiseSetup(path, x, w, out->dimensions(), offset.element_count(), sh,
                                  sw, dh, dw, pt, pb, pl, pr, pad, &p, &g);
  if (err.failure()) return err;
  Epilogue e;
  err = RequantEpilogue(offset, bias, mult, zero_point, out, g.out_c, lo, hi, relu, integer,
                        &e);
  if (err.failure() || out->element_count() == 0) return err;
  RunDepthwise(p, x.typed_data(), w.typed_data(), g, threads, e);
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------------------
// Pieces of the handlers' bindings (appended in the order of the handlers' parameters).
// bias (N,), multiplier (N,), zero point (1,) and the int8 result of a requantizing handler.
template <class B>
auto RequantBuffers(B&& binding) {
  return std::forward<B>(binding)
      .template Arg<ffi::AnyBuffer>()  // float32 bias, or the integer requantizer's int32 m0
      .template Arg<ffi::AnyBuffer>()  // float32 multiplier, or int32 shift
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Ret<ffi::Buffer<ffi::S8>>();
}

// A requantizer's output grid and kind: lo, hi, relu, integer.
template <class B>
auto GridAttrs(B&& binding) {
  return std::forward<B>(binding)
      .template Attr<int64_t>("lo")
      .template Attr<int64_t>("hi")
      .template Attr<bool>("relu")
      .template Attr<bool>("integer");
}

// A convolution's strides and dilation.
template <class B>
auto StrideAttrs(B&& binding) {
  return std::forward<B>(binding)
      .template Attr<int64_t>("sh")
      .template Attr<int64_t>("sw")
      .template Attr<int64_t>("dh")
      .template Attr<int64_t>("dw");
}

// A convolution's window, strides and dilation.
template <class B>
auto GeometryAttrs(B&& binding) {
  return StrideAttrs(std::forward<B>(binding)
                         .template Attr<int64_t>("kh")
                         .template Attr<int64_t>("kw"));
}

// The code path and the thread count.
template <class B>
auto RunAttrs(B&& binding) {
  return std::forward<B>(binding)
      .template Attr<int64_t>("path")
      .template Attr<int64_t>("threads");
}

// ------------------------------------------------------------------------------------------
// Peak probes for experiments/bench_gemm: the multiply-add instruction of a path in a loop of
// independent accumulators (registers only, no memory), on `threads` threads at once: what the
// cores really do per second, turbo clock included (a figure of cycles x the reported clock
// was off by 3x on a VM whose /proc/cpuinfo gives the base clock).

template <class Body>
double PeakRun(int threads, int64_t iters, double ops_per_iter, const Body& body) {
  std::vector<std::thread> pool;
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<double> seconds(threads);
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      ready.fetch_add(1);
      while (!go.load()) std::this_thread::yield();
      const auto start = std::chrono::steady_clock::now();
      body(iters);
      seconds[t] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    });
  }
  while (ready.load() < threads) std::this_thread::yield();
  go.store(true);
  for (auto& th : pool) th.join();
  double total = 0;
  for (double s : seconds) total += iters * ops_per_iter / s;
  return total / 1e9;
}

#ifdef QJAX_X86
// A probe: 12 independent accumulators of type V, STEP(a) on each per iteration (x and w
// its operands), the registers kept live to the end; no memory is touched.
#define QJAX_PEAK_12(op) op(a0) op(a1) op(a2) op(a3) op(a4) op(a5) op(a6) op(a7) op(a8) op(a9) op(a10) op(a11)
#define QJAX_KEEP(a) __asm__ volatile("" ::"v"(a));
#define QJAX_PEAK_PROBE(NAME, TARGET, V, ZERO, XV, WV, STEP)                                  \
  __attribute__((target(TARGET))) void NAME(int64_t iters) {                                  \
    V a0 = ZERO, a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0,   \
      a9 = a0, a10 = a0, a11 = a0;                                                             \
    const V x = XV, w = WV;                                                                    \
    for (int64_t i = 0; i < iters; ++i) {                                                      \
      QJAX_PEAK_12(STEP)                                                                       \
    }                                                                                          \
    QJAX_PEAK_12(QJAX_KEEP)                                                                    \
  }

#define QJAX_DP(a) __asm__ volatile("vpdpbusd %2, %1, %0" : "+v"(a) : "v"(x), "v"(w));
// The avx2 path's step: vpmaddwd (16 multiply-adds) and vpaddd.
#define QJAX_MADD(a) __asm__ volatile("vpmaddwd %1, %2, %%ymm15\n\tvpaddd %%ymm15, %0, %0" \
                                      : "+x"(a) : "x"(x), "x"(w) : "xmm15");
#define QJAX_FMA(a) __asm__ volatile("vfmadd231ps %2, %1, %0" : "+x"(a) : "x"(x), "x"(w));
QJAX_PEAK_PROBE(PeakVnni, "avx512f,avx512bw,avx512vnni", __m512i, _mm512_setzero_si512(),
                _mm512_set1_epi8(1), _mm512_set1_epi8(1), QJAX_DP)
QJAX_PEAK_PROBE(PeakAvx2, "avx2", __m256i, _mm256_setzero_si256(), _mm256_set1_epi16(1),
                _mm256_set1_epi16(1), QJAX_MADD)
QJAX_PEAK_PROBE(PeakFma512, "avx512f", __m512, _mm512_setzero_ps(), _mm512_set1_ps(1.0f),
                _mm512_set1_ps(1e-7f), QJAX_FMA)
QJAX_PEAK_PROBE(PeakFma256, "avx2,fma", __m256, _mm256_setzero_ps(), _mm256_set1_ps(1.0f),
                _mm256_set1_ps(1e-7f), QJAX_FMA)
#undef QJAX_FMA
#undef QJAX_MADD
#undef QJAX_DP
#undef QJAX_PEAK_PROBE
#undef QJAX_KEEP
#undef QJAX_PEAK_12

// tdpbusd into 4 tiles from one A and one B tile (16 x 16 x 64 multiply-adds each).
void PeakAmx(int64_t iters) {
  alignas(64) static const int8_t ones[1024] = {};
  AmxTiles::Begin();
  AmxTiles::Load<4>(ones, 64);
  AmxTiles::Load<6>(ones, 64);
  for (int64_t i = 0; i < iters; ++i) {
    AmxTiles::Dp<0, 4, 6>();
    AmxTiles::Dp<1, 4, 6>();
    AmxTiles::Dp<2, 4, 6>();
    AmxTiles::Dp<3, 4, 6>();
  }
  AmxTiles::End();
}
#endif  // QJAX_X86

}  // namespace

// The handlers and qjax_int8_paths are the library's only exported symbols.
#pragma GCC visibility push(default)

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxInt8GemmS32, OnXlaPool<GemmS32>::Call,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("path")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxInt8GemmRequant, OnXlaPool<GemmRequant>::Call,
                              RunAttrs(GridAttrs(RequantBuffers(
                                  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
                                      .Arg<ffi::Buffer<ffi::S8>>()      // x
                                      .Arg<ffi::Buffer<ffi::S8>>()      // w
                                      .Arg<ffi::Buffer<ffi::S32>>()))));  // offset

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxInt8GemmPackedS32, OnXlaPool<PackedS32>::Call,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("path")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxInt8GemmPackedRequant, OnXlaPool<PackedRequant>::Call,
                              RunAttrs(GridAttrs(RequantBuffers(
                                  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
                                      .Arg<ffi::Buffer<ffi::S8>>()      // x
                                      .Arg<ffi::Buffer<ffi::S8>>()      // panels
                                      .Arg<ffi::Buffer<ffi::S32>>()     // column sums
                                      .Arg<ffi::Buffer<ffi::S32>>()))));  // offset

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxInt8ConvRequant, OnXlaPool<ConvRequant>::Call,
                              RunAttrs(GridAttrs(GeometryAttrs(RequantBuffers(
                                  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
                                      .Arg<ffi::Buffer<ffi::S8>>()     // x
                                      .Arg<ffi::Buffer<ffi::S8>>()     // w
                                      .Arg<ffi::Buffer<ffi::S32>>()))))); // offset

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxInt8ConvS32, OnXlaPool<ConvS32>::Call,
                              RunAttrs(GeometryAttrs(
                                  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
                                      .Arg<ffi::Buffer<ffi::S8>>()      // x
                                      .Arg<ffi::Buffer<ffi::S8>>()      // w
                                      .Arg<ffi::Buffer<ffi::S32>>()     // offset
                                      .Ret<ffi::Buffer<ffi::S32>>())));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxInt8ConvPackedRequant, OnXlaPool<ConvPackedRequant>::Call,
                              RunAttrs(GridAttrs(GeometryAttrs(RequantBuffers(
                                  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
                                      .Arg<ffi::Buffer<ffi::S8>>()     // x
                                      .Arg<ffi::Buffer<ffi::S8>>()     // panels
                                      .Arg<ffi::Buffer<ffi::S32>>()    // column sums
                                      .Arg<ffi::Buffer<ffi::S32>>()))))); // offset

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxInt8RequantS32, OnXlaPool<RequantS32>::Call,
                              GridAttrs(RequantBuffers(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
                                                           .Arg<ffi::Buffer<ffi::S32>>()   // acc
                                                           .Arg<ffi::Buffer<ffi::S32>>())) // offset
                                  .Attr<int64_t>("path"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxInt8Round, OnXlaPool<RoundInt8>::Call,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S8>>()
                                  .Attr<int64_t>("path"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxInt8RoundRows, OnXlaPool<RoundInt8Rows>::Call,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::PRED>>()  // non-finite rows
                                  .Attr<int64_t>("path"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxInt8DequantRows, OnXlaPool<DequantRows>::Call,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()    // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scale
                                  .Arg<ffi::Buffer<ffi::S32>>()   // zero point
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // bad rows
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxFakeQuantObserve, OnXlaPool<FakeQuantObserve>::Call,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()     // x
                                  .Arg<ffi::Buffer<ffi::F32>>()     // min_val
                                  .Arg<ffi::Buffer<ffi::F32>>()     // max_val
                                  .Arg<ffi::Buffer<ffi::S32>>()     // count
                                  .Arg<ffi::Buffer<ffi::S32>>()     // skipped
                                  .Ret<ffi::Buffer<ffi::F32>>()     // fake-quantized x
                                  .Ret<ffi::Buffer<ffi::PRED>>()    // in-range mask
                                  .Ret<ffi::Buffer<ffi::F32>>()     // new min_val
                                  .Ret<ffi::Buffer<ffi::F32>>()     // new max_val
                                  .Ret<ffi::Buffer<ffi::S32>>()     // new count
                                  .Ret<ffi::Buffer<ffi::S32>>()     // new skipped
                                  .Ret<ffi::Buffer<ffi::F32>>()     // scale
                                  .Ret<ffi::Buffer<ffi::S32>>()     // zero point
                                  .Ret<ffi::Buffer<ffi::S8>>()      // codes / panels
                                  .Ret<ffi::Buffer<ffi::S32>>()     // panels' column sums
                                  .Ret<ffi::Buffer<ffi::PRED>>()    // y holds a NaN
                                  .Attr<int64_t>("axis")
                                  .Attr<float>("averaging")
                                  .Attr<int64_t>("qmin")
                                  .Attr<int64_t>("qmax")
                                  .Attr<float>("eps")
                                  .Attr<int64_t>("symmetric")
                                  .Attr<int64_t>("symmetric_zero_point")
                                  .Attr<int64_t>("emit")
                                  .Attr<int64_t>("shift")
                                  .Attr<int64_t>("path"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxInt8PackRound, OnXlaPool<PackRound>::Call,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // w (K, N)
                                  .Arg<ffi::Buffer<ffi::F32>>()    // 1 / scale (N,)
                                  .Ret<ffi::Buffer<ffi::S8>>()     // panels
                                  .Ret<ffi::Buffer<ffi::S32>>()    // column sums
                                  .Ret<ffi::Buffer<ffi::PRED>>()   // non-finite columns
                                  .Attr<int64_t>("path"));

// A depthwise convolution's strides, dilation and padding (its window is the weights' shape;
// the padding value is an argument: a converted layer's zero point is traced).
template <class B>
auto DepthwiseAttrs(B&& binding) {
  return StrideAttrs(std::forward<B>(binding))
      .template Attr<int64_t>("pt")
      .template Attr<int64_t>("pb")
      .template Attr<int64_t>("pl")
      .template Attr<int64_t>("pr");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxInt8DepthwiseS32, OnXlaPool<DepthwiseS32>::Call,
                              RunAttrs(DepthwiseAttrs(
                                  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
                                      .Arg<ffi::Buffer<ffi::S8>>()     // x
                                      .Arg<ffi::Buffer<ffi::S8>>()     // w
                                      .Arg<ffi::Buffer<ffi::S32>>()    // offset
                                      .Arg<ffi::Buffer<ffi::S32>>()    // pad value
                                      .Ret<ffi::Buffer<ffi::S32>>())));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxInt8DepthwiseRequant, OnXlaPool<DepthwiseRequant>::Call,
                              RunAttrs(GridAttrs(DepthwiseAttrs(RequantBuffers(
                                  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
                                      .Arg<ffi::Buffer<ffi::S8>>()     // x
                                      .Arg<ffi::Buffer<ffi::S8>>()     // w
                                      .Arg<ffi::Buffer<ffi::S32>>()    // offset
                                      .Arg<ffi::Buffer<ffi::S32>>()))))); // pad value

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxInt8MaxPool, OnXlaPool<MaxPoolInt8>::Call,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S8>>()
                                  .Attr<int64_t>("window_h")
                                  .Attr<int64_t>("window_w")
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("path"));

// Which paths this CPU can run: bit 0 portable, bit 1 avx2, bit 2 vnni (and amx emulated);
// bit 3: AMX-INT8 is granted to this process and the tile kernel passed its check (path amx);
// bit 4: AMX-INT8 is granted but the tile kernel failed its check; bit 5: AVX-512 VBMI (the
// direct single-channel convolution on the AVX-512 paths). For Python, through ctypes.
// The check that path amx passes before it is offered, run on emulated tiles: 1 when it
// passes, 0 when it fails or the CPU lacks AVX-512 VNNI (tests run the check's code here).
extern "C" int qjax_int8_tile_check_emulated() {
  return Cpu().vnni512 && EmulatedTileCheck() ? 1 : 0;
}

// Peak GOP/s (2 operations a multiply-add) of `path`'s multiply-add instruction (1 portable:
// 0, not measured; 2 avx2; 3 vnni; 4 amx), or of float32 FMAs (path 0: AVX-512 where the CPU
// has it, else AVX2), on `threads` threads; 0 where the CPU lacks the instructions.
extern "C" double qjax_int8_peak_gops(int path, int threads, double seconds) {
#ifdef QJAX_X86
  if (threads < 1 || seconds <= 0) return 0;
  // About `seconds` per thread (cycles per iteration from a short trial run).
  const auto timed = [&](double ops, auto body) {
    const double trial = PeakRun(1, 100000, ops, body);  // GOP/s of one thread
    const int64_t iters = std::max<int64_t>(1000, static_cast<int64_t>(trial * 1e9 * seconds / ops));
    return PeakRun(threads, iters, ops, body);
  };
  switch (path) {
    case 0:
      if (Cpu().vnni512) return timed(12.0 * 32, PeakFma512);
      return Cpu().avx2 ? timed(12.0 * 16, PeakFma256) : 0;
    case 2: return Cpu().avx2 ? timed(12.0 * 32, PeakAvx2) : 0;
    case 3: return Cpu().vnni512 ? timed(12.0 * 128, PeakVnni) : 0;
    case 4: return AmxWorks() ? timed(4.0 * 16 * 16 * 64 * 2, PeakAmx) : 0;
    default: return 0;
  }
#else
  (void)path, (void)threads, (void)seconds;
  return 0;
#endif
}

extern "C" int qjax_int8_paths() {
  const bool granted = Cpu().amx_int8 && Cpu().vnni512;
  return 1 | (Cpu().avx2 ? 2 : 0) | (Cpu().vnni512 ? 4 : 0) | (AmxWorks() ? 8 : 0) |
         (granted && !AmxWorks() ? 16 : 0) | (Cpu().vbmi ? 32 : 0);
}

#pragma GCC visibility pop
