// eqat's packed CPU kernels (see eqat_cli/quant/cpu_kernel.py): a plain C ABI over raw pointers,
// built with g++ on first use and called through ctypes. Threads: a small pool of its own
// (below) in which the calling thread starts on the chunks of work at once and helper threads
// claim chunks as they wake; the call waits only for chunks a helper has claimed, never for a
// helper that has not woken up. On shared cores (several jobs per core) an OpenMP barrier waits
// for the slowest thread's whole time slice; this does not.
//
// Layout (EfficientQAT native, docs/FORMATS.md): qweight [ceil(K/pf), N] int32, code j of a word
// at bit bits*j; zero points unpacked to uint8 [G, N]; step sizes [G, N] fp16 or fp32.
//
// gemv: y[m, n] = sum_g s[g, n] * (sum_{i in g} q[i, n] x[m, i] - z[g, n] X[m, g]),
//       X[m, g] = sum_{i in g} x[m, i]. The field j of a word is read as (word & (mask << bits*j)),
//       an unsigned integer q * 2^(bits*j) that converts to float exactly; the power of two is
//       folded into the activations (xs = x * 2^-(bits*j), also exact), so each code costs one
//       AND, one conversion and one FMA. Groups that start inside a word (3-bit, ragged groups)
//       read the straddling word once per group with the activations of the other group's fields
//       set to zero.
// dequant: out[k, t] = (q[k, n0+t] - z[g(k), n0+t]) * s[g(k), n0+t], a [K, n1-n0] panel of the
//       transposed weight (prefill multiplies it with an sgemm, panel after panel).
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <functional>
#include <vector>
#include <sched.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

inline float half_to_float(uint16_t h) {
#if defined(__FLT16_MAX__)
  _Float16 v; std::memcpy(&v, &h, 2); return (float)v;
#else
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, f;
  if (exp == 0) {
    if (man == 0) f = sign;
    else {
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; exp--; }
      f = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 31) f = sign | 0x7f800000 | (man << 13);
  else f = sign | ((exp + 127 - 15) << 23) | (man << 13);
  float out; std::memcpy(&out, &f, 4); return out;
#endif
}

struct Geo {
  int K, N, bits, pf, group, G;
};

inline float scale_at(const void* scales, int half, long idx) {
  return half ? half_to_float(((const uint16_t*)scales)[idx]) : ((const float*)scales)[idx];
}

// One tile of NB consecutive outputs [n0, n0 + NB) for M rows of activations.
template <int NB, int M>
void gemv_tile(const Geo& g, const uint32_t* qw, const uint8_t* zeros, const void* scales,
               int half, const float* xs, const long* xoff, const float* xsum, float* y,
               int n0) {
  const int N = g.N, pf = g.pf, bits = g.bits;
  float out[M][NB];
  for (int m = 0; m < M; m++)
    for (int t = 0; t < NB; t++) out[m][t] = 0.f;
  const long xs_stride = xoff[g.G];
  for (int gi = 0; gi < g.G; gi++) {
    const int lo = gi * g.group;
    const int w0 = lo / pf;
    const int nw = (int)((xoff[gi + 1] - xoff[gi]) / pf);
    float acc[M][NB];
    for (int m = 0; m < M; m++)
      for (int t = 0; t < NB; t++) acc[m][t] = 0.f;
    for (int w = 0; w < nw; w++) {
      const uint32_t* row = qw + (long)(w0 + w) * N + n0;
      uint32_t word[NB];
      for (int t = 0; t < NB; t++) word[t] = row[t];
      const float* xw = xs + xoff[gi] + (long)w * pf;
      for (int j = 0; j < pf; j++) {
        const uint32_t mask = ((1u << bits) - 1u) << (bits * j);
        float f[NB];
        for (int t = 0; t < NB; t++) f[t] = (float)(word[t] & mask);
        for (int m = 0; m < M; m++) {
          const float xv = xw[m * xs_stride + j];
          for (int t = 0; t < NB; t++) acc[m][t] += f[t] * xv;
        }
      }
    }
    const uint8_t* zr = zeros + (long)gi * N + n0;
    float s[NB], z[NB];
    for (int t = 0; t < NB; t++) {
      s[t] = scale_at(scales, half, (long)gi * N + n0 + t);
      z[t] = (float)zr[t];
    }
    for (int m = 0; m < M; m++) {
      const float xg = xsum[m * g.G + gi];
      for (int t = 0; t < NB; t++) out[m][t] += s[t] * (acc[m][t] - z[t] * xg);
    }
  }
  for (int m = 0; m < M; m++)
    for (int t = 0; t < NB; t++) y[(long)m * N + n0 + t] = out[m][t];
}


#if defined(__AVX512F__)
// The same tile with AVX-512 intrinsics: 32 outputs (two vectors), the bit width a template
// argument so the field loop unrolls, even and odd fields in separate accumulators (four
// independent FMA chains for one row).
template <int BITS, int M>
void gemv_tile_avx512(const Geo& g, const uint32_t* qw, const uint8_t* zeros, const void* scales,
                      int half, const float* xs, const long* xoff, const float* xsum, float* y,
                      int n0) {
  constexpr int PF = 32 / BITS;
  const int N = g.N;
  const long xs_stride = xoff[g.G];
  __m512 out[M][2];
  for (int m = 0; m < M; m++) out[m][0] = out[m][1] = _mm512_setzero_ps();
  for (int gi = 0; gi < g.G; gi++) {
    const int w0 = gi * g.group / PF;
    const int nw = (int)((xoff[gi + 1] - xoff[gi]) / PF);
    __m512 acc[M][2][2];
    for (int m = 0; m < M; m++)
      for (int a = 0; a < 2; a++) acc[m][a][0] = acc[m][a][1] = _mm512_setzero_ps();
    const uint32_t* row = qw + (long)w0 * N + n0;
    const float* xw = xs + xoff[gi];
    for (int w = 0; w < nw; w++, row += N, xw += PF) {
      const __m512i wa = _mm512_loadu_si512((const void*)row);
      const __m512i wb = _mm512_loadu_si512((const void*)(row + 16));
#pragma GCC unroll 16
      for (int j = 0; j < PF; j++) {
        const __m512i msk = _mm512_set1_epi32((int)((((1u << BITS) - 1u) << (BITS * j))));
        const __m512 fa = _mm512_cvtepu32_ps(_mm512_and_si512(wa, msk));
        const __m512 fb = _mm512_cvtepu32_ps(_mm512_and_si512(wb, msk));
        for (int m = 0; m < M; m++) {
          const __m512 xv = _mm512_set1_ps(xw[m * xs_stride + j]);
          acc[m][j & 1][0] = _mm512_fmadd_ps(fa, xv, acc[m][j & 1][0]);
          acc[m][j & 1][1] = _mm512_fmadd_ps(fb, xv, acc[m][j & 1][1]);
        }
      }
    }
    __m512 s0, s1;
    const long base = (long)gi * N + n0;
    if (half) {
      s0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)((const uint16_t*)scales + base)));
      s1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)((const uint16_t*)scales + base + 16)));
    } else {
      s0 = _mm512_loadu_ps((const float*)scales + base);
      s1 = _mm512_loadu_ps((const float*)scales + base + 16);
    }
    const __m512 z0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(zeros + base))));
    const __m512 z1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(zeros + base + 16))));
    for (int m = 0; m < M; m++) {
      const __m512 xg = _mm512_set1_ps(xsum[m * g.G + gi]);
      const __m512 a0 = _mm512_sub_ps(_mm512_add_ps(acc[m][0][0], acc[m][1][0]), _mm512_mul_ps(z0, xg));
      const __m512 a1 = _mm512_sub_ps(_mm512_add_ps(acc[m][0][1], acc[m][1][1]), _mm512_mul_ps(z1, xg));
      out[m][0] = _mm512_fmadd_ps(s0, a0, out[m][0]);
      out[m][1] = _mm512_fmadd_ps(s1, a1, out[m][1]);
    }
  }
  for (int m = 0; m < M; m++) {
    _mm512_storeu_ps(y + (long)m * N + n0, out[m][0]);
    _mm512_storeu_ps(y + (long)m * N + n0 + 16, out[m][1]);
  }
}
#endif

// The last, narrower tile: the same arithmetic one output at a time.
void gemv_tail(const Geo& g, const uint32_t* qw, const uint8_t* zeros, const void* scales,
               int half, const float* xs, const long* xoff, const float* xsum, float* y,
               int M, int n0, int n1) {
  const int N = g.N, pf = g.pf, bits = g.bits;
  const long xs_stride = xoff[g.G];
  for (int n = n0; n < n1; n++) {
    for (int m = 0; m < M; m++) {
      float out = 0.f;
      for (int gi = 0; gi < g.G; gi++) {
        const int w0 = gi * g.group / pf;
        const int nw = (int)((xoff[gi + 1] - xoff[gi]) / pf);
        float acc = 0.f;
        for (int w = 0; w < nw; w++) {
          const uint32_t word = qw[(long)(w0 + w) * N + n];
          const float* xw = xs + m * xs_stride + xoff[gi] + (long)w * pf;
          for (int j = 0; j < pf; j++)
            acc += (float)(word & (((1u << bits) - 1u) << (bits * j))) * xw[j];
        }
        out += scale_at(scales, half, (long)gi * N + n) *
               (acc - (float)zeros[(long)gi * N + n] * xsum[m * g.G + gi]);
      }
      y[(long)m * N + n] = out;
    }
  }
}


// ---------------------------------------------------------------- the pool
// state = generation (20 bits) | chunk count (22 bits) | next chunk (22 bits). A claim is a
// compare-and-swap on the whole word, so a helper can never claim a chunk of a job other than the
// one whose body it read (bodies live in a ring of 4 slots; the caller finishes a job, every
// claimed chunk done, before it publishes the next).
class Pool {
 public:
  template <class F>
  void run(int chunks, int nthreads, F&& body) {
    if (nthreads <= 1 || chunks <= 1) {
      for (int i = 0; i < chunks; i++) body(i);
      return;
    }
    std::lock_guard<std::mutex> one_caller(call_mu_);
    ensure_workers(nthreads - 1);
    Body b = [&body](int i) { body(i); };
    const uint64_t gen = (((state_.load() >> 44) + 1) & 0xFFFFF);
    slots_[gen & 3] = &b;
    done_.store(0, std::memory_order_relaxed);
    state_.store((gen << 44) | ((uint64_t)chunks << 22), std::memory_order_release);
    { std::lock_guard<std::mutex> lk(mu_); }
    cv_.notify_all();
    int mine = 0;
    work(gen, &mine);
    while (done_.load(std::memory_order_acquire) < chunks - mine) sched_yield();
  }

 private:
  using Body = std::function<void(int)>;

  // Claim and run chunks of job ``gen`` until none are left; returns through ``count`` how many.
  void work(uint64_t gen, int* count) {
    for (;;) {
      uint64_t st = state_.load(std::memory_order_acquire);
      if ((st >> 44) != gen) return;
      const uint64_t total = (st >> 22) & 0x3FFFFF, next = st & 0x3FFFFF;
      if (next >= total) return;
      if (!state_.compare_exchange_weak(st, st + 1, std::memory_order_acq_rel)) continue;
      (*slots_[gen & 3])((int)next);
      (*count)++;
    }
  }

  void ensure_workers(int n) {
    while ((int)workers_.size() < n) workers_.emplace_back([this] { loop(); });
  }

  void loop() {
    uint64_t seen = state_.load() >> 44;
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return (state_.load() >> 44) != seen; });
      }
      seen = state_.load(std::memory_order_acquire) >> 44;
      int n = 0;
      work(seen, &n);
      if (n) done_.fetch_add(n, std::memory_order_acq_rel);
    }
  }

  std::mutex call_mu_, mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> state_{0};
  std::atomic<int> done_{0};
  Body* slots_[4] = {nullptr, nullptr, nullptr, nullptr};
  std::vector<std::thread> workers_;  // detached at exit: never joined (process teardown)
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: helper threads may outlive static teardown
  return *p;
}

struct Tile {
  int layer, n0, width;
};

// One layer of a fused group: its packed tensors, its output and its width.
struct Layer {
  const uint32_t* qw;
  const uint8_t* zeros;
  const void* scales;
  float* y;
  int N;
};

template <int M>
void gemv_rows(const Geo& base, const Layer* layers, const std::vector<Tile>& tiles, int half,
               const float* xs, const long* xoff, const float* xsum, int nthreads) {
  constexpr int NB = 32;
  constexpr int PER_CHUNK = 2;  // tiles per claimed chunk
  const int count = (int)tiles.size();
  pool().run((count + PER_CHUNK - 1) / PER_CHUNK, nthreads, [&](int c) {
   for (int i = c * PER_CHUNK; i < count && i < (c + 1) * PER_CHUNK; i++) {
    const Tile& t = tiles[i];
    const Layer& L = layers[t.layer];
    Geo g = base;
    g.N = L.N;
    if (t.width < NB) {
      gemv_tail(g, L.qw, L.zeros, L.scales, half, xs, xoff, xsum, L.y, M, t.n0, t.n0 + t.width);
      continue;
    }
#if defined(__AVX512F__)
    switch (g.bits) {
      case 2: gemv_tile_avx512<2, M>(g, L.qw, L.zeros, L.scales, half, xs, xoff, xsum, L.y, t.n0); continue;
      case 3: gemv_tile_avx512<3, M>(g, L.qw, L.zeros, L.scales, half, xs, xoff, xsum, L.y, t.n0); continue;
      case 4: gemv_tile_avx512<4, M>(g, L.qw, L.zeros, L.scales, half, xs, xoff, xsum, L.y, t.n0); continue;
      case 8: gemv_tile_avx512<8, M>(g, L.qw, L.zeros, L.scales, half, xs, xoff, xsum, L.y, t.n0); continue;
    }
#endif
    gemv_tile<NB, M>(g, L.qw, L.zeros, L.scales, half, xs, xoff, xsum, L.y, t.n0);
   }
  });
}

}  // namespace

extern "C" {

int eqat_abi_version() { return 3; }

// x [M, K] fp32 -> for each of the L layers (same K, bits, group and scale dtype) y_l [M, N_l]
// fp32, in one parallel region over all their tiles: the layers of a group that reads the same
// input (q/k/v, gate/up) share the activation preprocessing and the thread fork. M is 1..4.
int eqat_gemv_multi(int L, const int32_t* const* qweights, const uint8_t* const* zeros,
                    const void* const* scales, int scales_half, const float* x,
                    float* const* ys, const int* Ns, int M, int K, int bits, int group,
                    int nthreads) {
  if (L < 1 || M < 1 || M > 4 || K < 1) return 1;
  if (!(bits == 2 || bits == 3 || bits == 4 || bits == 8)) return 2;
  Geo g;
  g.K = K; g.N = 0; g.bits = bits; g.pf = 32 / bits;
  g.group = (group <= 0 || group > K) ? K : group;
  g.G = (K + g.group - 1) / g.group;
  std::vector<Layer> layers(L);
  std::vector<Tile> tiles;
  for (int l = 0; l < L; l++) {
    if (Ns[l] < 1) return 1;
    layers[l] = Layer{(const uint32_t*)qweights[l], zeros[l], scales[l], ys[l], Ns[l]};
    int n0 = 0;
    for (; n0 + 32 <= Ns[l]; n0 += 32) tiles.push_back(Tile{l, n0, 32});
    if (n0 < Ns[l]) tiles.push_back(Tile{l, n0, Ns[l] - n0});
  }
  // Per group: the words it touches, and the scaled activations of those words' fields (zero
  // for fields outside the group or past K).
  std::vector<long> xoff(g.G + 1);
  xoff[0] = 0;
  for (int gi = 0; gi < g.G; gi++) {
    const int lo = gi * g.group, hi = lo + g.group < K ? lo + g.group : K;
    const int w0 = lo / g.pf, w1 = (hi + g.pf - 1) / g.pf;
    xoff[gi + 1] = xoff[gi] + (long)(w1 - w0) * g.pf;
  }
  const long stride = xoff[g.G];
  std::vector<float> xs((size_t)M * stride), xsum((size_t)M * g.G);
  float pow2[32];
  for (int j = 0; j < g.pf; j++) {
    uint32_t e = (uint32_t)(127 - bits * j) << 23;  // 2^-(bits*j), exact
    std::memcpy(&pow2[j], &e, 4);
  }
  for (int m = 0; m < M; m++) {
    const float* xm = x + (long)m * K;
    for (int gi = 0; gi < g.G; gi++) {
      const int lo = gi * g.group, hi = lo + g.group < K ? lo + g.group : K;
      const int base = lo / g.pf * g.pf;
      float* dst = xs.data() + m * stride + xoff[gi];
      const long len = xoff[gi + 1] - xoff[gi];
      float sum = 0.f;
      for (long p = 0; p < len; p++) {
        const int i = base + (int)p;
        const bool in = i >= lo && i < hi;
        dst[p] = in ? xm[i] * pow2[p % g.pf] : 0.f;
        if (in) sum += xm[i];
      }
      xsum[m * g.G + gi] = sum;
    }
  }
  if (nthreads < 1) nthreads = 1;
  switch (M) {
    case 1: gemv_rows<1>(g, layers.data(), tiles, scales_half, xs.data(), xoff.data(), xsum.data(), nthreads); break;
    case 2: gemv_rows<2>(g, layers.data(), tiles, scales_half, xs.data(), xoff.data(), xsum.data(), nthreads); break;
    case 3: gemv_rows<3>(g, layers.data(), tiles, scales_half, xs.data(), xoff.data(), xsum.data(), nthreads); break;
    default: gemv_rows<4>(g, layers.data(), tiles, scales_half, xs.data(), xoff.data(), xsum.data(), nthreads); break;
  }
  return 0;
}

int eqat_gemv(const int32_t* qweight, const uint8_t* zeros, const void* scales, int scales_half,
              const float* x, float* y, int M, int K, int N, int bits, int group, int nthreads) {
  return eqat_gemv_multi(1, &qweight, &zeros, &scales, scales_half, x, &y, &N, M, K, bits, group,
                         nthreads);
}

// out [K, n1 - n0] fp32: the dequantized transposed weight of outputs [n0, n1).
int eqat_dequant_panel(const int32_t* qweight, const uint8_t* zeros, const void* scales,
                       int scales_half, float* out, int K, int N, int bits, int group, int n0,
                       int n1, int nthreads) {
  if (K < 1 || N < 1 || n0 < 0 || n1 > N || n0 >= n1) return 1;
  if (!(bits == 2 || bits == 3 || bits == 4 || bits == 8)) return 2;
  const int pf = 32 / bits, width = n1 - n0;
  const int grp = (group <= 0 || group > K) ? K : group;
  const uint32_t mask = (1u << bits) - 1u;
  const int words = (K + pf - 1) / pf;
  if (nthreads < 1) nthreads = 1;
  pool().run(words, nthreads, [&](int w) {
    const uint32_t* row = (const uint32_t*)qweight + (long)w * N + n0;
    for (int j = 0; j < pf; j++) {
      const int k = w * pf + j;
      if (k >= K) break;
      const int gi = k / grp;
      const uint8_t* zr = zeros + (long)gi * N + n0;
      float* dst = out + (long)k * width;
      const int shift = bits * j;
      if (scales_half) {
        const uint16_t* sr = (const uint16_t*)scales + (long)gi * N + n0;
        for (int t = 0; t < width; t++)
          dst[t] = ((float)((row[t] >> shift) & mask) - (float)zr[t]) * half_to_float(sr[t]);
      } else {
        const float* sr = (const float*)scales + (long)gi * N + n0;
        for (int t = 0; t < width; t++)
          dst[t] = ((float)((row[t] >> shift) & mask) - (float)zr[t]) * sr[t];
      }
    }
  });
  return 0;
}

}  // extern "C"
