// LSTM and GRU recurrences for XLA's CPU backend, as XLA FFI handlers (forward and
// backward for each; the GRU's are further down and share the product and threading),
// the sums over all timesteps that give their weight, bias and lookup-table gradients
// (GradientSums), and the output layer with its softmax cross-entropy (SoftmaxXent*,
// at the end).
//
// Why: at char-rnn's size (batch 50, hidden 128) an XLA while loop spends most of each
// step on the fixed cost of a dozen small kernels (the recurrent product, the gate
// activations, the writes of the saved activations). Here one call runs the whole time
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
// takes the shuffle port one of the two FMA units shares: the product ran at two thirds
// of its speed with it.)
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

// C (m x n, row stride ldc) += A (m x k, stride lda) @ B (k x n, stride ldb); with
// `transposed`, A is stored as its transpose (k x m, stride lda): C += A^T B over k rows.
// Register blocks of MR rows x NV vectors; B's panel of NV vectors' columns stays in L1
// while every row block passes over it.
template <int MR, int NV, bool transposed>
inline void block(int k, const float* a, int lda, const float* b, int ldb, float* c, int ldc) {
  vf acc[MR][NV] = {};
  for (int p = 0; p < k; ++p) {
    vf bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = load(b + p * ldb + j * kLanes);
    for (int r = 0; r < MR; ++r) {
      vf av = splat(transposed ? a[p * lda + r] : a[r * lda + p]);
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

template <int NV, bool transposed = false>
void row_blocks(int m, int k, const float* a, int lda, const float* b, int ldb, float* c,
                int ldc) {
  // Even block heights (25 rows: five blocks of 5, not four of 6 and one of 1).
  int blocks = (m + kMaxRows - 1) / kMaxRows;
  for (int r = 0, left = blocks; r < m; --left) {
    int rows = (m - r + left - 1) / left;
    const float* ar = transposed ? a + r : a + size_t(r) * lda;
    float* cr = c + size_t(r) * ldc;
    switch (rows) {
      case 1: block<1, NV, transposed>(k, ar, lda, b, ldb, cr, ldc); break;
      case 2: block<2, NV, transposed>(k, ar, lda, b, ldb, cr, ldc); break;
      case 3: block<3, NV, transposed>(k, ar, lda, b, ldb, cr, ldc); break;
#ifdef __AVX512F__
      case 4: block<4, NV, transposed>(k, ar, lda, b, ldb, cr, ldc); break;
      case 5: block<5, NV, transposed>(k, ar, lda, b, ldb, cr, ldc); break;
      case 6: block<6, NV, transposed>(k, ar, lda, b, ldb, cr, ldc); break;
#endif
    }
    r += rows;
  }
}

// B (k x n, row stride ldb) copied into panels of up to kPanelRows rows x 64 columns,
// each contiguous (32 KB, L1-sized), for the columns in whole 64-column panels. Read in
// place, B's rows (2 KB apart for n = 512) fall in a few L1 sets and evict each other, so
// every row block would fetch its panel from L2 again.
// With `transposed`, `b` holds B's transpose (n x k, row stride ldb): the backward kernels
// get W_h for B = W_h^T and pack it in that order, which saves XLA's transpose of W_h
// before each call.
constexpr int kPanelCols = 4 * kLanes, kPanelRows = 128;

struct Panels {
  int k, n, ldb, full;  // full: the columns packed (a multiple of 64)
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
// through L1 once, so one part of 25 rows on each of two threads (row blocks of 5) ran
// the char-rnn step faster than two parts of 12-13 each in turn (blocks of 4-5).
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
  // finish, and waking a sleeping thread costs more (the char-rnn step ran faster).
  const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
  while (shared->done.load() != parts && std::chrono::steady_clock::now() < until) _mm_pause();
  if (shared->done.load() == parts) return;
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done.load() == parts; });
}

// Runs fn(q) for q = 0..groups - 1, the threads (as parallel_rows') taking the groups in
// turn. Sums that each group makes into outputs of its own and that are added in group
// order afterwards then do not depend on which thread took which group.
template <typename F>
void each_group(ffi::ThreadPool& pool, int groups, F fn) {
  std::atomic<int> next{0};
  parallel_rows(pool, groups, [&](int, int) {
    for (int q; (q = next.fetch_add(1)) < groups;) fn(q);
  }, 1);
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
  const int32_t* ids;  // with ids, gx is a (vocab, 4 hidden) table and row i reads gx[ids[i]]
  int vocab;

  // The input projections of one row of one step.
  const float* projections(size_t idx) const {
    const size_t row = ids ? size_t(std::clamp(int(ids[idx]), 0, vocab - 1)) : idx;
    return gx + row * d.gates();
  }

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
        const float* g = projections(size_t(t) * B + r0 + r);
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

// Sums over all rows (timesteps x batch rows) of a gradient D (rows x n): the weight
// gradients A^T D (m x n) of one or two inputs A (rows x m), the column sums of D (a
// bias gradient) and, given ids, the rows of D added into a table's rows (an embedding
// lookup's gradient), all from one pass over D. XLA's CPU backend gives a product whose
// left operand is transposed to Eigen, at about two thirds of the speed of a plain
// product, and copies D to a new layout before a scatter-add. Here D is packed chunk by
// chunk (kChunk rows) into the panels of 64 columns that stay in L1 (as `Panels` does
// for the weights) and every output takes its share of the panel while it is there; the
// threads take groups of chunks in turn, each into outputs of its own (GradientSumsImpl).
constexpr int kChunk = 128, kGroups = 4;

struct Input {  // an A and its product C = A^T D
  int m;
  const float* a;
  float* c;
};

struct RowSums {
  int rows, n, vocab;
  const float* d;
  std::vector<Input> inputs;
  float* col_sums;
  const int32_t* ids;  // null: no table
  float* table;

  // The outputs, in the order `into` and `add` lay them out in one array.
  std::vector<std::pair<float*, size_t>> outputs() const {
    std::vector<std::pair<float*, size_t>> out{{col_sums, size_t(n)}};
    if (ids) out.push_back({table, size_t(vocab) * n});
    for (const Input& in : inputs) out.push_back({in.c, size_t(in.m) * n});
    return out;
  }
  size_t output_size() const {
    size_t size = 0;
    for (auto [p, count] : outputs()) size += count;
    return size;
  }
  // The same sums into `own` (output_size() floats, zeroed) instead.
  RowSums into(float* own) const {
    RowSums copy = *this;
    copy.col_sums = own, own += n;
    if (ids) copy.table = own, own += size_t(vocab) * n;
    for (Input& in : copy.inputs) in.c = own, own += size_t(in.m) * n;
    return copy;
  }
  void zero() const {
    for (auto [out, count] : outputs()) std::fill(out, out + count, 0.0f);
  }
  // These outputs += another copy's own.
  void add(const float* own) const {
    for (auto [out, count] : outputs())
      for (size_t i = 0; i < count; ++i) out[i] += *own++;
  }

  // Rows k0..k0 + kc (kc <= kChunk) added into every output: each panel of 64 columns of
  // d packed (into `panel`, kChunk x 64), then every input's share of it; then the
  // columns past the last whole panel.
  void chunk(int k0, int kc, float* panel) const {
    const int full = n / kPanelCols * kPanelCols;
    for (int col = 0; col < full; col += kPanelCols) {
      pack(k0, kc, col, panel);
      for (const Input& in : inputs) product(in, k0, kc, col, panel);
    }
    if (full < n) tail(full, k0, k0 + kc);
  }

  // The panel of rows k0.. and columns col..col + 63, added to the column sums and to the
  // table rows of their ids.
  void pack(int k0, int kc, int col, float* out) const {
    vf sums[4];
    for (int j = 0; j < 4; ++j) sums[j] = load(col_sums + col + j * kLanes);
    for (int p = 0; p < kc; ++p, out += kPanelCols) {
      float* row = ids ? table + size_t(clamped(k0 + p)) * n + col : nullptr;
      for (int j = 0; j < 4; ++j) {
        vf v = load(d + size_t(k0 + p) * n + col + j * kLanes);
        store(out + j * kLanes, v);
        sums[j] += v;
        if (row) store(row + j * kLanes, load(row + j * kLanes) + v);
      }
    }
    for (int j = 0; j < 4; ++j) store(col_sums + col + j * kLanes, sums[j]);
  }

  // Ids past the table are clamped, as XLA's gather clamps them.
  int clamped(int row) const { return std::clamp(int(ids[row]), 0, vocab - 1); }

  // C[:, col..col + 63] += A[k0..k0 + kc]^T panel.
  void product(const Input& in, int k0, int kc, int col, const float* panel) const {
    row_blocks<4, true>(in.m, kc, in.a + size_t(k0) * in.m, in.m, panel, kPanelCols,
                        in.c + col, n);
  }

  // Columns col0.. past the last whole panel (65 logits: one), over rows p0..p1.
  // Products as C^T: per row of A and per column, a broadcast of d times the row of a.
  void tail(int col0, int p0, int p1) const {
    const int cols = n - col0;
    for (int p = p0; p < p1; ++p) {
      const float* dr = d + size_t(p) * n + col0;
      for (int j = 0; j < cols; ++j) col_sums[col0 + j] += dr[j];
      if (ids)
        for (int j = 0; j < cols; ++j) table[size_t(clamped(p)) * n + col0 + j] += dr[j];
    }
    for (const Input& in : inputs) {
      std::vector<float> ct(size_t(cols) * in.m, 0.0f);
      for (int p = p0; p < p1; ++p) {
        const float* ar = in.a + size_t(p) * in.m;
        for (int j = 0; j < cols; ++j) {
          float* acc = ct.data() + size_t(j) * in.m;
          const float dj = d[size_t(p) * n + col0 + j];
          const vf dv = splat(dj);
          int i = 0;
          for (; i + kLanes <= in.m; i += kLanes)
            store(acc + i, load(acc + i) + dv * load(ar + i));
          for (; i < in.m; ++i) acc[i] += dj * ar[i];
        }
      }
      for (int j = 0; j < cols; ++j)
        for (int i = 0; i < in.m; ++i) in.c[size_t(i) * n + col0 + j] += ct[size_t(j) * in.m + i];
    }
  }
};

const float* optional(ffi::Buffer<ffi::F32>& b) {
  return b.element_count() == 0 ? nullptr : b.typed_data();
}

// gx (time, batch, 4 hidden), or with ids (time, batch) int32 a (vocab, 4 hidden) table
// the steps' projections are looked up in (an embedding layer's, without writing them out).
ffi::Error LstmForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> gx, ffi::Buffer<ffi::F32> w,
                           ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> h_init,
                           ffi::Buffer<ffi::F32> c_init, ffi::Buffer<ffi::F32> keep,
                           ffi::Buffer<ffi::F32> mask, ffi::Buffer<ffi::S32> ids, bool reverse,
                           bool save, ffi::ResultBuffer<ffi::F32> outs,
                           ffi::ResultBuffer<ffi::F32> h_last,
                           ffi::ResultBuffer<ffi::F32> c_last, ffi::ResultBuffer<ffi::F32> acts,
                           ffi::ResultBuffer<ffi::F32> h_starts,
                           ffi::ResultBuffer<ffi::F32> c_starts,
                           ffi::ResultBuffer<ffi::F32> tanh_c) {
  auto dims = gx.dimensions();
  auto rows = ids.element_count() ? ids.dimensions() : dims;
  if (dims.size() != (ids.element_count() ? 2 : 3) || dims.back() % 4 != 0 || rows.size() < 2)
    return ffi::Error::InvalidArgument("gx must be (time, batch, 4 hidden) or, with ids, "
                                       "(vocab, 4 hidden)");
  Dims d{int(rows[0]), int(rows[1]), int(dims.back() / 4)};
  if (w.element_count() != size_t(d.hidden) * d.gates() ||
      h_init.element_count() != size_t(d.batch) * d.hidden ||
      keep.element_count() != size_t(d.time) * d.batch)
    return ffi::Error::InvalidArgument("LSTM kernel: inconsistent operand shapes");
  const Panels panels(d.hidden, d.gates(), w.typed_data(), d.gates());
  Forward f{d, reverse, save, panels, gx.typed_data(), bias.typed_data(),
            h_init.typed_data(), c_init.typed_data(), keep.typed_data(), optional(mask),
            outs->typed_data(), h_last->typed_data(), c_last->typed_data(),
            acts->typed_data(), h_starts->typed_data(), c_starts->typed_data(),
            tanh_c->typed_data(), ids.element_count() ? ids.typed_data() : nullptr,
            int(dims[0])};
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

// d (..., n); a1 (..., m1), a2 (..., m2) with d's leading dimensions, or empty; ids
// (...) int32 or empty -> a1^T d (m1, n), a2^T d (m2, n), the column sums of d (n,) and
// the table (vocab, n) with d's rows added into the rows of their ids (outputs of
// absent inputs are empty).
ffi::Error GradientSumsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> d,
                            ffi::Buffer<ffi::F32> a1, ffi::Buffer<ffi::F32> a2,
                            ffi::Buffer<ffi::S32> ids, ffi::ResultBuffer<ffi::F32> c1,
                            ffi::ResultBuffer<ffi::F32> c2, ffi::ResultBuffer<ffi::F32> col_sums,
                            ffi::ResultBuffer<ffi::F32> table) {
  auto dims = d.dimensions();
  const int n = dims.size() == 0 ? 0 : int(dims.back());
  const size_t rows = n ? d.element_count() / n : 0;
  if (n == 0 || col_sums->element_count() != size_t(n))
    return ffi::Error::InvalidArgument("gradient sums: d must be (rows..., columns)");
  RowSums g{int(rows), n, 0, d.typed_data(), {}, col_sums->typed_data(), nullptr, nullptr};
  for (auto [a, c] : {std::pair{&a1, &c1}, std::pair{&a2, &c2}}) {
    if (a->element_count() == 0) continue;
    const int m = int(a->dimensions().back());
    if (a->element_count() != rows * m || (*c)->element_count() != size_t(m) * n)
      return ffi::Error::InvalidArgument("gradient sums: an input's rows differ from d's");
    g.inputs.push_back({m, a->typed_data(), (*c)->typed_data()});
  }
  if (ids.element_count() != 0) {
    if (ids.element_count() != rows || table->element_count() % n != 0)
      return ffi::Error::InvalidArgument("gradient sums: ids must have d's rows");
    g.ids = ids.typed_data(), g.table = table->typed_data();
    g.vocab = int(table->element_count() / n);
  }
  // The rows go in (up to) kGroups groups of whole chunks, which the threads take in
  // turn. Each group sums into outputs of its own (the first into the real ones), added
  // in group order at the end, so the result does not depend on which thread took which
  // group. (Single chunks taken in turn into one set of outputs per thread balanced the
  // threads better and ran faster, but made the sums' rounding depend on the timing.)
  const int chunks = int((rows + kChunk - 1) / kChunk);
  const int groups = std::max(1, std::min(chunks, kGroups));
  std::vector<std::vector<float>> own(groups - 1);
  g.zero();
  each_group(pool, groups, [&](int q) {
    std::vector<float> panel(size_t(kChunk) * kPanelCols);
    if (q) own[q - 1].assign(g.output_size(), 0.0f);
    const RowSums mine = q ? g.into(own[q - 1].data()) : g;
    for (int c = chunks * q / groups; c < chunks * (q + 1) / groups; ++c)
      mine.chunk(c * kChunk, std::min(kChunk, int(rows) - c * kChunk), panel.data());
  });
  for (const auto& o : own) g.add(o.data());
  return ffi::Error::Success();
}


// The output layer and its softmax cross-entropy in two calls (SoftmaxXentForward /
// SoftmaxXentBackward): x (rows, in), W (in, V), b (V), targets (rows) ->
//   z = x W + b;  loss = logsumexp(z) - z[target];  p = softmax(z)   (p is saved), and
//   d = g (p - onehot(target));  dx = d W^T;  dW = x^T d;  db = sum of d over rows.
// Why: at char-rnn's 65 symbols each of the head's three products (XLA's two and
// GradientSums) has one column past a multiple of 16 and ran at about half the speed it
// has at 64 columns, and XLA's softmax is half a dozen small kernels. Here rows go in chunks of kXentRows, and every chunk's logits or gradient live
// in a buffer of Vp = V rounded up to whole vectors (zero weights past V), in L1, from the
// product that makes them to the ones that read them.
constexpr int kXentRows = 64;

// exp on a vector (Cephes' expf: 2^n e^r, |r| <= ln2 / 2, a degree-7 polynomial in r;
// about 1 ulp); 0 below -87.3 (where expf leaves the normal floats), -inf included;
// NaN stays NaN.
inline vf vexp(vf x) {
  const vf lo = splat(-87.33654475f), hi = splat(88.3762626647949f);
  const auto under = x < lo;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: (v + magic) - magic rounds v
  vf n = (x * splat(1.44269504088896341f) + magic) - magic;
  vf r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
  vf q = splat(1.9875691500e-4f);
  q = q * r + splat(1.3981999507e-3f);
  q = q * r + splat(8.3334519073e-3f);
  q = q * r + splat(4.1665795894e-2f);
  q = q * r + splat(1.6666665459e-1f);
  q = q * r + splat(5.0000001201e-1f);
  vf e = q * r * r + r + splat(1.0f);
  typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  e *= scale;
  return under ? splat(0.0f) : e;
}

inline int padded(int v) { return (v + kLanes - 1) / kLanes * kLanes; }

struct Xent {
  int rows, in, vocab, vp;  // vp: vocab rounded up to whole vectors
  const float *x, *bias;
  const int32_t* targets;

  int target(int row) const { return std::clamp(int(targets[row]), 0, vocab - 1); }

  // losses and p of rows r0..r1 (w: W padded to vp columns, in panels).
  void forward(int r0, int r1, const Panels& w, float* losses, float* probs) const {
    std::vector<float> z(size_t(kXentRows) * vp);
    for (int c0 = r0; c0 < r1; c0 += kXentRows) {
      const int m = std::min(kXentRows, r1 - c0);
      for (int r = 0; r < m; ++r) {
        std::copy(bias, bias + vocab, z.data() + size_t(r) * vp);
        std::fill(z.data() + size_t(r) * vp + vocab, z.data() + size_t(r + 1) * vp, 0.0f);
      }
      gemm_acc(m, w, x + size_t(c0) * in, in, z.data(), vp);
      for (int r = 0; r < m; ++r) softmax_row(c0 + r, z.data() + size_t(r) * vp, losses, probs);
    }
  }

  void softmax_row(int row, float* z, float* losses, float* probs) const {
    for (int j = vocab; j < vp; ++j) z[j] = -INFINITY;
    vf top = load(z);
    for (int j = kLanes; j < vp; j += kLanes) {
      vf v = load(z + j);
      top = v > top ? v : top;
    }
    float mx = top[0];
    for (int l = 1; l < kLanes; ++l) mx = std::max(mx, top[l]);
    const int t = target(row);
    const float zt = z[t] - mx;
    vf sum = {};
    for (int j = 0; j < vp; j += kLanes) {
      vf e = vexp(load(z + j) - splat(mx));
      store(z + j, e);
      sum += e;
    }
    float total = 0.0f;
    for (int l = 0; l < kLanes; ++l) total += sum[l];
    losses[row] = std::log(total) - zt;  // -log p[t] = log sum exp(z - mx) - (z[t] - mx)
    const float inv = 1.0f / total;
    float* p = probs + size_t(row) * vocab;
    for (int j = 0; j < vocab; ++j) p[j] = z[j] * inv;
  }
};

// d x and this group's dW, db (vp columns) from rows r0..r1; wt: W^T in panels.
void xent_backward_rows(const Xent& xe, int r0, int r1, const Panels& wt, const float* probs,
                        const float* g, float* dx, float* dw, float* db) {
  const int vp = xe.vp, V = xe.vocab, in = xe.in;
  std::vector<float> d(size_t(kXentRows) * vp);
  for (int c0 = r0; c0 < r1; c0 += kXentRows) {
    const int m = std::min(kXentRows, r1 - c0);
    for (int r = 0; r < m; ++r) {
      float* dr = d.data() + size_t(r) * vp;
      const float* p = probs + size_t(c0 + r) * V;
      const float gr = g[c0 + r];
      for (int j = 0; j < V; ++j) dr[j] = gr * p[j];
      std::fill(dr + V, dr + vp, 0.0f);
      dr[xe.target(c0 + r)] -= gr;
      for (int j = 0; j < vp; j += kLanes) store(db + j, load(db + j) + load(dr + j));
    }
    float* dxc = dx + size_t(c0) * in;
    std::fill(dxc, dxc + size_t(m) * in, 0.0f);
    gemm_acc(m, wt, d.data(), vp, dxc, in);
    const float* xc = xe.x + size_t(c0) * in;  // dW += xc^T d
    int col = 0;
    for (; col + kPanelCols <= vp; col += kPanelCols)
      row_blocks<4, true>(in, m, xc, in, d.data() + col, vp, dw + col, vp);
    for (; col < vp; col += kLanes)
      row_blocks<1, true>(in, m, xc, in, d.data() + col, vp, dw + col, vp);
  }
}

ffi::Error XentCheck(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& w,
                     const ffi::Buffer<ffi::S32>& targets, Xent& xe) {
  auto dims = x.dimensions(), wd = w.dimensions();
  if (dims.size() < 2 || wd.size() != 2 || wd[0] != dims.back())
    return ffi::Error::InvalidArgument("softmax cross-entropy: x must be (rows..., in) and "
                                       "W (in, vocab)");
  xe.in = int(dims.back()), xe.vocab = int(wd[1]), xe.vp = padded(xe.vocab);
  xe.rows = int(x.element_count() / xe.in);
  if (targets.element_count() != size_t(xe.rows))
    return ffi::Error::InvalidArgument("softmax cross-entropy: targets must have x's rows");
  xe.x = x.typed_data(), xe.targets = targets.typed_data();
  return ffi::Error::Success();
}

ffi::Error SoftmaxXentForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                  ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> bias,
                                  ffi::Buffer<ffi::S32> targets,
                                  ffi::ResultBuffer<ffi::F32> losses,
                                  ffi::ResultBuffer<ffi::F32> probs) {
  Xent xe{};
  if (auto e = XentCheck(x, w, targets, xe); e.failure()) return e;
  xe.bias = bias.typed_data();
  std::vector<float> wp(size_t(xe.in) * xe.vp, 0.0f);  // W with zero columns up to vp
  for (int i = 0; i < xe.in; ++i)
    std::copy(w.typed_data() + size_t(i) * xe.vocab, w.typed_data() + size_t(i + 1) * xe.vocab,
              wp.data() + size_t(i) * xe.vp);
  const Panels panels(xe.in, xe.vp, wp.data(), xe.vp);
  float *out = losses->typed_data(), *p = probs->typed_data();
  parallel_rows(pool, xe.rows, [&](int r0, int r1) { xe.forward(r0, r1, panels, out, p); },
                kXentRows);
  return ffi::Error::Success();
}

// The row groups work as GradientSums' do: fixed groups taken by the threads in turn, each
// into dW, db of its own, added in group order (the sums' rounding does not depend on the
// timing).
ffi::Error SoftmaxXentBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                   ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> probs,
                                   ffi::Buffer<ffi::S32> targets, ffi::Buffer<ffi::F32> g,
                                   ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dw,
                                   ffi::ResultBuffer<ffi::F32> db) {
  Xent xe{};
  if (auto e = XentCheck(x, w, targets, xe); e.failure()) return e;
  if (probs.element_count() != size_t(xe.rows) * xe.vocab || g.element_count() != size_t(xe.rows))
    return ffi::Error::InvalidArgument("softmax cross-entropy: probs or g do not match x");
  const Panels wt(xe.vocab, xe.in, w.typed_data(), xe.vocab, true);  // W^T
  const int chunks = (xe.rows + kXentRows - 1) / kXentRows;
  const int groups = std::max(1, std::min(chunks, kGroups));
  const size_t own = size_t(xe.in + 1) * xe.vp;  // dW (in x vp), then db (vp)
  std::vector<float> sums(groups * own, 0.0f);
  each_group(pool, groups, [&](int q) {
    float* mine = sums.data() + q * own;
    const int r0 = std::min(xe.rows, chunks * q / groups * kXentRows);
    const int r1 = std::min(xe.rows, chunks * (q + 1) / groups * kXentRows);
    xent_backward_rows(xe, r0, r1, wt, probs.typed_data(), g.typed_data(), dx->typed_data(),
                       mine, mine + size_t(xe.in) * xe.vp);
  });
  for (int q = 1; q < groups; ++q)
    for (size_t i = 0; i < own; ++i) sums[i] += sums[q * own + i];
  for (int i = 0; i < xe.in; ++i)
    std::copy(sums.data() + size_t(i) * xe.vp, sums.data() + size_t(i) * xe.vp + xe.vocab,
              dw->typed_data() + size_t(i) * xe.vocab);
  const float* dbs = sums.data() + size_t(xe.in) * xe.vp;
  std::copy(dbs, dbs + xe.vocab, db->typed_data());
  return ffi::Error::Success();
}

// C (rows, n) = A (rows, k) @ B, B (k, n) or, with `transposed`, given as B^T (n, k): the
// recurrent layers' input projections and their input gradients d_out @ W_i^T. Rows go in
// chunks of kMatmulRows, so a chunk's A and C stay in L2 while every panel of B passes
// over them; the chunks are split over the threads.
constexpr int kMatmulRows = 256;

ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                      bool transposed, ffi::ResultBuffer<ffi::F32> c) {
  auto ad = a.dimensions(), bd = b.dimensions();
  if (ad.size() < 2 || bd.size() != 2 || bd[transposed ? 1 : 0] != ad.back())
    return ffi::Error::InvalidArgument("matmul: a must be (rows..., k) and b (k, n)");
  const int k = int(ad.back()), n = int(bd[transposed ? 0 : 1]);
  const int rows = int(a.element_count() / k);
  const Panels panels(k, n, b.typed_data(), int(bd[1]), transposed);
  const float* av = a.typed_data();
  float* cv = c->typed_data();
  const int chunks = (rows + kMatmulRows - 1) / kMatmulRows;
  parallel_rows(pool, chunks, [&](int q0, int q1) {
    for (int q = q0; q < q1; ++q) {
      const int r0 = q * kMatmulRows, m = std::min(kMatmulRows, rows - r0);
      float* cq = cv + size_t(r0) * n;
      std::fill(cq, cq + size_t(m) * n, 0.0f);
      gemm_acc(m, panels, av + size_t(r0) * k, k, cq, n);
    }
  }, 1);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmForward, LstmForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<bool>("reverse")
                                  .Attr<bool>("save")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmBackward, LstmBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("reverse")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GruForward, GruForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("reverse")
                                  .Attr<bool>("save")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GruBackward, GruBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("reverse")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GradientSums, GradientSumsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SoftmaxXentForward, SoftmaxXentForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SoftmaxXentBackward, SoftmaxXentBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Matmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transposed")
                                  .Ret<ffi::Buffer<ffi::F32>>());
