// CPU kernels of stt::_attention_forward / _attention_backward (schemas in ../attention.cpp).
//
// Flash style: queries and keys are tiled, a tile of scores lives in a per-thread buffer and
// is never larger than kQTile x kKTile, so memory is O(N) per sequence. The tile products are
// BLAS gemm calls (MKL's sgemm_/dgemm_ that torch ships, found at load time) reading q, k, v
// in place through their row strides; the softmax in between is vectorised with at::vec.
// float16/bfloat16 inputs are upcast to float32 (a copy): the CPU path is for float32/float64.
#include "stt/cpu_vec.h"  // first: it selects the SIMD width of at::vec

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <limits>
#include <vector>

#if !defined(_WIN32)
#include <dlfcn.h>
#endif

#include "stt/attention_checks.h"
#include "stt/online_softmax.h"

namespace stt {
namespace {

// ---------------------------------------------------------------------------------------
// gemm: column-major C(m x n) = alpha * op(A) op(B) + beta * C, as Fortran BLAS.
//
// torch's own cpublas::gemm is not exported from libtorch_cpu, but the BLAS it wraps is (MKL
// in the official wheels). Looking the symbol up at run time instead of linking it keeps the
// library loadable on a torch built against another BLAS; there the portable loop below runs.

using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                          const float*, const int*, const float*, const int*, const float*, float*, const int*);
using dgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const double*,
                          const double*, const int*, const double*, const int*, const double*, double*,
                          const int*);

template <typename Fn>
Fn find_blas(const char* name) {
#if defined(_WIN32)
  (void)name;
  return nullptr;
#else
  return reinterpret_cast<Fn>(dlsym(RTLD_DEFAULT, name));
#endif
}

template <typename T>
void portable_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                   const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      T acc = 0;
      for (int64_t l = 0; l < k; ++l) {
        acc += (ta ? a[l + i * lda] : a[i + l * lda]) * (tb ? b[j + l * ldb] : b[l + j * ldb]);
      }
      T& dst = c[i + j * ldc];
      dst = alpha * acc + (beta == T(0) ? T(0) : beta * dst);
    }
  }
}

bool fits_int(std::initializer_list<int64_t> values) {
  return std::all_of(values.begin(), values.end(), [](int64_t x) { return x >= 0 && x <= INT_MAX; });
}

template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  static const auto blas = std::is_same_v<T, float> ? reinterpret_cast<void*>(find_blas<sgemm_fn>("sgemm_"))
                                                    : reinterpret_cast<void*>(find_blas<dgemm_fn>("dgemm_"));
  if (blas == nullptr || !fits_int({m, n, k, lda, ldb, ldc})) {
    portable_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
  const int im = m, in = n, ik = k, ilda = lda, ildb = ldb, ildc = ldc;
  if constexpr (std::is_same_v<T, float>) {
    reinterpret_cast<sgemm_fn>(blas)(&ca, &cb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
  } else {
    reinterpret_cast<dgemm_fn>(blas)(&ca, &cb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
  }
}

// Row-major tile products, named after what they compute. `ld*` are row strides.
// S(mq x nk) = alpha * A(mq x d) B(nk x d)^T
template <typename T>
void matmul_abt(int64_t mq, int64_t nk, int64_t d, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb,
                T* s) {
  gemm<T>(true, false, nk, mq, d, alpha, b, ldb, a, lda, T(0), s, nk);
}

// C(mq x d) = beta * C + alpha * P(mq x nk) B(nk x d), C dense (row stride d)
template <typename T>
void matmul_pb(int64_t mq, int64_t nk, int64_t d, T alpha, const T* p, const T* b, int64_t ldb, T beta, T* c) {
  gemm<T>(false, false, d, mq, nk, alpha, b, ldb, p, nk, beta, c, d);
}

// C(nk x d) += alpha * P(mq x nk)^T A(mq x d), C dense (row stride d)
template <typename T>
void matmul_ptb(int64_t mq, int64_t nk, int64_t d, T alpha, const T* p, const T* a, int64_t lda, T* c) {
  gemm<T>(false, true, d, nk, mq, alpha, a, lda, p, nk, T(1), c, d);
}

// ---------------------------------------------------------------------------------------
// Vectorised row operations of the softmax.

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
T row_max(const T* x, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  T best = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  if (n >= W) {
    Vec<T> m = Vec<T>::loadu(x);
    for (j = W; j + W <= n; j += W) m = at::vec::maximum(m, Vec<T>::loadu(x + j));
    T lanes[W];
    m.store(lanes);
    for (int64_t l = 0; l < W; ++l) best = std::max(best, lanes[l]);
  }
  for (; j < n; ++j) best = std::max(best, x[j]);
  return best;
}

// x <- exp(x - sub); returns the sum. exp_u20 is the fast exponential SDPA's CPU kernel uses
// (about 1e-6 relative), well inside the float32 accumulation error.
template <typename T>
T exp_sum_inplace(T* x, int64_t n, T sub) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> vsub(sub);
  Vec<T> acc(T(0));
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const Vec<T> e = (Vec<T>::loadu(x + j) - vsub).exp_u20();
    e.store(x + j);
    acc = acc + e;
  }
  T lanes[W];
  acc.store(lanes);
  T sum = 0;
  for (int64_t l = 0; l < W; ++l) sum += lanes[l];
  for (; j < n; ++j) {
    x[j] = softmax_exp<T>(x[j] - sub);
    sum += x[j];
  }
  return sum;
}

template <typename T>
void scale_inplace(T* x, int64_t n, T factor) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> f(factor);
  int64_t j = 0;
  for (; j + W <= n; j += W) (Vec<T>::loadu(x + j) * f).store(x + j);
  for (; j < n; ++j) x[j] *= factor;
}

// ds <- p * (ds - delta), with ds holding dP on entry.
template <typename T>
void softmax_grad_inplace(const T* p, T* ds, int64_t n, T delta) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> vd(delta);
  int64_t j = 0;
  for (; j + W <= n; j += W) (Vec<T>::loadu(p + j) * (Vec<T>::loadu(ds + j) - vd)).store(ds + j);
  for (; j < n; ++j) ds[j] = softmax_grad<T>(p[j], ds[j], delta);
}

// ---------------------------------------------------------------------------------------
// Strided 5-d views (B, Z, N, heads, d). A sequence is one (b, z, head); s enumerates them
// with head fastest, so consecutive tasks touch neighbouring memory in the packed layout.

struct Geometry {
  int64_t B, Z, N, H, D;
  int64_t sequences() const { return B * Z * H; }
};

template <typename T>
struct View {
  T* data;
  int64_t sb, sz, sn, sh, sd;

  View(const at::Tensor& t)
      : data(t.data_ptr<T>()), sb(t.stride(0)), sz(t.stride(1)), sn(t.stride(2)), sh(t.stride(3)),
        sd(t.stride(4)) {}

  // First element of sequence s, given (Z, H) to decode it.
  T* seq(int64_t s, const Geometry& g) const {
    const int64_t h = s % g.H, bz = s / g.H, z = bz % g.Z, b = bz / g.Z;
    return data + b * sb + z * sz + h * sh;
  }
};

// lse (B, Z, heads, N) float32 with any strides.
struct LseView {
  float* data;
  int64_t sb, sz, sh, sn;

  explicit LseView(const at::Tensor& t)
      : data(t.data_ptr<float>()), sb(t.stride(0)), sz(t.stride(1)), sh(t.stride(2)), sn(t.stride(3)) {}

  float* seq(int64_t s, const Geometry& g) const {
    const int64_t h = s % g.H, bz = s / g.H, z = bz % g.Z, b = bz / g.Z;
    return data + b * sb + z * sz + h * sh;
  }
};

// BLAS reads a row with unit stride along d and needs a row stride >= d; views that break
// either (a transposed d axis, broadcast rows) are copied, everything else is read in place.
at::Tensor readable(const at::Tensor& t, at::ScalarType compute) {
  at::Tensor r = t.scalar_type() == compute ? t : t.to(compute);
  const bool unit_d = r.size(4) == 1 || r.stride(4) == 1;
  const bool rows_ok = r.size(2) == 1 || r.stride(2) >= r.size(4);
  return unit_d && rows_ok ? r : r.contiguous();
}

// The row stride BLAS is given: any value >= d works for a single row.
template <typename T>
int64_t row_ld(const View<T>& v, const Geometry& g) {
  return g.N == 1 ? g.D : v.sn;
}

// Where the kernel writes `target`: itself when it has the compute dtype, else a buffer that
// is copied back (with the dtype cast) once the kernel is done.
struct Output {
  at::Tensor target, buffer;

  Output(const at::Tensor& t, at::ScalarType compute)
      : target(t), buffer(t.scalar_type() == compute ? t : at::empty(t.sizes(), t.options().dtype(compute))) {}

  void finish() {
    if (!buffer.is_same(target)) target.copy_(buffer);
  }
};

template <typename T>
void store_row(T* dst, int64_t sd, const T* src, int64_t d, T factor) {
  if (sd == 1) {
    constexpr int64_t W = Vec<T>::size();
    const Vec<T> f(factor);
    int64_t c = 0;
    for (; c + W <= d; c += W) (Vec<T>::loadu(src + c) * f).store(dst + c);
    for (; c < d; ++c) dst[c] = src[c] * factor;
  } else {
    for (int64_t c = 0; c < d; ++c) dst[c * sd] = src[c] * factor;
  }
}

// Tile sizes. A score tile (kQTile x kKTile) plus the accumulators fit in L2. Short sequences
// (the temporal case) are one tile each, so a task handles a whole T x T problem in cache.
constexpr int64_t kQTile = 64;
constexpr int64_t kKTile = 512;
constexpr int64_t kBwdQTile = 64;
constexpr int64_t kBwdKTile = 128;

// ---------------------------------------------------------------------------------------
// Forward.

template <typename T>
void forward_kernel(const at::Tensor& q_t, const at::Tensor& k_t, const at::Tensor& v_t, const at::Tensor& out_t,
                    const at::Tensor& lse_t, T scale) {
  const Geometry g{q_t.size(0), q_t.size(1), q_t.size(2), q_t.size(3), q_t.size(4)};
  const View<T> q(q_t), k(k_t), v(v_t), out(out_t);
  const LseView lse(lse_t);
  const int64_t ldq = row_ld(q, g), ldk = row_ld(k, g), ldv = row_ld(v, g);
  const int64_t q_tiles = (g.N + kQTile - 1) / kQTile;

  at::parallel_for(0, g.sequences() * q_tiles, 1, [&](int64_t begin, int64_t end) {
    const int64_t qt_size = std::min(kQTile, g.N), kt_size = std::min(kKTile, g.N);
    std::vector<T> scores(qt_size * kt_size), acc(qt_size * g.D);
    std::vector<OnlineSoftmaxRow<T>> rows(qt_size);

    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / q_tiles, q0 = (task % q_tiles) * kQTile, mq = std::min(kQTile, g.N - q0);
      const T* qs = q.seq(s, g) + q0 * q.sn;
      const T* ks = k.seq(s, g);
      const T* vs = v.seq(s, g);
      std::fill(rows.begin(), rows.begin() + mq, online_softmax_init<T>());

      for (int64_t k0 = 0; k0 < g.N; k0 += kKTile) {
        const int64_t nk = std::min(kKTile, g.N - k0);
        matmul_abt<T>(mq, nk, g.D, scale, qs, ldq, ks + k0 * k.sn, ldk, scores.data());
        for (int64_t i = 0; i < mq; ++i) {
          T* row = scores.data() + i * nk;
          const T new_max = online_softmax_new_max(rows[i], row_max(row, nk));
          const T alpha = online_softmax_update(rows[i], new_max, exp_sum_inplace(row, nk, new_max));
          if (k0 > 0 && alpha != T(1)) scale_inplace(acc.data() + i * g.D, g.D, alpha);
        }
        matmul_pb<T>(mq, nk, g.D, T(1), scores.data(), vs + k0 * v.sn, ldv, k0 == 0 ? T(0) : T(1), acc.data());
      }

      T* os = out.seq(s, g) + q0 * out.sn;
      float* ls = lse.seq(s, g) + q0 * lse.sn;
      for (int64_t i = 0; i < mq; ++i) {
        store_row(os + i * out.sn, out.sd, acc.data() + i * g.D, g.D, online_softmax_inv_sum(rows[i]));
        ls[i * lse.sn] = static_cast<float>(online_softmax_lse(rows[i]));
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// Backward: for a key tile, loop over all query tiles, recompute P = exp(S - lse), and
// accumulate dV = P^T dO, dK = scale * dS^T Q in the tile's own buffers (so parallel tasks
// own disjoint rows of grad_k / grad_v) and dQ += scale * dS K into a caller-owned buffer.

template <typename T>
struct BackwardArgs {
  Geometry g;
  View<T> q, k, v, grad_k, grad_v;
  int64_t ldq, ldk, ldv, lddo;
  T scale;
};

template <typename T>
struct BackwardScratch {
  std::vector<T> p, ds, dk, dv;

  explicit BackwardScratch(const Geometry& g)
      : p(std::min(kBwdQTile, g.N) * std::min(kBwdKTile, g.N)),
        ds(p.size()),
        dk(std::min(kBwdKTile, g.N) * g.D),
        dv(dk.size()) {}
};

template <typename T>
void backward_key_tile(const BackwardArgs<T>& a, int64_t s, int64_t k0, const T* grad_out_seq, const T* lse_seq,
                       const T* delta_seq, T* dq_acc, BackwardScratch<T>& w) {
  const Geometry& g = a.g;
  const int64_t nk = std::min(kBwdKTile, g.N - k0);
  const T* qs = a.q.seq(s, g);
  const T* ks = a.k.seq(s, g) + k0 * a.k.sn;
  const T* vs = a.v.seq(s, g) + k0 * a.v.sn;
  std::fill(w.dk.begin(), w.dk.begin() + nk * g.D, T(0));
  std::fill(w.dv.begin(), w.dv.begin() + nk * g.D, T(0));

  for (int64_t q0 = 0; q0 < g.N; q0 += kBwdQTile) {
    const int64_t mq = std::min(kBwdQTile, g.N - q0);
    const T* qt = qs + q0 * a.q.sn;
    const T* dot = grad_out_seq + q0 * a.lddo;
    matmul_abt<T>(mq, nk, g.D, a.scale, qt, a.ldq, ks, a.ldk, w.p.data());
    for (int64_t i = 0; i < mq; ++i) {
      // exp(S - lse) without the sum: exp_sum_inplace's sum is simply not used.
      exp_sum_inplace(w.p.data() + i * nk, nk, lse_seq[q0 + i]);
    }
    matmul_ptb<T>(mq, nk, g.D, T(1), w.p.data(), dot, a.lddo, w.dv.data());
    matmul_abt<T>(mq, nk, g.D, T(1), dot, a.lddo, vs, a.ldv, w.ds.data());
    for (int64_t i = 0; i < mq; ++i) {
      softmax_grad_inplace(w.p.data() + i * nk, w.ds.data() + i * nk, nk, delta_seq[q0 + i]);
    }
    matmul_pb<T>(mq, nk, g.D, a.scale, w.ds.data(), ks, a.ldk, T(1), dq_acc + q0 * g.D);
    matmul_ptb<T>(mq, nk, g.D, a.scale, w.ds.data(), qt, a.ldq, w.dk.data());
  }

  T* dks = a.grad_k.seq(s, g) + k0 * a.grad_k.sn;
  T* dvs = a.grad_v.seq(s, g) + k0 * a.grad_v.sn;
  for (int64_t j = 0; j < nk; ++j) {
    store_row(dks + j * a.grad_k.sn, a.grad_k.sd, w.dk.data() + j * g.D, g.D, T(1));
    store_row(dvs + j * a.grad_v.sn, a.grad_v.sd, w.dv.data() + j * g.D, g.D, T(1));
  }
}

// delta_i = rowsum(dO_i * O_i) and the saved lse of one sequence, in the compute type.
template <typename T>
void row_terms(const Geometry& g, const View<T>& out, const View<T>& grad_out, const LseView& lse, int64_t s,
               T* delta, T* lse_row) {
  const T* os = out.seq(s, g);
  const T* dos = grad_out.seq(s, g);
  const float* ls = lse.seq(s, g);
  for (int64_t i = 0; i < g.N; ++i) {
    const T* o = os + i * out.sn;
    const T* d = dos + i * grad_out.sn;
    T acc = 0;
    for (int64_t c = 0; c < g.D; ++c) acc += o[c * out.sd] * d[c * grad_out.sd];
    delta[i] = acc;
    lse_row[i] = static_cast<T>(ls[i * lse.sn]);
  }
}

template <typename T>
void backward_kernel(const at::Tensor& q_t, const at::Tensor& k_t, const at::Tensor& v_t, const at::Tensor& out_t,
                     const at::Tensor& grad_out_t, const at::Tensor& lse_t, T scale, const at::Tensor& grad_q_t,
                     const at::Tensor& grad_k_t, const at::Tensor& grad_v_t) {
  const Geometry g{q_t.size(0), q_t.size(1), q_t.size(2), q_t.size(3), q_t.size(4)};
  const View<T> out(out_t), grad_out(grad_out_t), grad_q(grad_q_t);
  const LseView lse(lse_t);
  BackwardArgs<T> a{g, View<T>(q_t), View<T>(k_t), View<T>(v_t), View<T>(grad_k_t), View<T>(grad_v_t), 0, 0, 0, 0,
                    scale};
  a.ldq = row_ld(a.q, g);
  a.ldk = row_ld(a.k, g);
  a.ldv = row_ld(a.v, g);
  a.lddo = row_ld(grad_out, g);
  const int64_t k_tiles = (g.N + kBwdKTile - 1) / kBwdKTile;
  const int64_t threads = at::get_num_threads();

  auto store_dq = [&](int64_t s, int64_t i0, int64_t i1, const T* dq) {
    T* dqs = grad_q.seq(s, g);
    for (int64_t i = i0; i < i1; ++i) store_row(dqs + i * grad_q.sn, grad_q.sd, dq + i * g.D, g.D, T(1));
  };

  if (g.sequences() >= 2 * threads) {
    // Enough sequences to keep every thread busy: a task owns whole sequences, so dQ, dK and
    // dV are all private to it.
    at::parallel_for(0, g.sequences(), 1, [&](int64_t begin, int64_t end) {
      BackwardScratch<T> w(g);
      std::vector<T> delta(g.N), lse_row(g.N), dq(g.N * g.D);
      for (int64_t s = begin; s < end; ++s) {
        row_terms(g, out, grad_out, lse, s, delta.data(), lse_row.data());
        std::fill(dq.begin(), dq.end(), T(0));
        for (int64_t kt = 0; kt < k_tiles; ++kt) {
          backward_key_tile(a, s, kt * kBwdKTile, grad_out.seq(s, g), lse_row.data(), delta.data(), dq.data(), w);
        }
        store_dq(s, 0, g.N, dq.data());
      }
    });
    return;
  }

  // Few long sequences: split each one's key tiles across threads. dK/dV rows belong to one
  // key tile; dQ gathers from all of them, so every thread sums into its own dQ buffer and
  // the buffers are added up afterwards.
  std::vector<T> delta(g.N), lse_row(g.N), dq(threads * g.N * g.D);
  for (int64_t s = 0; s < g.sequences(); ++s) {
    row_terms(g, out, grad_out, lse, s, delta.data(), lse_row.data());
    std::fill(dq.begin(), dq.end(), T(0));
    at::parallel_for(0, k_tiles, 1, [&](int64_t begin, int64_t end) {
      BackwardScratch<T> w(g);
      T* mine = dq.data() + at::get_thread_num() * g.N * g.D;
      for (int64_t kt = begin; kt < end; ++kt) {
        backward_key_tile(a, s, kt * kBwdKTile, grad_out.seq(s, g), lse_row.data(), delta.data(), mine, w);
      }
    });
    at::parallel_for(0, g.N, 256, [&](int64_t i0, int64_t i1) {
      for (int64_t t = 1; t < threads; ++t) {
        const T* other = dq.data() + t * g.N * g.D;
        for (int64_t e = i0 * g.D; e < i1 * g.D; ++e) dq[e] += other[e];
      }
      store_dq(s, i0, i1, dq.data());
    });
  }
}

// ---------------------------------------------------------------------------------------
// Dispatcher entry points.

at::ScalarType compute_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

bool empty_problem(const at::Tensor& q) {
  return q.size(0) == 0 || q.size(1) == 0 || q.size(2) == 0 || q.size(3) == 0;
}

void attention_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                           const at::Tensor& lse, double scale) {
  check_attention_forward(q, k, v, out, lse, scale, c10::DeviceType::CPU);
  if (empty_problem(q)) return;
  const auto compute = compute_type(q);
  const at::Tensor qr = readable(q, compute), kr = readable(k, compute), vr = readable(v, compute);
  Output o(out, compute);
  AT_DISPATCH_FLOATING_TYPES(compute, "stt_attention_forward_cpu", [&] {
    forward_kernel<scalar_t>(qr, kr, vr, o.buffer, lse, static_cast<scalar_t>(scale));
  });
  o.finish();
}

void attention_backward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                            const at::Tensor& grad_out, const at::Tensor& lse, double scale, const at::Tensor& grad_q,
                            const at::Tensor& grad_k, const at::Tensor& grad_v) {
  check_attention_backward(q, k, v, out, grad_out, lse, scale, grad_q, grad_k, grad_v, c10::DeviceType::CPU);
  if (empty_problem(q)) return;
  const auto compute = compute_type(q);
  const at::Tensor qr = readable(q, compute), kr = readable(k, compute), vr = readable(v, compute);
  const at::Tensor outr = readable(out, compute), gor = readable(grad_out, compute);
  Output dq(grad_q, compute), dk(grad_k, compute), dv(grad_v, compute);
  AT_DISPATCH_FLOATING_TYPES(compute, "stt_attention_backward_cpu", [&] {
    backward_kernel<scalar_t>(qr, kr, vr, outr, gor, lse, static_cast<scalar_t>(scale), dq.buffer, dk.buffer,
                              dv.buffer);
  });
  dq.finish();
  dk.finish();
  dv.finish();
}

}  // namespace
}  // namespace stt

TORCH_LIBRARY_IMPL(stt, CPU, m) {
  m.impl("_attention_forward", &stt::attention_forward_cpu);
  m.impl("_attention_backward", &stt::attention_backward_cpu);
}
