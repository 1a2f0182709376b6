// LSTM and GRU recurrences for XLA's CPU backend, as XLA FFI handlers (forward and
// backward for each; the GRU's are further down and share the product and threading).
//
// Why: with small batches and hidden sizes (char-rnn's 50 rows of 128 units) an XLA
// while loop spends most of each step on the fixed cost of a dozen small kernels (the
// recurrent product, the gate activations, the writes of the saved activations), not
// on arithmetic. Here one call runs the whole time
// loop: per step one register-blocked product h @ W_h accumulated onto the precomputed
// input projections, then the gates, written straight into the outputs. Batch rows are
// independent, so parts of them run on XLA's CPU threads without synchronising.
//
// Layout (time-major, row-major, float32): gates are [i, f, g, o] blocks of `hidden`
// columns (PyTorch's nn.LSTM order), matching lmjax/models/rnn.py. The equations:
//   h0, c0 = keep * h, keep * c          (keep = 0 where a document starts)
//   z = gx + b_h + h0 @ W_h;  i, f, o = sigmoid(z_i, z_f, z_o);  g = tanh(z_g)
//   c1 = f c0 + i g;  out = o tanh(c1);  (h, c) = (out, c1) where mask, else (h0, c0)

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// One vector register's floats. A wider vector type than the registers (16 floats on
// AVX2) compiles to pairs of registers, and the product's blocks of accumulators then no
// longer fit in the register file: every step spills to memory.
#ifdef __AVX512F__
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
// A broadcast load. (`vf{} + x` compiles to a scalar add and a register broadcast, which
// takes the shuffle port that one of the two FMA units shares, and slows the product.)
inline vf splat(float x) {
#ifdef __AVX512F__
  return reinterpret_cast<vf>(_mm512_set1_ps(x));
#elif defined(__AVX__)
  return reinterpret_cast<vf>(_mm256_set1_ps(x));
#else
  return vf{} + x;
#endif
}

inline vf recip(vf x) {
#ifdef __AVX512F__
  vf r = reinterpret_cast<vf>(_mm512_rcp14_ps(reinterpret_cast<__m512>(x)));
  return r * (splat(2.0f) - x * r);  // one Newton step: about 1 ulp
#else
  return splat(1.0f) / x;
#endif
}

// tanh on a vector as a rational function of x, p(x) / q(x) on [-7.9, 7.9] (the
// minimax coefficients Eigen and XLA's CPU backend use; a few ulps), sigmoid from it:
// no exp, one reciprocal. The ragged tail of a row uses <cmath>.
inline vf vtanh(vf x) {
  const vf bound = splat(7.90531110763549805f);
  x = x < bound ? x : bound;
  x = x > -bound ? x : -bound;
  vf x2 = x * x;
  vf p = splat(-2.76076847742355e-16f);
  p = p * x2 + splat(2.00018790482477e-13f);
  p = p * x2 + splat(-8.60467152213735e-11f);
  p = p * x2 + splat(5.12229709037114e-08f);
  p = p * x2 + splat(1.48572235717979e-05f);
  p = p * x2 + splat(6.37261928875436e-04f);
  p = p * x2 + splat(4.89352455891786e-03f);
  vf q = splat(1.19825839466702e-06f);
  q = q * x2 + splat(1.18534705686654e-04f);
  q = q * x2 + splat(2.26843463243900e-03f);
  q = q * x2 + splat(4.89352518554385e-03f);
  return x * p * recip(q);
}
inline vf vsigmoid(vf x) { return splat(0.5f) + splat(0.5f) * vtanh(splat(0.5f) * x); }
inline float ssigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// C (m x n, row stride ldc) += A (m x k, stride lda) @ B (k x n, stride ldb).
// Register blocks of MR rows x NV vectors; B's panel of NV vectors' columns stays in L1
// while every row block passes over it.
template <int MR, int NV>
inline void block(int k, const float* a, int lda, const float* b, int ldb, float* c, int ldc) {
  vf acc[MR][NV] = {};
  for (int p = 0; p < k; ++p) {
    vf bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = load(b + p * ldb + j * kLanes);
    for (int r = 0; r < MR; ++r) {
      vf av = splat(a[r * lda + p]);
      for (int j = 0; j < NV; ++j) acc[r][j] += av * bv[j];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) {
      float* out = c + r * ldc + j * kLanes;
      store(out, load(out) + acc[r][j]);
    }
}

#ifdef __AVX512F__
constexpr int kMaxRows = 6;  // 6 x 4 accumulators + 4 panel vectors fit 32 registers
#else
constexpr int kMaxRows = 3;  // of 16 registers (AVX2)
#endif

template <int NV>
void row_blocks(int m, int k, const float* a, int lda, const float* b, int ldb, float* c,
                int ldc) {
  // Even block heights (25 rows: five blocks of 5, not four of 6 and one of 1).
  int blocks = (m + kMaxRows - 1) / kMaxRows;
  for (int r = 0, left = blocks; r < m; --left) {
    int rows = (m - r + left - 1) / left;
    const float* ar = a + size_t(r) * lda;
    float* cr = c + size_t(r) * ldc;
    switch (rows) {
      case 1: block<1, NV>(k, ar, lda, b, ldb, cr, ldc); break;
      case 2: block<2, NV>(k, ar, lda, b, ldb, cr, ldc); break;
      case 3: block<3, NV>(k, ar, lda, b, ldb, cr, ldc); break;
#ifdef __AVX512F__
      case 4: block<4, NV>(k, ar, lda, b, ldb, cr, ldc); break;
      case 5: block<5, NV>(k, ar, lda, b, ldb, cr, ldc); break;
      case 6: block<6, NV>(k, ar, lda, b, ldb, cr, ldc); break;
#endif
    }
    r += rows;
  }
}

// B (k x n, row stride ldb) copied into panels of up to kPanelRows rows x kPanelCols
// columns (4 vectors), each contiguous and L1-sized, for the columns in whole panels. Read in
// place, B's rows (2 KB apart for n = 512) fall in a few L1 sets and evict each other, so
// every row block would fetch its panel from L2 again.
// With `transposed`, `b` holds B's transpose (n x k, row stride ldb): the backward kernels
// get W_h for B = W_h^T and pack it in that order, which saves XLA's transpose of W_h
// before each call.
constexpr int kPanelCols = 4 * kLanes, kPanelRows = 128;

struct Panels {
  int k, n, ldb, full;  // full: the columns packed (a multiple of kPanelCols)
  const float* b;       // B (k x n, row stride ldb), for the columns past `full`
  std::vector<float> data, b_copy;  // b_copy: B, for those columns, given its transpose

  Panels(int k, int n, const float* b, int ldb, bool transposed = false)
      : k(k), n(n), ldb(ldb), full(n / kPanelCols * kPanelCols), b(b), data(size_t(k) * full) {
    for (int k0 = 0; k0 < k; k0 += kPanelRows)
      for (int col = 0; col < full; col += kPanelCols) {
        float* out = data.data() + offset(k0, col);
        const int kc = std::min(kPanelRows, k - k0);
        if (transposed)
          for (int j = 0; j < kPanelCols; ++j)
            for (int p = 0; p < kc; ++p)
              out[p * kPanelCols + j] = b[size_t(col + j) * ldb + k0 + p];
        else
          for (int p = 0; p < kc; ++p)
            std::copy(b + size_t(k0 + p) * ldb + col, b + size_t(k0 + p) * ldb + col + kPanelCols,
                      out + p * kPanelCols);
      }
    if (transposed && full < n) {
      b_copy.resize(size_t(k) * n);
      for (int p = 0; p < k; ++p)
        for (int col = full; col < n; ++col) b_copy[size_t(p) * n + col] = b[size_t(col) * ldb + p];
      this->b = b_copy.data(), this->ldb = n;
    }
  }
  // The panel of rows k0.. and columns col..col + 63 (k0 a multiple of kPanelRows).
  const float* panel(int k0, int col) const { return data.data() + offset(k0, col); }
  size_t offset(int k0, int col) const {
    return size_t(k0) * full + size_t(col) * std::min(kPanelRows, k - k0);
  }
};

// C (m x n, row stride ldc) += A (m x k, stride lda) @ B.
void gemm_acc(int m, const Panels& b, const float* a, int lda, float* c, int ldc) {
  for (int k0 = 0; k0 < b.k; k0 += kPanelRows) {
    const int kc = std::min(kPanelRows, b.k - k0);
    for (int col = 0; col < b.full; col += kPanelCols)
      row_blocks<4>(m, kc, a + k0, lda, b.panel(k0, col), kPanelCols, c + col, ldc);
  }
  int col = b.full;
  for (; col + kLanes <= b.n; col += kLanes)
    row_blocks<1>(m, b.k, a, lda, b.b + col, b.ldb, c + col, ldc);
  for (; col < b.n; ++col)  // columns past the last whole vector
    for (int r = 0; r < m; ++r) {
      float s = 0.0f;
      for (int p = 0; p < b.k; ++p) s += a[r * lda + p] * b.b[p * b.ldb + col];
      c[r * ldc + col] += s;
    }
}

constexpr int kSpinMicros = 100;  // how long parallel_rows' caller spins before it sleeps

// How many parts `rows` rows go in: one per thread, of at least `min_rows` rows. For the
// recurrences (batch rows, at least 4 each): each step a part streams all of W_h's panels
// through L1 once, so the fewer the parts, the more rows each panel serves while it is
// there.
int num_parts(int rows, int threads, int min_rows) {
  return std::max(1, std::min(std::max(1, threads), rows / min_rows));
}

// Runs fn(row_begin, row_end) over rows split into contiguous parts (num_parts).
// The parts go to XLA's own CPU thread pool (whose idle threads would otherwise spin
// beside ours) and to the calling thread, each taking the next unclaimed part; nobody
// waits for a part nobody has started, so a pool thread busy with another XLA op joins
// when it is free and never stalls the call.
template <typename F>
void parallel_rows(ffi::ThreadPool& pool, int rows, F fn, int min_rows = 4) {
  const int parts = num_parts(rows, int(pool.num_threads()), min_rows);
  const int helpers = std::min(int(pool.num_threads()), parts - 1);
  if (helpers <= 0) return fn(0, rows);
  struct Shared {
    std::atomic<int> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, parts, rows, fn] {
    int p;
    while ((p = shared->next.fetch_add(1)) < parts) {
      fn(rows * p / parts, rows * (p + 1) / parts);
      if (shared->done.fetch_add(1) + 1 == parts) {
        std::lock_guard<std::mutex> lock(shared->mu);
        shared->cv.notify_all();
      }
    }
  };
  for (int p = 0; p < helpers; ++p) pool.Schedule(decltype(work)(work));
  work();
  // Spin briefly before sleeping: the parts are even, so the others are usually about to
  // finish, and waking a sleeping thread costs more than the spin.
  const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
  while (shared->done.load() != parts && std::chrono::steady_clock::now() < until) _mm_pause();
  if (shared->done.load() == parts) return;
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done.load() == parts; });
}

struct Dims {
  int time, batch, hidden;
  int gates() const { return 4 * hidden; }
};

// Time index of the s-th step in the direction of the recurrence.
inline int at(int s, int time, bool reverse) { return reverse ? time - 1 - s : s; }

struct Forward {
  Dims d;
  bool reverse, save;
  const Panels& w;
  const float *gx, *bias, *h_init, *c_init, *keep, *mask;
  float *outs, *h_last, *c_last, *acts, *h_starts, *c_starts, *tanh_c;

  // Each step starts from (h0, c0) = keep * the carry, written by the step before (by this
  // call for the first) straight into the saved h_starts / c_starts, or without `save` into
  // one of two buffers in turn.
  void rows(int r0, int r1) const {
    const int H = d.hidden, G = d.gates(), B = d.batch, m = r1 - r0;
    std::vector<float> z(m * G), local(save ? 0 : 4 * m * H);
    auto starts = [&](int s) {  // (h0, c0) of the s-th step, rows r0..r1
      const int t = at(s, d.time, reverse);
      const size_t at_t = (size_t(t) * B + r0) * H;
      if (save) return std::pair{h_starts + at_t, c_starts + at_t};
      float* buffer = local.data() + (s % 2) * 2 * m * H;
      return std::pair{buffer, buffer + m * H};
    };
    {
      auto [h0, c0] = starts(0);
      const int t = at(0, d.time, reverse);
      for (int r = 0; r < m; ++r) {
        const float k = keep[t * B + r0 + r];
        for (int j = 0; j < H; ++j) {
          h0[r * H + j] = k * h_init[(r0 + r) * H + j];
          c0[r * H + j] = k * c_init[(r0 + r) * H + j];
        }
      }
    }
    for (int s = 0; s < d.time; ++s) {
      const int t = at(s, d.time, reverse);
      for (int r = 0; r < m; ++r) {
        const float* g = gx + (size_t(t) * B + r0 + r) * G;
        for (int j = 0; j < G; ++j) z[r * G + j] = g[j] + bias[j];
      }
      auto [h0, c0] = starts(s);
      gemm_acc(m, w, h0, H, z.data(), G);
      const bool last = s + 1 == d.time;
      auto [h1, c1] = last ? std::pair{h_last + r0 * H, c_last + r0 * H} : starts(s + 1);
      const float* k1 = last ? nullptr : keep + size_t(at(s + 1, d.time, reverse)) * B + r0;
      for (int r = 0; r < m; ++r)
        cell(t, r0 + r, z.data() + r * G, h0 + r * H, c0 + r * H, k1 ? k1[r] : 1.0f,
             h1 + r * H, c1 + r * H);
    }
  }

  // One row of one step: z (gates) and the carry it started from (h0, c0) -> outputs,
  // residuals and the next step's start (h1, c1) = k1 * the new carry.
  void cell(int t, int row, const float* z, const float* h0, const float* c0, float k1,
            float* h1, float* c1) const {
    const int H = d.hidden;
    const size_t idx = size_t(t) * d.batch + row;
    const bool take = mask == nullptr || mask[idx] != 0.0f;
    float* out = outs + idx * H;
    float* tc = save ? tanh_c + idx * H : nullptr;
    float* a = save ? acts + idx * 4 * H : nullptr;  // the activated gates
    const vf kv = splat(k1);
    int j = 0;
    for (; j + kLanes <= H; j += kLanes) {
      vf i = vsigmoid(load(z + j)), f = vsigmoid(load(z + H + j));
      vf g = vtanh(load(z + 2 * H + j)), o = vsigmoid(load(z + 3 * H + j));
      vf c = f * load(c0 + j) + i * g, th = vtanh(c), h = o * th;
      if (a) {
        store(a + j, i), store(a + H + j, f);
        store(a + 2 * H + j, g), store(a + 3 * H + j, o);
      }
      store(out + j, h);
      if (tc) store(tc + j, th);
      store(h1 + j, kv * (take ? h : load(h0 + j)));
      store(c1 + j, kv * (take ? c : load(c0 + j)));
    }
    for (; j < H; ++j) {
      float i = ssigmoid(z[j]), f = ssigmoid(z[H + j]), g = std::tanh(z[2 * H + j]);
      float o = ssigmoid(z[3 * H + j]);
      float c = f * c0[j] + i * g, th = std::tanh(c), h = o * th;
      if (a) a[j] = i, a[H + j] = f, a[2 * H + j] = g, a[3 * H + j] = o;
      out[j] = h;
      if (tc) tc[j] = th;
      h1[j] = k1 * (take ? h : h0[j]);
      c1[j] = k1 * (take ? c : c0[j]);
    }
  }
};

struct Backward {
  Dims d;
  bool reverse;
  const Panels& w_t;
  const float *acts, *c_starts, *tanh_c, *keep, *mask, *d_outs, *dh_last, *dc_last;
  float *dz, *dh_init, *dc_init;

  // (dh, dc) hold the gradient reaching the start carry (h0, c0) of the step after the
  // current one (before its keep multiply, which the cell applies as it reads them); each
  // step the cell overwrites them with its own, in place, and the product adds dz @ W_h^T.
  void rows(int r0, int r1) const {
    const int H = d.hidden, G = d.gates(), B = d.batch, m = r1 - r0;
    std::vector<float> dh(dh_last + r0 * H, dh_last + r1 * H);
    std::vector<float> dc(dc_last + r0 * H, dc_last + r1 * H);
    const float* k_after = nullptr;  // keep of the step after; none after the last
    for (int s = d.time - 1; s >= 0; --s) {  // the forward steps, last first
      const int t = at(s, d.time, reverse);
      for (int r = 0; r < m; ++r)
        cell(t, r0 + r, k_after ? k_after[r] : 1.0f, dh.data() + r * H, dc.data() + r * H);
      gemm_acc(m, w_t, dz + (size_t(t) * B + r0) * G, G, dh.data(), H);
      k_after = keep + size_t(t) * B + r0;
    }
    for (int r = 0; r < m; ++r) {
      const float k = k_after ? k_after[r] : 1.0f;
      for (int j = 0; j < H; ++j) {
        dh_init[(r0 + r) * H + j] = k * dh[r * H + j];
        dc_init[(r0 + r) * H + j] = k * dc[r * H + j];
      }
    }
  }

  // One row of one step: (k dh, k dc) flowing into the step's new carry -> dz, and in
  // (dh, dc) the gradients reaching h0 and c0 other than through h0 @ W_h.
  void cell(int t, int row, float k, float* dh, float* dc) const {
    const size_t idx = size_t(t) * d.batch + row;
    if (mask == nullptr || mask[idx] != 0.0f)
      cell_step<true>(idx, k, dh, dc);
    else  // padding kept the old carry, so its gradient passes straight through
      cell_step<false>(idx, k, dh, dc);
  }

  template <bool take, typename V>
  static inline void grads(V dh, V dc, V d_out, V i, V f, V g, V o, V c0, V tc, V& zi, V& zf,
                           V& zg, V& zo, V& ph, V& pc) {
    V one = V{} + 1.0f, zero = V{};
    V dh1 = (take ? dh : zero) + d_out, dc1 = take ? dc : zero;
    V dcc = dc1 + dh1 * o * (one - tc * tc);
    zi = dcc * g * i * (one - i);
    zf = dcc * c0 * f * (one - f);
    zg = dcc * i * (one - g * g);
    zo = dh1 * tc * o * (one - o);
    ph = take ? zero : dh;
    pc = dcc * f + (take ? zero : dc);
  }

  template <bool take>
  void cell_step(size_t idx, float k, float* dh, float* dc) const {
    const int H = d.hidden;
    const vf kv = splat(k);
    const float* a = acts + idx * 4 * H;
    const float* c0 = c_starts + idx * H;
    const float* tc = tanh_c + idx * H;
    const float* d_out = d_outs + idx * H;
    float* z = dz + idx * 4 * H;
    int j = 0;
    for (; j + kLanes <= H; j += kLanes) {
      vf zi, zf, zg, zo, ph, pc;
      grads<take>(kv * load(dh + j), kv * load(dc + j), load(d_out + j), load(a + j),
                  load(a + H + j), load(a + 2 * H + j), load(a + 3 * H + j), load(c0 + j),
                  load(tc + j), zi, zf, zg, zo, ph, pc);
      store(z + j, zi), store(z + H + j, zf), store(z + 2 * H + j, zg);
      store(z + 3 * H + j, zo), store(dh + j, ph), store(dc + j, pc);
    }
    for (; j < H; ++j)
      grads<take>(k * dh[j], k * dc[j], d_out[j], a[j], a[H + j], a[2 * H + j], a[3 * H + j],
                  c0[j], tc[j], z[j], z[H + j], z[2 * H + j], z[3 * H + j], dh[j], dc[j]);
  }
};

// The GRU (PyTorch's nn.GRU, gates [r, z, n]), on the same loop and product:
//   h0 = keep * h;  gh = b_h + h0 @ W_h;  r = sigmoid(gx_r + gh_r);  z = sigmoid(gx_z + gh_z)
//   n = tanh(gx_n + r gh_n);  out = (1 - z) n + z h0;  h = out where mask, else h0
// Residuals per step: [r, z, n, gh_n] (4 hidden) and h0.
struct GruForwardPass {
  Dims d;
  bool reverse, save;
  const Panels& w;
  const float *gx, *bias, *h_init, *keep, *mask;
  float *outs, *h_last, *acts, *h_starts;

  void rows(int r0, int r1) const {
    const int H = d.hidden, G = 3 * H, B = d.batch, m = r1 - r0;
    std::vector<float> gh(m * G), h0(m * H);
    std::copy(h_init + r0 * H, h_init + r1 * H, h0.begin());
    for (int s = 0; s < d.time; ++s) {
      const int t = at(s, d.time, reverse);
      for (int r = 0; r < m; ++r) {
        const float k = keep[t * B + r0 + r];
        for (int j = 0; j < H; ++j) h0[r * H + j] *= k;
        std::copy(bias, bias + G, gh.begin() + r * G);
      }
      if (save) std::copy(h0.begin(), h0.end(), h_starts + (size_t(t) * B + r0) * H);
      gemm_acc(m, w, h0.data(), H, gh.data(), G);
      for (int r = 0; r < m; ++r) cell(t, r0 + r, gh.data() + r * G, h0.data() + r * H);
    }
    std::copy(h0.begin(), h0.end(), h_last + r0 * H);
  }

  template <typename V, typename Sigmoid, typename Tanh>
  static inline V step(V xr, V xz, V xn, V ghr, V ghz, V ghn, V h, V& r, V& z, V& n,
                       Sigmoid sigmoid, Tanh tanh) {
    r = sigmoid(xr + ghr);
    z = sigmoid(xz + ghz);
    n = tanh(xn + r * ghn);
    return (V{} + 1.0f - z) * n + z * h;
  }

  void cell(int t, int row, const float* gh, float* h) const {
    const int H = d.hidden;
    const size_t idx = size_t(t) * d.batch + row;
    const bool take = mask == nullptr || mask[idx] != 0.0f;
    const float* x = gx + idx * 3 * H;
    float* out = outs + idx * H;
    float* a = save ? acts + idx * 4 * H : nullptr;
    int j = 0;
    for (; j + kLanes <= H; j += kLanes) {
      vf r, z, n, ghn = load(gh + 2 * H + j);
      vf h1 = step(load(x + j), load(x + H + j), load(x + 2 * H + j), load(gh + j),
                   load(gh + H + j), ghn, load(h + j), r, z, n, vsigmoid, vtanh);
      store(out + j, h1);
      if (a) {
        store(a + j, r), store(a + H + j, z);
        store(a + 2 * H + j, n), store(a + 3 * H + j, ghn);
      }
      if (take) store(h + j, h1);
    }
    for (; j < H; ++j) {
      float r, z, n, ghn = gh[2 * H + j];
      float h1 = step(x[j], x[H + j], x[2 * H + j], gh[j], gh[H + j], ghn, h[j], r, z, n,
                      ssigmoid, [](float v) { return std::tanh(v); });
      out[j] = h1;
      if (a) a[j] = r, a[H + j] = z, a[2 * H + j] = n, a[3 * H + j] = ghn;
      if (take) h[j] = h1;
    }
  }
};

struct GruBackwardPass {
  Dims d;
  bool reverse;
  const Panels& w_t;
  const float *acts, *h_starts, *keep, *mask, *d_outs, *dh_last;
  float *d_gx, *d_gh, *dh_init;

  void rows(int r0, int r1) const {
    const int H = d.hidden, G = 3 * H, m = r1 - r0;
    std::vector<float> dh(m * H), pass(m * H);
    std::copy(dh_last + r0 * H, dh_last + r1 * H, dh.begin());
    for (int s = d.time - 1; s >= 0; --s) {  // the forward steps, last first
      const int t = at(s, d.time, reverse);
      for (int r = 0; r < m; ++r) cell(t, r0 + r, dh.data() + r * H, pass.data() + r * H);
      // dh0 = (d_gh @ W_h^T + passed dh) * keep
      gemm_acc(m, w_t, d_gh + (size_t(t) * d.batch + r0) * G, G, pass.data(), H);
      for (int r = 0; r < m; ++r) {
        const float k = keep[t * d.batch + r0 + r];
        for (int j = 0; j < H; ++j) dh[r * H + j] = pass[r * H + j] * k;
      }
    }
    std::copy(dh.begin(), dh.end(), dh_init + r0 * H);
  }

  // dh flowing into the step's new carry -> the gradients of the pre-activations (d_gx:
  // [r, z, n]; d_gh: the same with r * d n for n) and, in pass, that reaching h0 other
  // than through h0 @ W_h.
  template <bool take, typename V>
  static inline void grads(V dh, V d_out, V r, V z, V n, V ghn, V h0, V& gr, V& gz, V& gn,
                           V& hn, V& pass) {
    V one = V{} + 1.0f, zero = V{};
    V dh1 = (take ? dh : zero) + d_out;
    gn = dh1 * (one - z) * (one - n * n);
    gz = dh1 * (h0 - n) * z * (one - z);
    gr = gn * ghn * r * (one - r);
    hn = gn * r;
    pass = dh1 * z + (take ? zero : dh);
  }

  void cell(int t, int row, const float* dh, float* pass) const {
    const size_t idx = size_t(t) * d.batch + row;
    if (mask == nullptr || mask[idx] != 0.0f)
      cell_step<true>(idx, dh, pass);
    else  // padding kept the old carry, so its gradient passes straight through
      cell_step<false>(idx, dh, pass);
  }

  template <bool take>
  void cell_step(size_t idx, const float* dh, float* pass) const {
    const int H = d.hidden;
    const float* a = acts + idx * 4 * H;
    const float* h0 = h_starts + idx * H;
    const float* d_out = d_outs + idx * H;
    float* gx = d_gx + idx * 3 * H;
    float* gh = d_gh + idx * 3 * H;
    int j = 0;
    for (; j + kLanes <= H; j += kLanes) {
      vf gr, gz, gn, hn, ps;
      grads<take>(load(dh + j), load(d_out + j), load(a + j), load(a + H + j),
                  load(a + 2 * H + j), load(a + 3 * H + j), load(h0 + j), gr, gz, gn, hn, ps);
      store(gx + j, gr), store(gx + H + j, gz), store(gx + 2 * H + j, gn);
      store(gh + j, gr), store(gh + H + j, gz), store(gh + 2 * H + j, hn);
      store(pass + j, ps);
    }
    for (; j < H; ++j) {
      float gr, gz, gn, hn;
      grads<take>(dh[j], d_out[j], a[j], a[H + j], a[2 * H + j], a[3 * H + j], h0[j], gr, gz,
                  gn, hn, pass[j]);
      gx[j] = gr, gx[H + j] = gz, gx[2 * H + j] = gn;
      gh[j] = gr, gh[H + j] = gz, gh[2 * H + j] = hn;
    }
  }
};

const float* optional(ffi::Buffer<ffi::F32>& b) {
  return b.element_count() == 0 ? nullptr : b.typed_data();
}

ffi::Error LstmForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> gx, ffi::Buffer<ffi::F32> w,
                           ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> h_init,
                           ffi::Buffer<ffi::F32> c_init, ffi::Buffer<ffi::F32> keep,
                           ffi::Buffer<ffi::F32> mask, bool reverse,
                           bool save, ffi::ResultBuffer<ffi::F32> outs,
                           ffi::ResultBuffer<ffi::F32> h_last,
                           ffi::ResultBuffer<ffi::F32> c_last, ffi::ResultBuffer<ffi::F32> acts,
                           ffi::ResultBuffer<ffi::F32> h_starts,
                           ffi::ResultBuffer<ffi::F32> c_starts,
                           ffi::ResultBuffer<ffi::F32> tanh_c) {
  auto dims = gx.dimensions();
  if (dims.size() != 3 || dims[2] % 4 != 0)
    return ffi::Error::InvalidArgument("gx must be (time, batch, 4 hidden)");
  Dims d{int(dims[0]), int(dims[1]), int(dims[2] / 4)};
  if (w.element_count() != size_t(d.hidden) * d.gates() ||
      h_init.element_count() != size_t(d.batch) * d.hidden ||
      keep.element_count() != size_t(d.time) * d.batch)
    return ffi::Error::InvalidArgument("LSTM kernel: inconsistent operand shapes");
  const Panels panels(d.hidden, d.gates(), w.typed_data(), d.gates());
  Forward f{d, reverse, save, panels, gx.typed_data(), bias.typed_data(),
            h_init.typed_data(), c_init.typed_data(), keep.typed_data(), optional(mask),
            outs->typed_data(), h_last->typed_data(), c_last->typed_data(),
            acts->typed_data(), h_starts->typed_data(), c_starts->typed_data(),
            tanh_c->typed_data()};
  parallel_rows(pool, d.batch, [&f](int r0, int r1) { f.rows(r0, r1); });
  return ffi::Error::Success();
}

ffi::Error LstmBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> acts, ffi::Buffer<ffi::F32> c_starts,
                            ffi::Buffer<ffi::F32> tanh_c, ffi::Buffer<ffi::F32> keep,
                            ffi::Buffer<ffi::F32> mask, ffi::Buffer<ffi::F32> d_outs,
                            ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> dh_last,
                            ffi::Buffer<ffi::F32> dc_last, bool reverse,
                            ffi::ResultBuffer<ffi::F32> dz, ffi::ResultBuffer<ffi::F32> dh_init,
                            ffi::ResultBuffer<ffi::F32> dc_init) {
  auto dims = d_outs.dimensions();
  if (dims.size() != 3) return ffi::Error::InvalidArgument("d_outs must be (time, batch, hidden)");
  Dims d{int(dims[0]), int(dims[1]), int(dims[2])};
  if (acts.element_count() != size_t(d.time) * d.batch * d.gates() ||
      w.element_count() != size_t(d.hidden) * d.gates())
    return ffi::Error::InvalidArgument("LSTM kernel: inconsistent operand shapes");
  const Panels panels(d.gates(), d.hidden, w.typed_data(), d.gates(), true);  // W_h^T
  Backward b{d, reverse, panels, acts.typed_data(), c_starts.typed_data(), tanh_c.typed_data(),
             keep.typed_data(), optional(mask), d_outs.typed_data(),
             dh_last.typed_data(), dc_last.typed_data(), dz->typed_data(),
             dh_init->typed_data(), dc_init->typed_data()};
  parallel_rows(pool, d.batch, [&b](int r0, int r1) { b.rows(r0, r1); });
  return ffi::Error::Success();
}

ffi::Error GruForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> gx, ffi::Buffer<ffi::F32> w,
                          ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> h_init,
                          ffi::Buffer<ffi::F32> keep, ffi::Buffer<ffi::F32> mask, bool reverse,
                          bool save, ffi::ResultBuffer<ffi::F32> outs,
                          ffi::ResultBuffer<ffi::F32> h_last, ffi::ResultBuffer<ffi::F32> acts,
                          ffi::ResultBuffer<ffi::F32> h_starts) {
  auto dims = gx.dimensions();
  if (dims.size() != 3 || dims[2] % 3 != 0)
    return ffi::Error::InvalidArgument("gx must be (time, batch, 3 hidden)");
  Dims d{int(dims[0]), int(dims[1]), int(dims[2] / 3)};
  if (w.element_count() != size_t(d.hidden) * 3 * d.hidden ||
      h_init.element_count() != size_t(d.batch) * d.hidden ||
      keep.element_count() != size_t(d.time) * d.batch)
    return ffi::Error::InvalidArgument("GRU kernel: inconsistent operand shapes");
  const Panels panels(d.hidden, 3 * d.hidden, w.typed_data(), 3 * d.hidden);
  GruForwardPass f{d, reverse, save, panels, gx.typed_data(), bias.typed_data(),
                   h_init.typed_data(), keep.typed_data(), optional(mask), outs->typed_data(),
                   h_last->typed_data(), acts->typed_data(), h_starts->typed_data()};
  parallel_rows(pool, d.batch, [&f](int r0, int r1) { f.rows(r0, r1); });
  return ffi::Error::Success();
}

ffi::Error GruBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> acts,
                           ffi::Buffer<ffi::F32> h_starts, ffi::Buffer<ffi::F32> keep,
                           ffi::Buffer<ffi::F32> mask, ffi::Buffer<ffi::F32> d_outs,
                           ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> dh_last, bool reverse,
                           ffi::ResultBuffer<ffi::F32> d_gx, ffi::ResultBuffer<ffi::F32> d_gh,
                           ffi::ResultBuffer<ffi::F32> dh_init) {
  auto dims = d_outs.dimensions();
  if (dims.size() != 3) return ffi::Error::InvalidArgument("d_outs must be (time, batch, hidden)");
  Dims d{int(dims[0]), int(dims[1]), int(dims[2])};
  if (acts.element_count() != size_t(d.time) * d.batch * 4 * d.hidden ||
      w.element_count() != size_t(d.hidden) * 3 * d.hidden)
    return ffi::Error::InvalidArgument("GRU kernel: inconsistent operand shapes");
  const Panels panels(3 * d.hidden, d.hidden, w.typed_data(), 3 * d.hidden, true);  // W_h^T
  GruBackwardPass b{d, reverse, panels, acts.typed_data(), h_starts.typed_data(),
                    keep.typed_data(), optional(mask), d_outs.typed_data(), dh_last.typed_data(),
                    d_gx->typed_data(), d_gh->typed_data(), dh_init->typed_data()};
  parallel_rows(pool, d.batch, [&b](int r0, int r1) { b.rows(r0, r1); });
  return ffi::Error::Success();
}

// The handlers' signatures: N float32 operands or results added to a binding. (A binding
// moves only through prvalues: its constructors are private, so each step returns the next.)
enum class Buffers { kOperands, kResults };

template <Buffers kind, int N, typename B>
auto F32(B&& binding) {
  auto next = [&] {
    if constexpr (kind == Buffers::kResults) {
      return std::move(binding).template Ret<ffi::Buffer<ffi::F32>>();
    } else {
      return std::move(binding).template Arg<ffi::Buffer<ffi::F32>>();
    }
  };
  if constexpr (N == 1) {
    return next();
  } else {
    return F32<kind, N - 1>(next());
  }
}

template <int N, typename B>
auto Operands(B&& binding) {
  return F32<Buffers::kOperands, N>(std::forward<B>(binding));
}

template <int N, typename B>
auto Results(B&& binding) {
  return F32<Buffers::kResults, N>(std::forward<B>(binding));
}

auto Pool() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmForward, LstmForwardImpl,
                              Results<7>(Operands<7>(Pool()).Attr<bool>("reverse").Attr<bool>("save")));
XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmBackward, LstmBackwardImpl,
                              Results<3>(Operands<9>(Pool()).Attr<bool>("reverse")));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GruForward, GruForwardImpl,
                              Results<4>(Operands<6>(Pool()).Attr<bool>("reverse").Attr<bool>("save")));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GruBackward, GruBackwardImpl,
                              Results<3>(Operands<7>(Pool()).Attr<bool>("reverse")));
