// Fused fake quantization for Block-AP training on the CPU (eqat_cli/quant/fused_quant.py):
// one pass forward, one pass backward, over row-major [rows, cols] fp32 weights with per-group
// step sizes s and integer-valued zero points z ([rows, G], G = ceil(cols / group); the last
// group of a row may be shorter). Built with g++ on first use and called through ctypes.
//
//   x = w / s (+ v)         v: the learned rounding offsets (mode ROUND) or none (mode FREE)
//   c = round_half_even(x) + z,  inr = 0 <= c <= m,  q = clamp(c, 0, m)
//   out = (q - z) * s
//
// The forward is the same IEEE operations, in the same order, as the torch reference, so its
// output is bit-identical. The backward recomputes q and inr from the saved inputs (nothing of
// the weight's size is kept between the passes) and writes the element gradients with the
// reference's formulas (also bit-identical); only the per-group sums run in another order.
//
//   ROUND (quant/rounding.py _GroupedRoundQuant):  dv = g s inr,
//     ds = sum(g (q - z)) - sum(dv w) / (s s),  dz = sum(dv - g s)
//   FREE (autograd through quant/primitives.py fake_quantize):  p = (g s) inr,  dw = p / s,
//     ds = sum(g (q - z)) + sum(-p ((w / s) / s)),  dz = sum(p) + sum(-(g s))
//
// Threads: rows are split into chunks claimed from an atomic counter by the calling thread and
// nthreads - 1 helpers started per call (a call is milliseconds of work; a start is microseconds).
// Compile without -ffast-math / FP contraction: the results must follow IEEE order exactly.

#include <atomic>
#include <cmath>
#include <thread>
#include <vector>

namespace {

constexpr int LANES = 16;
constexpr long ROWS_PER_CHUNK = 16;

template <class F>
void parallel_rows(long rows, int nthreads, F&& body) {
  const long chunks = (rows + ROWS_PER_CHUNK - 1) / ROWS_PER_CHUNK;
  std::atomic<long> next{0};
  auto work = [&] {
    for (;;) {
      const long c = next.fetch_add(1);
      if (c >= chunks) return;
      const long r1 = (c + 1) * ROWS_PER_CHUNK < rows ? (c + 1) * ROWS_PER_CHUNK : rows;
      for (long r = c * ROWS_PER_CHUNK; r < r1; r++) body(r);
    }
  };
  if (nthreads > chunks) nthreads = (int)chunks;
  std::vector<std::thread> helpers;
  for (int t = 1; t < nthreads; t++) helpers.emplace_back(work);
  work();
  for (auto& h : helpers) h.join();
}

// One group of one row: the forward (V: offsets present) ...
template <bool V>
inline void forward_group(const float* w, const float* v, float* o, long n, float s, float z, float m) {
  for (long j = 0; j < n; j++) {
    float x = w[j] / s;
    if (V) x = x + v[j];
    float c = std::nearbyint(x) + z;
    c = c < 0.f ? 0.f : (c > m ? m : c);
    o[j] = (c - z) * s;
  }
}

// ... and the backward (ROUND: offsets' gradient into d, else the weights'); the sums go to t[4].
template <bool ROUND>
inline void backward_lane(const float* g, const float* w, const float* v, float* d, long j, float s, float z,
                          float m, float* a1, float* a2, float* a3, float* a4) {
  const float wv = w[j];
  float x = wv / s;
  if (ROUND) x = x + v[j];
  const float c = std::nearbyint(x) + z;
  const float inr = (c >= 0.f && c <= m) ? 1.f : 0.f;
  const float q = c < 0.f ? 0.f : (c > m ? m : c);
  const float gv = g[j];
  const float gs = gv * s;
  const float p = gs * inr;
  *a1 += gv * (q - z);
  if (ROUND) {
    d[j] = p;
    *a2 += p * wv;
    *a3 += p - gs;
  } else {
    d[j] = p / s;
    *a2 += -p * ((wv / s) / s);
    *a3 += p;
    *a4 += -gs;
  }
}

template <bool ROUND>
void backward_row(const float* g, const float* w, const float* v, float* d, const float* s, const float* z,
                  float* ds, float* dz, long cols, long group, long G, float m) {
  for (long k = 0; k < G; k++) {
    const float sv = s[k], zv = z[k];
    const long j0 = k * group, j1 = j0 + group < cols ? j0 + group : cols;
    // Lanes of partial sums: the compiler turns the fixed inner loop into vector code.
    float a1[LANES] = {0}, a2[LANES] = {0}, a3[LANES] = {0}, a4[LANES] = {0};
    long j = j0;
    for (; j + LANES <= j1; j += LANES)
      for (int l = 0; l < LANES; l++)
        backward_lane<ROUND>(g, w, v, d, j + l, sv, zv, m, &a1[l], &a2[l], &a3[l], &a4[l]);
    for (; j < j1; j++) backward_lane<ROUND>(g, w, v, d, j, sv, zv, m, &a1[0], &a2[0], &a3[0], &a4[0]);
    float t1 = 0.f, t2 = 0.f, t3 = 0.f, t4 = 0.f;
    for (int l = 0; l < LANES; l++) {
      t1 += a1[l];
      t2 += a2[l];
      t3 += a3[l];
      t4 += a4[l];
    }
    if (ROUND) {
      ds[k] = t1 - t2 / (sv * sv);
      dz[k] = t3;
    } else {
      ds[k] = t1 + t2;
      dz[k] = t3 + t4;
    }
  }
}

}  // namespace

extern "C" {

int eqat_fq_abi_version() { return 1; }

// out = fake_quant(w (+ v)); v may be null (FREE).
int eqat_fq_forward(const float* w, const float* v, const float* s, const float* z, float* out,
                    long rows, long cols, long group, float m, int nthreads) {
  if (rows <= 0 || cols <= 0 || group <= 0) return 1;
  const long G = (cols + group - 1) / group;
  parallel_rows(rows, nthreads, [&](long r) {
    for (long k = 0; k < G; k++) {
      const long j0 = k * group, n = (j0 + group < cols ? j0 + group : cols) - j0;
      const long i = r * cols + j0;
      if (v)
        forward_group<true>(w + i, v + i, out + i, n, s[r * G + k], z[r * G + k], m);
      else
        forward_group<false>(w + i, nullptr, out + i, n, s[r * G + k], z[r * G + k], m);
    }
  });
  return 0;
}

// mode 0: ROUND (v given; dw is the offsets' gradient); mode 1: FREE (dw is the weights').
int eqat_fq_backward(const float* gout, const float* w, const float* v, const float* s, const float* z,
                     float* dw, float* ds, float* dz, long rows, long cols, long group, float m,
                     int mode, int nthreads) {
  if (rows <= 0 || cols <= 0 || group <= 0 || mode < 0 || mode > 1 || (mode == 0 && !v)) return 1;
  const long G = (cols + group - 1) / group;
  parallel_rows(rows, nthreads, [&](long r) {
    const long i = r * cols;
    if (mode == 0)
      backward_row<true>(gout + i, w + i, v + i, dw + i, s + r * G, z + r * G, ds + r * G, dz + r * G, cols,
                         group, G, m);
    else
      backward_row<false>(gout + i, w + i, nullptr, dw + i, s + r * G, z + r * G, ds + r * G, dz + r * G,
                          cols, group, G, m);
  });
  return 0;
}

}  // extern "C"
