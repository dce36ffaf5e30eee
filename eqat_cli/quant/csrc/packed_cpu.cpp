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
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <functional>
#include <vector>
#include <sched.h>
#if defined(__AVX512F__) || defined(__AVX2__)
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

int eqat_abi_version() { return 4; }

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


// ------------------------------------------------------------ int8-activation decode (q8)
// The decode-friendly path (eqat_cli/quant/cpu_q8.py prepares the layout once per layer, or once
// per fused group of layers concatenated along N):
//   codes  [NS][nch][4][64] bytes: NS = NP/64 super-tiles of 64 outputs (N padded to NP with zero
//          codes), nch chunks of CK = 4*F k-values (F = 8/sb codes per byte, sb = storage bits
//          2, 4 or 8; 3-bit codes are stored in 4); within a chunk, tile t (16 outputs) is one
//          64-byte vector: byte 4*n + b of it holds the codes of output 16t+n at k = c*CK + 4f + b
//          in its field f (bits sb*f..). Each group of the weight is padded to a multiple of 16
//          k-values with zero codes, so a chunk never straddles two groups.
//   scales [NS][G][64] fp16 or fp32, zeros [NS][G][64] uint8.
// The activation row is quantized once per call, per weight group: dx = max|x|/127,
// xq = round_half_even(x * (127/max|x|)) in int8 (zero for padding), X = sum xq. Then
//   y[n] = sum_g (s[g,n] * dx[g]) * (sum_k q[k,n] xq[k] - z[g,n] X[g])
// with the inner sum and the zero-point correction in exact int32 arithmetic (u8 x s8 dot
// products: AVX-512 VNNI vpdpbusd, or AVX-512BW / AVX2 vpmaddubsw + vpmaddwd for codes < 16; a
// portable loop otherwise).
namespace {

struct Q8Geo {
  int K, group, G, NP, sb, F, CK, nch;
};

struct Q8Act {
  std::vector<int8_t> xq;
  std::vector<float> dx;
  std::vector<int32_t> xsum;
  std::vector<int32_t> gch;  // [G + 1] first chunk of each group
};

void q8_quantize(const Q8Geo& g, const float* x, Q8Act& a) {
  a.xq.assign((size_t)g.nch * g.CK, 0);
  a.dx.resize(g.G);
  a.xsum.resize(g.G);
  a.gch.resize(g.G + 1);
  int koff = 0;
  for (int gi = 0; gi < g.G; gi++) {
    const int lo = gi * g.group, hi = lo + g.group < g.K ? lo + g.group : g.K;
    a.gch[gi] = koff / g.CK;
    float amax = 0.f;
    for (int i = lo; i < hi; i++) {
      const float v = x[i] < 0 ? -x[i] : x[i];
      amax = v > amax ? v : amax;
    }
    int32_t sum = 0;
    if (amax > 0.f) {
      const float inv = 127.f / amax;
      for (int i = lo; i < hi; i++) {
        float r = std::nearbyint(x[i] * inv);
        r = r > 127.f ? 127.f : (r < -127.f ? -127.f : r);
        a.xq[koff + i - lo] = (int8_t)r;
        sum += (int32_t)r;
      }
      a.dx[gi] = amax / 127.f;
    } else {
      a.dx[gi] = 0.f;
    }
    a.xsum[gi] = sum;
    koff += (hi - lo + 15) / 16 * 16;
  }
  a.gch[g.G] = koff / g.CK;
}

inline float q8_scale(const void* scales, int half, long idx) { return scale_at(scales, half, idx); }

void q8_tile_portable(const Q8Geo& g, const uint8_t* codes, const void* scales, int half,
                      const uint8_t* zeros, const Q8Act& a, float* y, int s) {
  const int mask = (1 << g.sb) - 1;
  float out[64];
  for (int n = 0; n < 64; n++) out[n] = 0.f;
  for (int gi = 0; gi < g.G; gi++) {
    int32_t acc[64];
    for (int n = 0; n < 64; n++) acc[n] = 0;
    for (int c = a.gch[gi]; c < a.gch[gi + 1]; c++) {
      const uint8_t* cp = codes + ((long)s * g.nch + c) * 256;
      const int8_t* xc = a.xq.data() + (long)c * g.CK;
      for (int t = 0; t < 4; t++)
        for (int n = 0; n < 16; n++)
          for (int f = 0; f < g.F; f++)
            for (int b = 0; b < 4; b++)
              acc[t * 16 + n] += ((cp[t * 64 + n * 4 + b] >> (g.sb * f)) & mask) * (int32_t)xc[4 * f + b];
    }
    const long base = ((long)s * g.G + gi) * 64;
    for (int n = 0; n < 64; n++) {
      const int32_t d = acc[n] - (int32_t)zeros[base + n] * a.xsum[gi];
      out[n] += (q8_scale(scales, half, base + n) * a.dx[gi]) * (float)d;
    }
  }
  for (int n = 0; n < 64; n++) y[(long)s * 64 + n] = out[n];
}

#if defined(__AVX512BW__)
template <int SB, bool VNNI>
inline __m512i q8_dot(__m512i acc, __m512i codes, __m512i x) {
#if defined(__AVX512VNNI__)
  if (VNNI) return _mm512_dpbusd_epi32(acc, codes, x);
#endif
  // codes < 16 (SB <= 4): the pairwise 16-bit sums cannot saturate (2 * 15 * 127)
  const __m512i p = _mm512_maddubs_epi16(codes, x);
  return _mm512_add_epi32(acc, _mm512_madd_epi16(p, _mm512_set1_epi16(1)));
}

template <int SB, bool VNNI>
void q8_tile_avx512(const Q8Geo& g, const uint8_t* codes, const void* scales, int half,
                    const uint8_t* zeros, const Q8Act& a, float* y, int s) {
  constexpr int F = 8 / SB;
  constexpr int CK = 4 * F;
  const __m512i mask = _mm512_set1_epi8((char)((1 << SB) - 1));
  __m512 out[4];
  for (int t = 0; t < 4; t++) out[t] = _mm512_setzero_ps();
  const uint8_t* cp = codes + (long)s * g.nch * 256;
  for (int gi = 0; gi < g.G; gi++) {
    __m512i acc[4];
    for (int t = 0; t < 4; t++) acc[t] = _mm512_setzero_si512();
    const int c1 = a.gch[gi + 1];
    for (int c = a.gch[gi]; c < c1; c++) {
      const uint8_t* p = cp + (long)c * 256;
      const int8_t* xc = a.xq.data() + (long)c * CK;
      __m512i v[4];
      for (int t = 0; t < 4; t++) v[t] = _mm512_loadu_si512((const void*)(p + t * 64));
#pragma GCC unroll 4
      for (int f = 0; f < F; f++) {
        int32_t xw;
        std::memcpy(&xw, xc + 4 * f, 4);
        const __m512i xb = _mm512_set1_epi32(xw);
        for (int t = 0; t < 4; t++) {
          __m512i field;
          if (SB == 8) field = v[t];
          else if (f == 0) field = _mm512_and_si512(v[t], mask);
          else field = _mm512_and_si512(_mm512_srli_epi16(v[t], SB * f), mask);
          acc[t] = q8_dot<SB, VNNI>(acc[t], field, xb);
        }
      }
    }
    const long base = ((long)s * g.G + gi) * 64;
    const __m512i xs = _mm512_set1_epi32(a.xsum[gi]);
    const __m512 dx = _mm512_set1_ps(a.dx[gi]);
    for (int t = 0; t < 4; t++) {
      const __m512i z = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(zeros + base + 16 * t)));
      const __m512i d = _mm512_sub_epi32(acc[t], _mm512_mullo_epi32(z, xs));
      const __m512 sc = half ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)((const uint16_t*)scales + base + 16 * t)))
                             : _mm512_loadu_ps((const float*)scales + base + 16 * t);
      out[t] = _mm512_fmadd_ps(_mm512_mul_ps(sc, dx), _mm512_cvtepi32_ps(d), out[t]);
    }
  }
  for (int t = 0; t < 4; t++) _mm512_storeu_ps(y + (long)s * 64 + 16 * t, out[t]);
}
#endif

#if defined(__AVX2__)
// AVX2: a 64-byte tile is two 256-bit halves (8 outputs each); codes < 16 only (see q8_dot).
template <int SB>
void q8_tile_avx2(const Q8Geo& g, const uint8_t* codes, const void* scales, int half,
                  const uint8_t* zeros, const Q8Act& a, float* y, int s) {
  constexpr int F = 8 / SB;
  constexpr int CK = 4 * F;
  const __m256i mask = _mm256_set1_epi8((char)((1 << SB) - 1));
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 out[8];
  for (int t = 0; t < 8; t++) out[t] = _mm256_setzero_ps();
  const uint8_t* cp = codes + (long)s * g.nch * 256;
  for (int gi = 0; gi < g.G; gi++) {
    __m256i acc[8];
    for (int t = 0; t < 8; t++) acc[t] = _mm256_setzero_si256();
    for (int c = a.gch[gi]; c < a.gch[gi + 1]; c++) {
      const uint8_t* p = cp + (long)c * 256;
      const int8_t* xc = a.xq.data() + (long)c * CK;
      for (int f = 0; f < F; f++) {
        int32_t xw;
        std::memcpy(&xw, xc + 4 * f, 4);
        const __m256i xb = _mm256_set1_epi32(xw);
        for (int t = 0; t < 8; t++) {
          const __m256i v = _mm256_loadu_si256((const __m256i*)(p + t * 32));
          const __m256i field = f == 0 ? _mm256_and_si256(v, mask)
                                       : _mm256_and_si256(_mm256_srli_epi16(v, SB * f), mask);
          acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(_mm256_maddubs_epi16(field, xb), ones));
        }
      }
    }
    const long base = ((long)s * g.G + gi) * 64;
    const __m256i xs = _mm256_set1_epi32(a.xsum[gi]);
    const __m256 dx = _mm256_set1_ps(a.dx[gi]);
    for (int t = 0; t < 8; t++) {
      const __m256i z = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(zeros + base + 8 * t)));
      const __m256i d = _mm256_sub_epi32(acc[t], _mm256_mullo_epi32(z, xs));
      __m256 sc;
      if (half) sc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)scales + base + 8 * t)));
      else sc = _mm256_loadu_ps((const float*)scales + base + 8 * t);
      out[t] = _mm256_fmadd_ps(_mm256_mul_ps(sc, dx), _mm256_cvtepi32_ps(d), out[t]);
    }
  }
  for (int t = 0; t < 8; t++) _mm256_storeu_ps(y + (long)s * 64 + 8 * t, out[t]);
}
#endif

typedef void (*Q8Tile)(const Q8Geo&, const uint8_t*, const void*, int, const uint8_t*, const Q8Act&,
                       float*, int);

// The best tile function for this storage width that the build targets (impl 0), or the portable
// loop (impl 1); ``name`` says which.
Q8Tile q8_pick(int sb, int impl, const char** name) {
  if (impl == 0) {
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
    *name = "avx512-vnni";
    if (sb == 2) return q8_tile_avx512<2, true>;
    if (sb == 4) return q8_tile_avx512<4, true>;
    return q8_tile_avx512<8, true>;
#elif defined(__AVX512BW__)
    *name = "avx512bw";
    if (sb == 2) return q8_tile_avx512<2, false>;
    if (sb == 4) return q8_tile_avx512<4, false>;
#elif defined(__AVX2__)
    *name = "avx2";
    if (sb == 2) return q8_tile_avx2<2>;
    if (sb == 4) return q8_tile_avx2<4>;
#endif
  }
  *name = "portable";
  return q8_tile_portable;
}

thread_local Q8Act q8_act;

}  // namespace

extern "C" {

// Which inner loop eqat_q8_gemv runs for storage bits ``sb`` (0: the best the build targets,
// 1: portable): 0 portable, 1 avx2, 2 avx512bw, 3 avx512-vnni.
int eqat_q8_impl(int sb, int impl) {
  const char* name = "";
  q8_pick(sb, impl, &name);
  if (!std::strcmp(name, "avx2")) return 1;
  if (!std::strcmp(name, "avx512bw")) return 2;
  if (!std::strcmp(name, "avx512-vnni")) return 3;
  return 0;
}

// y [NP] fp32 (only the first N outputs mean anything) for one row x [K] fp32, on the layout
// above. impl: 0 the best the build has, 1 the portable loop (tests).
int eqat_q8_gemv(const uint8_t* codes, const void* scales, int scales_half, const uint8_t* zeros,
                 int K, int group, int NP, int sb, const float* x, float* y, int nthreads, int impl) {
  if (K < 1 || NP < 64 || NP % 64) return 1;
  if (!(sb == 2 || sb == 4 || sb == 8)) return 2;
  Q8Geo g;
  g.K = K;
  g.group = (group <= 0 || group > K) ? K : group;
  g.G = (K + g.group - 1) / g.group;
  g.NP = NP; g.sb = sb; g.F = 8 / sb; g.CK = 4 * g.F;
  long kp = 0;
  for (int gi = 0; gi < g.G; gi++) {
    const int lo = gi * g.group, hi = lo + g.group < K ? lo + g.group : K;
    kp += (hi - lo + 15) / 16 * 16;
  }
  g.nch = (int)(kp / g.CK);
  Q8Act& a = q8_act;
  q8_quantize(g, x, a);
  const char* name = "";
  const Q8Tile tile = q8_pick(sb, impl, &name);
  const int NS = NP / 64;
  if (nthreads < 1) nthreads = 1;
  const int per = nthreads > 1 ? (NS + 4 * nthreads - 1) / (4 * nthreads) : NS;
  const int chunks = (NS + per - 1) / per;
  pool().run(chunks, nthreads, [&](int c) {
    const int s1 = (c + 1) * per < NS ? (c + 1) * per : NS;
    for (int s = c * per; s < s1; s++) tile(g, codes, scales, scales_half, zeros, a, y, s);
  });
  return 0;
}

}  // extern "C"
