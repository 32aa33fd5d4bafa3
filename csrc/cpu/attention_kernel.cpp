// CPU kernels of stt::_attention_forward / _attention_backward (schemas in ../attention.cpp).
//
// Flash style: queries and keys are tiled and a tile of scores lives in a per-thread buffer,
// so memory is O(N) per sequence and no N x N matrix ever exists. q, k, v are read in place
// through their strides and packed tile by tile into contiguous float32 (float64 for float64
// inputs) buffers; float16/bfloat16 are converted while packing, so no upcast copy of a whole
// input exists, and outputs are rounded once, when a finished tile is stored.
//
// Tile products run on one of three engines (`Engine`):
// - in the forward under AVX2 with d >= 32, MKL's sgemm when torch's BLAS is MKL (`forward_engine`;
//   STT_CPU_SGEMM=0 turns it off, so the tests reach brgemm there too);
// - torch's cpublas::brgemm, oneDNN's JIT batch-reduce GEMM micro-kernel, for float32 on CPUs
//   with AVX2 (what oneDNN needs for it); it runs the 128 x 512 x 32 score tiles at close to
//   the FMA peak (about 110 GFLOP/s a core on Zen 4 against 75-90 for the at::vec kernel);
// - a register-blocked at::vec micro-kernel (rows of C += scalar(A) * vector rows of B), for
//   float64, for CPUs or builds without it, and for the products whose A operand is a
//   transposed tile (dV, dK), which brgemm (row-major A only) cannot read;
// For a head narrower than a vector the forward's scores and output, and the backward's dV and
// dK, are computed transposed, as row-major products the engine runs (`narrow_head`).
// bfloat16/float16 brgemm needs VNNI-packed B, which torch packs only on AMX CPUs; elsewhere it
// falls back to a plain loop slower than float32 brgemm, so 16-bit inputs use the float32 one.
//
// Tile sizes follow the L2 cache of the CPU running the kernel (stt/cpu_cache.h, read once).
#include "stt/cpu_vec.h"  // first: it selects the SIMD width of at::vec

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <dlfcn.h>

#include "stt/attention_checks.h"
#include "stt/cpu_cache.h"
#include "stt/online_softmax.h"

namespace stt {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// ---------------------------------------------------------------------------------------
// Vectorised row operations of the softmax.

template <typename T>
T row_max(const T* x, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  T best = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  if (n >= W) {
    Vec<T> m = Vec<T>::loadu(x);
    for (j = W; j + W <= n; j += W) m = at::vec::maximum(m, Vec<T>::loadu(x + j));
    best = at::vec::vec_reduce_all<T>([](const Vec<T>& a, const Vec<T>& b) { return at::vec::maximum(a, b); }, m);
  }
  for (; j < n; ++j) best = std::max(best, x[j]);
  return best;
}

// 2^f for f in [-1/2, 1/2]: the minimax polynomial of degree 5 (relative error 8e-8), Horner.
inline Vec<float> exp2_fraction(const Vec<float>& f) {
  Vec<float> p(1.3274837e-3f);
  for (const float c : {9.6755270e-3f, 5.5507183e-2f, 2.4022120e-1f, 6.9314694e-1f, 1.0000001f})
    p = at::vec::fmadd(p, f, Vec<float>(c));
  return p;
}

// exp(x - sub), the softmax's exponential, lane by lane, for float32 as 2^t, t = (x - sub)
// log2(e) in one FMA, split into an integer and a fraction in [-1/2, 1/2]: a degree-5
// polynomial (relative error 8e-8) for 2^fraction, times 2^integer (vscalefps under AVX-512;
// under AVX2 the integer shifted into the exponent bits, t clamped to [-127, 128] so that
// 2^-127 is 0 and 2^128 is inf). That is 9 (AVX-512) or 12 (AVX2) instructions to exp_u20's 20
// or so (the fast exponential of SDPA's CPU kernel, used for float64). The softmax costs as
// much as the products when the head is narrow: d = 8, 32 heads over 4,096 tokens, forward on
// one Zen 4 core 505 -> 415 ms. Rounding t costs about 1e-6 relative where it matters (t > -30),
// as much as the scores' own rounding. maxps/minps return their second operand when either is
// NaN: t second keeps a NaN score NaN.
template <typename T>
inline Vec<T> shifted_exp(const Vec<T>& x, const Vec<T>& sub) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    __m512 t = _mm512_fmadd_ps(x, log2e, _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), sub), log2e));
    t = _mm512_max_ps(_mm512_set1_ps(-150.f), t);
    const __m512 whole = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_scalef_ps(exp2_fraction(Vec<float>(_mm512_sub_ps(t, whole))), whole);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
    __m256 t = _mm256_fmadd_ps(x, log2e, _mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), sub), log2e));
    t = _mm256_min_ps(_mm256_set1_ps(128.f), _mm256_max_ps(_mm256_set1_ps(-127.f), t));
    const __m256 whole = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(whole), _mm256_set1_epi32(127));
    const Vec<float> p = exp2_fraction(Vec<float>(_mm256_sub_ps(t, whole)));
    return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23)));
  }
#endif
  return (x - sub).exp_u20();
}

// x <- exp(x - sub); returns the sum.
template <typename T>
T exp_sum_inplace(T* x, int64_t n, T sub) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> vsub(sub);
  Vec<T> acc(T(0));
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const Vec<T> e = shifted_exp(Vec<T>::loadu(x + j), vsub);
    e.store(x + j);
    acc = acc + e;
  }
  T sum = at::vec::vec_reduce_all<T>([](const Vec<T>& a, const Vec<T>& b) { return a + b; }, acc);
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

// ds <- factor * p * (ds - delta), with ds holding dP on entry.
template <typename T>
void softmax_grad_inplace(const T* p, T* ds, int64_t n, T delta, T factor) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> vd(delta), vf(factor);
  int64_t j = 0;
  for (; j + W <= n; j += W) (Vec<T>::loadu(p + j) * (Vec<T>::loadu(ds + j) - vd) * vf).store(ds + j);
  for (; j < n; ++j) ds[j] = softmax_grad<T>(p[j], ds[j], delta) * factor;
}

// ---------------------------------------------------------------------------------------
// The at::vec micro-kernel. C is row-major with a padded width n (a multiple of the vector
// width W); B is a packed row-major tile with the same padded width; A is read element by
// element through (row, column) strides, which covers A and A^T alike:
//
//   C[r][0:n] = alpha * sum_{l < L} A(r, l) * B[l][0:n]   (+ C[r][0:n] when accumulating)
//
// An R x NV block of C stays in vector registers while l streams: NV loads of B and R
// broadcasts of A feed R * NV FMAs. The block holds kAccumulators vectors: 12 of AVX2's 16
// registers, 24 of AVX-512's 32. With 3 rows of 4 AVX-512 vectors (the AVX2 shape) a 128 x
// 128 x 32 score tile ran at 75 GFLOP/s on Zen 4, with 6 rows at 90: more rows per loaded B
// vector is what the wider registers buy.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kAccumulators = 24;
#else
constexpr int kAccumulators = 12;
#endif

template <typename T, int R, int NV>
void micro_tile(int64_t L, const T* a, int64_t ars, int64_t acs, const T* b, int64_t ldb, T* c, int64_t ldc, T alpha,
                bool accumulate) {
  constexpr int64_t W = Vec<T>::size();
  Vec<T> acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec<T>(T(0));
  for (int64_t l = 0; l < L; ++l) {
    Vec<T> bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = Vec<T>::loadu(b + l * ldb + v * W);
    for (int r = 0; r < R; ++r) {
      const Vec<T> ar(a[r * ars + l * acs]);
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(ar, bv[v], acc[r][v]);
    }
  }
  const Vec<T> va(alpha);
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) {
      T* dst = c + r * ldc + v * W;
      Vec<T> out = acc[r][v] * va;
      if (accumulate) out = out + Vec<T>::loadu(dst);
      out.store(dst);
    }
  }
}

// The rows of one column block: R rows at a time, then the remaining rows in one smaller tile.
template <typename T, int R, int NV>
void column_block(int64_t m, int64_t L, const T* a, int64_t ars, int64_t acs, const T* b, int64_t ldb, T* c,
                  int64_t ldc, T alpha, bool accumulate) {
  int64_t r = 0;
  for (; r + R <= m; r += R)
    micro_tile<T, R, NV>(L, a + r * ars, ars, acs, b, ldb, c + r * ldc, ldc, alpha, accumulate);
  if constexpr (R > 1) {
    if (r < m) column_block<T, R - 1, NV>(m - r, L, a + r * ars, ars, acs, b, ldb, c + r * ldc, ldc, alpha, accumulate);
  }
}

// Column blocks of 4, 3, 2 or 1 vectors, each with as many rows as fill Acc accumulators.
// The short path's whole-sequence tiles (32 x 32 x 32 for T = 32) keep the 12-accumulator
// blocks it was tuned with; 24 is for the long tiles, where it measured faster.
template <typename T, int Acc = kAccumulators>
void tile_product(int64_t m, int64_t n, int64_t L, const T* a, int64_t ars, int64_t acs, const T* b, int64_t ldb, T* c,
                  int64_t ldc, T alpha, bool accumulate) {
  constexpr int64_t W = Vec<T>::size();
  constexpr int kRows1 = Acc > 12 ? 12 : 8;
  for (int64_t col = 0; col < n;) {
    const int64_t rest = n - col;
    if (rest % (4 * W) == 0) {
      column_block<T, Acc / 4, 4>(m, L, a, ars, acs, b + col, ldb, c + col, ldc, alpha, accumulate);
      col += 4 * W;
    } else if (rest >= 3 * W) {
      column_block<T, Acc / 3, 3>(m, L, a, ars, acs, b + col, ldb, c + col, ldc, alpha, accumulate);
      col += 3 * W;
    } else if (rest == 2 * W) {
      column_block<T, Acc / 2, 2>(m, L, a, ars, acs, b + col, ldb, c + col, ldc, alpha, accumulate);
      col += 2 * W;
    } else {
      column_block<T, kRows1, 1>(m, L, a, ars, acs, b + col, ldb, c + col, ldc, alpha, accumulate);
      col += W;
    }
  }
}

// A head narrower than a vector (d = 8 under AVX-512, as in the SST blocks of tiny-cpu): the
// d-wide products O = P V, dV = P^T dO and dK = dS^T Q would fill a fraction of each vector,
// one broadcast per FMA. The forward computes O^T = V^T P^T from transposed scores
// (forward_transposed) and the backward dV^T = dO^T P and dK^T = Q^T dS: d rows as long as a
// tile, on the engine of the other products. One Zen 4 core, d = 8, 32 heads over 4,096 tokens:
// forward 515 -> 370 ms, backward 1,100 -> 800 ms (the exponential below included).
template <typename T>
bool narrow_head(int64_t d) {
  return d < Vec<T>::size();
}

template <typename T>
int64_t padded(int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  return (n + W - 1) / W * W;
}

// MKL's Fortran sgemm (column-major).
using Sgemm = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                       const int*, const float*, const int*, const float*, float*, const int*);

// Which engine runs the products of row-major packed tiles.
struct Engine {
  bool brgemm;
  Sgemm sgemm = nullptr;  // before brgemm when set
};

// The sgemm of torch's own build when its BLAS is MKL, found at run time (torch exports the
// Fortran symbol, not its C++ gemm), else null: another BLAS could start threads of its own
// inside our parallel region, where MKL runs on the calling thread.
Sgemm mkl_sgemm() {
  static const Sgemm found = []() -> Sgemm {
    void* torch_cpu = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
    void* scope = torch_cpu != nullptr ? torch_cpu : RTLD_DEFAULT;
    if (dlsym(scope, "mkl_blas__sgemm") == nullptr) return nullptr;
    return reinterpret_cast<Sgemm>(dlsym(scope, "sgemm_"));
  }();
  return found;
}

Engine choose_engine(at::ScalarType compute) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  // torch.backends.mkldnn.enabled = False turns oneDNN off; cpublas::brgemm then falls back
  // to a GEMM call per tile, slower than the micro-kernel on these thin tiles.
  return Engine{compute == at::kFloat && at::globalContext().userEnabledMkldnn()};
#else
  (void)compute;
  return Engine{false};
#endif
}

// The forward's engine. Under AVX2, MKL's sgemm (its Zen kernels on an AMD CPU) ran the
// forward's products faster than brgemm on a Zen 3: spatial forward, 32 heads over 4,096
// tokens, d = 32, 2 threads, 846-920 against 993-1,041 ms (medians of 9, 3 A/B pairs). The backward
// keeps brgemm, where it wins by 1.24x against SDPA already; so do heads narrower than 32,
// whose thin products sgemm runs slowly (the SST block's d = 8: its forward 393 -> 800 ms).
// torch.backends.mkldnn.enabled = False turns both off, for the at::vec micro-kernel.
// STT_CPU_SGEMM=0 keeps brgemm, read at every call so a test can switch engines in-process.
Engine forward_engine(at::ScalarType compute, int64_t d) {
  Engine e = choose_engine(compute);
#if defined(CPU_CAPABILITY_AVX2)
  const char* sgemm_setting = std::getenv("STT_CPU_SGEMM");
  const bool sgemm_allowed = sgemm_setting == nullptr || std::strcmp(sgemm_setting, "0") != 0;
  if (e.brgemm && d >= 32 && sgemm_allowed) e.sgemm = mkl_sgemm();
#else
  (void)d;
#endif
  return e;
}

// C[0:m][0:n] (+)= A[0:m][0:k] B[0:k][0:n], all row-major with leading dimensions. The
// micro-kernel computes up to the next multiple of the vector width: B and C must be padded
// that far (their padding columns of B zero, so those of C are too).
template <typename T>
void matmul(const Engine& e, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
            int64_t ldc, bool accumulate) {
  if constexpr (std::is_same_v<T, float>) {
    if (e.sgemm != nullptr) {
      // Row-major C = A B is column-major C^T = B^T A^T.
      const int cols = static_cast<int>(n), rows = static_cast<int>(m), inner = static_cast<int>(k);
      const int ldb_ = static_cast<int>(ldb), lda_ = static_cast<int>(lda), ldc_ = static_cast<int>(ldc);
      const float one = 1.f, beta = accumulate ? 1.f : 0.f;
      e.sgemm("N", "N", &cols, &rows, &inner, &one, b, &ldb_, a, &lda_, &beta, c, &ldc_);
      return;
    }
    if (e.brgemm) {
      at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c);
      return;
    }
  }
  tile_product<T>(m, padded<T>(n), k, a, lda, 1, b, ldb, c, ldc, T(1), accumulate);
}

// ---------------------------------------------------------------------------------------
// Packing: strided storage-type (S) rows into contiguous compute-type (T) tiles.

// Packs rows [0, rows) x [0, d) of a strided matrix times `factor`, row-major with width dp
// (zero padding). Rows are short: an inline vector copy, where std::copy's memmove call per
// row cost as much as the copy itself.
template <typename S, typename T>
void pack_rows(const S* src, int64_t s_row, int64_t s_col, int64_t rows, int64_t d, T* dst, int64_t dp,
               T factor = T(1)) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> f(factor);
  for (int64_t j = 0; j < rows; ++j) {
    const S* in = src + j * s_row;
    T* out = dst + j * dp;
    int64_t c = 0;
    if constexpr (std::is_same_v<S, T>) {
      if (s_col == 1) {
        for (; c + W <= d; c += W) (Vec<T>::loadu(in + c) * f).store(out + c);
      }
    }
    if (s_col == 1) {
      for (; c < d; ++c) out[c] = static_cast<T>(in[c]) * factor;
    } else {
      for (; c < d; ++c) out[c] = static_cast<T>(in[c * s_col]) * factor;
    }
    std::fill(out + d, out + dp, T(0));
  }
}

// Packs the transpose times `factor`: dst[c][j] = factor * src[j][c], width np (padded key
// count, zero columns). Contiguous same-type rows go through at::vec's 8 x 8 register
// transposes, the rest element by element, row by row: the rows of one sequence can be far
// apart in the packed projection, and reading each row's elements together touches each of
// its pages once.
template <typename S, typename T>
void pack_transposed(const S* src, int64_t s_row, int64_t s_col, int64_t rows, int64_t d, T* dst, int64_t np,
                     T factor = T(1)) {
  constexpr int64_t B = 8;
  int64_t rows_b = 0, d_b = 0;
  if constexpr (std::is_same_v<S, T>) {
    if (s_col == 1) {
      rows_b = rows / B * B;
      d_b = d / B * B;
      for (int64_t j = 0; j < rows_b; j += B) {
        for (int64_t c = 0; c < d_b; c += B)
          at::vec::transpose_mxn<T, B, B>(src + j * s_row + c, s_row, dst + c * np + j, np);
      }
      if (factor != T(1)) {
        for (int64_t c = 0; c < d_b; ++c) scale_inplace(dst + c * np, rows_b, factor);
      }
    }
  }
  for (int64_t j = 0; j < rows; ++j) {
    const S* in = src + j * s_row;
    for (int64_t c = j < rows_b ? d_b : 0; c < d; ++c) dst[c * np + j] = static_cast<T>(in[c * s_col]) * factor;
  }
  for (int64_t c = 0; c < d; ++c) std::fill(dst + c * np + rows, dst + (c + 1) * np, T(0));
}

// dst[c * sd] = factor * src[c] for c < d, rounded to the storage type.
template <typename S, typename T>
void store_row(S* dst, int64_t sd, const T* src, int64_t d, T factor) {
  int64_t c = 0;
  if constexpr (std::is_same_v<S, T>) {
    if (sd == 1) {
      constexpr int64_t W = Vec<T>::size();
      const Vec<T> f(factor);
      for (; c + W <= d; c += W) (Vec<T>::loadu(src + c) * f).store(dst + c);
    }
  }
  for (; c < d; ++c) dst[c * sd] = static_cast<S>(src[c] * factor);
}

// dst[j * s_row + c * s_col] = src[c * ld + j] for j < rows, c < d: a transposed (d x rows)
// tile stored as rows, rounded to the storage type.
template <typename S, typename T>
void store_columns(S* dst, int64_t s_row, int64_t s_col, const T* src, int64_t ld, int64_t rows, int64_t d) {
  for (int64_t j = 0; j < rows; ++j) {
    for (int64_t c = 0; c < d; ++c) dst[j * s_row + c * s_col] = static_cast<S>(src[c * ld + j]);
  }
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

  explicit View(const at::Tensor& t)
      : data(static_cast<T*>(t.data_ptr())),
        sb(t.stride(0)),
        sz(t.stride(1)),
        sn(t.stride(2)),
        sh(t.stride(3)),
        sd(t.stride(4)) {}

  // First element of sequence s.
  T* seq(int64_t s, const Geometry& g) const {
    const int64_t h = s % g.H, bz = s / g.H, z = bz % g.Z, b = bz / g.Z;
    return data + b * sb + z * sz + h * sh;
  }
};

// lse (B, Z, heads, N) in the compute type T (float64 for float64 inputs) with any strides.
template <typename T>
struct LseView {
  T* data;
  int64_t sb, sz, sh, sn;

  explicit LseView(const at::Tensor& t)
      : data(t.data_ptr<T>()), sb(t.stride(0)), sz(t.stride(1)), sh(t.stride(2)), sn(t.stride(3)) {}

  T* seq(int64_t s, const Geometry& g) const {
    const int64_t h = s % g.H, bz = s / g.H, z = bz % g.Z, b = bz / g.Z;
    return data + b * sb + z * sz + h * sh;
  }
};

// ---------------------------------------------------------------------------------------
// Tile sizes, from the L2 cache of this CPU.
//
// Forward: the packed key and value tiles (2 x nk x dp) take a quarter of L2, so they stay
// there while the query tiles of a sequence stream past; the score tile, the packed query tile
// and the output accumulator (mq x (nk + 2 dp)) another half. Backward: the five key-side
// tiles (K^T, V^T, K, dK, dV: 5 x nk x dp) a quarter, the query-side ones (Q, dO, P, dS:
// mq x 2 (dp + nk)) another. Powers of two, at most 512 keys and 256 queries (longer tiles
// gain nothing once a product runs at the FMA peak) and at least 16 of each.
struct Tiles {
  int64_t q, k;
};

int64_t fitting_power_of_two(int64_t budget_elems, int64_t per_row, int64_t lo, int64_t hi) {
  int64_t n = hi;
  while (n > lo && n * per_row > budget_elems) n /= 2;
  return n;
}

template <typename T>
Tiles forward_tiles(const Geometry& g) {
  const int64_t l2 = cpu_cache_sizes().l2 / static_cast<int64_t>(sizeof(T)), dp = padded<T>(g.D);
  const int64_t k = fitting_power_of_two(l2 / 4, 2 * dp, 16, 512);
  const int64_t q = fitting_power_of_two(l2 / 2, k + 2 * dp, 16, 256);
  return Tiles{q, k};
}

template <typename T>
Tiles backward_tiles(const Geometry& g) {
  const int64_t l2 = cpu_cache_sizes().l2 / static_cast<int64_t>(sizeof(T)), dp = padded<T>(g.D);
  const int64_t k = fitting_power_of_two(l2 / 4, 5 * dp, 16, 512);
  const int64_t q = fitting_power_of_two(l2 / 4, 2 * (dp + padded<T>(k)), 16, 256);
  return Tiles{q, k};
}

// The most a thread spends on a whole sequence's packed K^T and V in the forward.
constexpr int64_t kWholeSequenceBytes = 16 << 20;

// Up to this length a sequence is one tile of transposed scores (64 KiB in float32).
constexpr int64_t kShortSequence = 128;

// at::parallel_for splits a range evenly up front, so a thread that loses its core for a while
// (a shared machine; sequences of uneven cost) holds up the whole call. Here every thread takes
// blocks of about 1/32 of its share from a shared counter until none are left; body(begin,
// end) runs once per block, on the thread that took it.
template <typename Body>
void balanced_parallel_for(int64_t n, const Body& body) {
  const int64_t threads = at::get_num_threads();
  const int64_t block = std::max<int64_t>(1, n / (threads * 32));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t b = next.fetch_add(block); b < n; b = next.fetch_add(block)) body(b, std::min(n, b + block));
  });
}

// ---------------------------------------------------------------------------------------
// Forward.

// Whole-sequence forward for N <= kShortSequence (every temporal sequence in training).
//
// A task takes a block of consecutive sequences and first copies their q, k, v rows into
// contiguous buffers, time step by time step: in the packed (B, T, H, W, 3, heads, d) layout
// the rows a block needs at one time step are one contiguous run, so the copies stream at
// memory bandwidth where per-sequence reads (rows a slice apart) stall on every row. The
// outputs go back the same way.
//
// Scores are computed transposed, S^T = K Q^T: a query is a column, so its max, exponentials
// and sum are vertical vector operations over the key rows. Row-wise tiles would pay two
// horizontal reductions and a call per query row, as much as the exponentials for T = 32.
template <typename T>
struct ShortForwardScratch {
  int64_t n, np, dp;
  std::vector<T> q, k, v, o, qt, st, max, sum;

  ShortForwardScratch(const Geometry& g, int64_t block)
      : n(g.N),
        np(padded<T>(g.N)),
        dp(padded<T>(g.D)),
        q(block * n * dp),
        k(block * n * dp),
        v(block * n * dp),
        o(block * n * dp),
        qt(g.D * np),
        st(n * np),
        max(np),
        sum(np) {}

  T* rows(std::vector<T>& buf, int64_t local) { return buf.data() + local * n * dp; }
};

// Sequences per block: their q, k, v and output rows fill about a quarter of L2 (16 sequences
// of T = 32, d = 32 on a 1 MiB L2, the block this path was tuned with).
template <typename T>
int64_t short_block(const Geometry& g) {
  const int64_t bytes = 4 * g.N * padded<T>(g.D) * static_cast<int64_t>(sizeof(T));
  return std::max<int64_t>(1, cpu_cache_sizes().l2 / 4 / bytes);
}

// P^T <- exp(S^T - max) for every column of an n x np tile of transposed scores (a query per
// column), the online softmax of a block of n keys: each column's max and sum move on to the
// block, and alpha gets the factor exp(old max - new max) that moves its output accumulator
// too. The first block (first = true) sets max and sum and writes no alpha.
template <typename T>
void column_softmax(T* st, int64_t n, int64_t np, T* max, T* sum, T* alpha, bool first) {
  constexpr int64_t W = Vec<T>::size();
  for (int64_t i = 0; i < np; i += W) {
    const Vec<T> old = first ? Vec<T>::loadu(st + i) : Vec<T>::loadu(max + i);
    Vec<T> m = old;
    for (int64_t j = first ? 1 : 0; j < n; ++j) m = at::vec::maximum(m, Vec<T>::loadu(st + j * np + i));
    Vec<T> acc(T(0));
    for (int64_t j = 0; j < n; ++j) {
      const Vec<T> e = shifted_exp(Vec<T>::loadu(st + j * np + i), m);
      e.store(st + j * np + i);
      acc = acc + e;
    }
    m.store(max + i);
    if (first) {
      acc.store(sum + i);
    } else {
      const Vec<T> a = shifted_exp(old, m);
      a.store(alpha + i);
      (Vec<T>::loadu(sum + i) * a + acc).store(sum + i);
    }
  }
}

// Softmax-weighted values of one sequence whose rows are in the scratch buffers (row stride dp).
template <typename T>
void short_sequence(ShortForwardScratch<T>& w, int64_t local, int64_t d, T scale) {
  const int64_t n = w.n, np = w.np, dp = w.dp;
  pack_transposed(w.rows(w.q, local), dp, int64_t(1), n, d, w.qt.data(), np);
  tile_product<T, 12>(n, np, d, w.rows(w.k, local), dp, 1, w.qt.data(), np, w.st.data(), np, scale, false);

  column_softmax(w.st.data(), n, np, w.max.data(), w.sum.data(), static_cast<T*>(nullptr), true);
  tile_product<T, 12>(n, dp, n, w.st.data(), 1, np, w.rows(w.v, local), dp, w.rows(w.o, local), dp, T(1), false);
  T* o = w.rows(w.o, local);
  for (int64_t i = 0; i < n; ++i) {
    const OnlineSoftmaxRow<T> row{w.max[i], w.sum[i]};
    scale_inplace(o + i * dp, d, online_softmax_inv_sum(row));
  }
}

template <typename S, typename T>
void forward_short_block(const View<const S>& q, const View<const S>& k, const View<const S>& v, const View<S>& out,
                         const LseView<T>& lse, const Geometry& g, int64_t s0, int64_t s1, T scale,
                         ShortForwardScratch<T>& w) {
  const int64_t dp = w.dp;
  for (int64_t t = 0; t < g.N; ++t) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t row = ((s - s0) * g.N + t) * dp;
      pack_rows(q.seq(s, g) + t * q.sn, q.sn, q.sd, 1, g.D, w.q.data() + row, dp);
      pack_rows(k.seq(s, g) + t * k.sn, k.sn, k.sd, 1, g.D, w.k.data() + row, dp);
      pack_rows(v.seq(s, g) + t * v.sn, v.sn, v.sd, 1, g.D, w.v.data() + row, dp);
    }
  }
  for (int64_t s = s0; s < s1; ++s) {
    short_sequence(w, s - s0, g.D, scale);
    T* ls = lse.seq(s, g);
    for (int64_t i = 0; i < g.N; ++i) ls[i * lse.sn] = online_softmax_lse(OnlineSoftmaxRow<T>{w.max[i], w.sum[i]});
  }
  for (int64_t t = 0; t < g.N; ++t) {
    for (int64_t s = s0; s < s1; ++s) {
      store_row(out.seq(s, g) + t * out.sn, out.sd, w.o.data() + ((s - s0) * g.N + t) * dp, g.D, T(1));
    }
  }
}

// Long sequences with a narrow head (narrow_head): the forward transposed, S^T = K Q^T with a
// query per column, so the online softmax is column_softmax's vertical vector operations, and
// O^T = V^T P^T has d rows as long as the query tile where O = P V would be d wide (half of
// every AVX-512 vector for d = 8, one broadcast per FMA).
template <typename S, typename T>
void forward_transposed(const View<const S>& q, const View<const S>& k, const View<const S>& v, const View<S>& out,
                        const LseView<T>& lse, const Geometry& g, T scale) {
  const Engine engine = forward_engine(c10::CppTypeToScalarType<T>::value, g.D);
  const Tiles tiles = forward_tiles<T>(g);
  const int64_t q_tiles = (g.N + tiles.q - 1) / tiles.q, n_pad = padded<T>(g.N), dp = padded<T>(g.D);
  // As forward_kernel: a thread packs a sequence's K and V^T once for all its query tiles.
  const bool whole = 2 * n_pad * dp * static_cast<int64_t>(sizeof(T)) <= kWholeSequenceBytes;
  balanced_parallel_for(g.sequences() * q_tiles, [&](int64_t begin, int64_t end) {
    const int64_t mqp_max = padded<T>(std::min(tiles.q, g.N)), nk_max = std::min(tiles.k, g.N);
    const int64_t kv = whole ? n_pad : padded<T>(nk_max);
    std::vector<T> st(nk_max * mqp_max), qt(g.D * mqp_max), ot(g.D * mqp_max), kp(kv * dp), vt(g.D * kv);
    std::vector<T> max(mqp_max), sum(mqp_max), alpha(mqp_max);
    int64_t packed_sequence = -1;

    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / q_tiles, q0 = (task % q_tiles) * tiles.q, mq = std::min(tiles.q, g.N - q0);
      const int64_t mqp = padded<T>(mq);
      const S* ks = k.seq(s, g);
      const S* vs = v.seq(s, g);
      if (whole && s != packed_sequence) {
        pack_rows(ks, k.sn, k.sd, g.N, g.D, kp.data(), dp);
        pack_transposed(vs, v.sn, v.sd, g.N, g.D, vt.data(), n_pad);
        packed_sequence = s;
      }
      // The scale goes into the packed queries (brgemm has no alpha); their zero padding
      // columns are queries of their own, computed and never stored.
      pack_transposed(q.seq(s, g) + q0 * q.sn, q.sn, q.sd, mq, g.D, qt.data(), mqp, scale);

      for (int64_t k0 = 0; k0 < g.N; k0 += tiles.k) {
        const int64_t nk = std::min(tiles.k, g.N - k0);
        const int64_t ldv = whole ? n_pad : padded<T>(nk);
        if (!whole) {
          pack_rows(ks + k0 * k.sn, k.sn, k.sd, nk, g.D, kp.data(), dp);
          pack_transposed(vs + k0 * v.sn, v.sn, v.sd, nk, g.D, vt.data(), ldv);
        }
        const T* k_tile = whole ? kp.data() + k0 * dp : kp.data();
        const T* vt_tile = whole ? vt.data() + k0 : vt.data();
        matmul(engine, nk, mqp, g.D, k_tile, dp, qt.data(), mqp, st.data(), mqp, false);
        column_softmax(st.data(), nk, mqp, max.data(), sum.data(), alpha.data(), k0 == 0);
        if (k0 > 0) {
          constexpr int64_t W = Vec<T>::size();
          for (int64_t c = 0; c < g.D; ++c) {
            T* row = ot.data() + c * mqp;
            for (int64_t i = 0; i < mqp; i += W)
              (Vec<T>::loadu(row + i) * Vec<T>::loadu(alpha.data() + i)).store(row + i);
          }
        }
        matmul(engine, g.D, mqp, nk, vt_tile, ldv, st.data(), mqp, ot.data(), mqp, k0 > 0);
      }

      S* os = out.seq(s, g) + q0 * out.sn;
      T* ls = lse.seq(s, g) + q0 * lse.sn;
      for (int64_t i = 0; i < mq; ++i) {
        const OnlineSoftmaxRow<T> row{max[i], sum[i]};
        const T inv = online_softmax_inv_sum(row);
        for (int64_t c = 0; c < g.D; ++c) os[i * out.sn + c * out.sd] = static_cast<S>(ot[c * mqp + i] * inv);
        ls[i * lse.sn] = online_softmax_lse(row);
      }
    }
  });
}

template <typename S, typename T>
void forward_kernel(const at::Tensor& q_t, const at::Tensor& k_t, const at::Tensor& v_t, const at::Tensor& out_t,
                    const at::Tensor& lse_t, T scale) {
  const Geometry g{q_t.size(0), q_t.size(1), q_t.size(2), q_t.size(3), q_t.size(4)};
  const View<const S> q(q_t), k(k_t), v(v_t);
  const View<S> out(out_t);
  const LseView<T> lse(lse_t);
  const int64_t dp = padded<T>(g.D);

  if (g.N <= kShortSequence) {
    const int64_t block = short_block<T>(g), blocks = (g.sequences() + block - 1) / block;
    balanced_parallel_for(blocks, [&](int64_t begin, int64_t end) {
      ShortForwardScratch<T> w(g, block);
      for (int64_t b = begin; b < end; ++b) {
        forward_short_block(q, k, v, out, lse, g, b * block, std::min(g.sequences(), (b + 1) * block), scale, w);
      }
    });
    return;
  }

  if (narrow_head<T>(g.D)) {
    forward_transposed(q, k, v, out, lse, g, scale);
    return;
  }
  const Engine engine = forward_engine(c10::CppTypeToScalarType<T>::value, g.D);
  const Tiles tiles = forward_tiles<T>(g);
  const int64_t q_tiles = (g.N + tiles.q - 1) / tiles.q, n_pad = padded<T>(g.N);
  // Consecutive tasks mostly share a sequence (tasks are numbered sequence-major and a thread
  // takes a run of them), so a thread packs a sequence's K^T and V whole, once, and its query
  // tiles all read them, instead of repeating every transpose once per query tile. Very long
  // sequences, whose packed keys would not fit the budget, pack tile by tile instead.
  const bool whole = 2 * n_pad * dp * static_cast<int64_t>(sizeof(T)) <= kWholeSequenceBytes;
  balanced_parallel_for(g.sequences() * q_tiles, [&](int64_t begin, int64_t end) {
    const int64_t mq_max = std::min(tiles.q, g.N), np_max = padded<T>(std::min(tiles.k, g.N));
    const int64_t kv_cols = whole ? n_pad : np_max;
    std::vector<T> scores(mq_max * np_max), qp(mq_max * dp), acc(mq_max * dp), kt(g.D * kv_cols), vp(kv_cols * dp);
    std::vector<OnlineSoftmaxRow<T>> rows(mq_max);
    int64_t packed_sequence = -1;

    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / q_tiles, q0 = (task % q_tiles) * tiles.q, mq = std::min(tiles.q, g.N - q0);
      const S* ks = k.seq(s, g);
      const S* vs = v.seq(s, g);
      if (whole && s != packed_sequence) {
        pack_transposed(ks, k.sn, k.sd, g.N, g.D, kt.data(), n_pad);
        pack_rows(vs, v.sn, v.sd, g.N, g.D, vp.data(), dp);
        packed_sequence = s;
      }
      // The scale goes into the packed queries: brgemm has no alpha.
      pack_rows(q.seq(s, g) + q0 * q.sn, q.sn, q.sd, mq, g.D, qp.data(), dp, scale);
      std::fill(rows.begin(), rows.begin() + mq, online_softmax_init<T>());

      for (int64_t k0 = 0; k0 < g.N; k0 += tiles.k) {
        const int64_t nk = std::min(tiles.k, g.N - k0), np = padded<T>(nk);
        const T* kt_tile = whole ? kt.data() + k0 : kt.data();
        const T* v_tile = whole ? vp.data() + k0 * dp : vp.data();
        const int64_t ldk = whole ? n_pad : np;
        if (!whole) {
          pack_transposed(ks + k0 * k.sn, k.sn, k.sd, nk, g.D, kt.data(), np);
          pack_rows(vs + k0 * v.sn, v.sn, v.sd, nk, g.D, vp.data(), dp);
        }
        matmul(engine, mq, nk, g.D, qp.data(), dp, kt_tile, ldk, scores.data(), np, false);
        for (int64_t i = 0; i < mq; ++i) {
          T* row = scores.data() + i * np;
          const T new_max = online_softmax_new_max(rows[i], row_max(row, nk));
          const T alpha = online_softmax_update(rows[i], new_max, exp_sum_inplace(row, nk, new_max));
          if (k0 > 0 && alpha != T(1)) scale_inplace(acc.data() + i * dp, dp, alpha);
        }
        matmul(engine, mq, dp, nk, scores.data(), np, v_tile, dp, acc.data(), dp, k0 > 0);
      }

      S* os = out.seq(s, g) + q0 * out.sn;
      T* ls = lse.seq(s, g) + q0 * lse.sn;
      for (int64_t i = 0; i < mq; ++i) {
        store_row(os + i * out.sn, out.sd, acc.data() + i * dp, g.D, online_softmax_inv_sum(rows[i]));
        ls[i * lse.sn] = online_softmax_lse(rows[i]);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// Backward: for a key tile, loop over all query tiles, recompute P = exp(S - lse), and
// accumulate dV = P^T dO, dK = scale * dS^T Q in the tile's own buffers (so parallel tasks
// own disjoint rows of grad_k / grad_v) and dQ += scale * dS K into a caller-owned buffer.

template <typename S, typename T>
struct BackwardArgs {
  Geometry g;
  View<const S> q, k, v, grad_out;
  View<S> grad_k, grad_v;
  T scale;
  Tiles tiles;
  Engine engine;
};

// For a narrow head dk and dv hold dK^T and dV^T (d x np), and qt and dot the query tile's
// Q^T and dO^T (d x mqp).
template <typename T>
struct BackwardScratch {
  int64_t dp, mqp;
  bool narrow;
  std::vector<T> kt, vt, kp, qp, dop, qt, dot, p, ds, dk, dv;

  BackwardScratch(const Geometry& g, const Tiles& tiles) : dp(padded<T>(g.D)), narrow(narrow_head<T>(g.D)) {
    const int64_t mq = std::min(tiles.q, g.N), nk = std::min(tiles.k, g.N), np = padded<T>(nk);
    const int64_t key_side = narrow ? g.D * np : nk * dp;
    mqp = padded<T>(mq);
    kt.resize(g.D * np);
    vt.resize(g.D * np);
    kp.resize(nk * dp);
    qp.resize(mq * dp);
    dop.resize(mq * dp);
    if (narrow) {
      qt.resize(g.D * mqp);
      dot.resize(g.D * mqp);
    }
    p.resize(mq * np);
    ds.resize(mq * np);
    dk.resize(key_side);
    dv.resize(key_side);
  }
};

// dq_acc: N rows of width dp.
template <typename S, typename T>
void backward_key_tile(const BackwardArgs<S, T>& a, int64_t s, int64_t k0, const T* lse_seq, const T* delta_seq,
                       T* dq_acc, BackwardScratch<T>& w) {
  const Geometry& g = a.g;
  const int64_t dp = w.dp, tq = a.tiles.q;
  const int64_t nk = std::min(a.tiles.k, g.N - k0), np = padded<T>(nk);
  const S* qs = a.q.seq(s, g);
  const S* dos = a.grad_out.seq(s, g);
  const S* ks = a.k.seq(s, g) + k0 * a.k.sn;
  const S* vs = a.v.seq(s, g) + k0 * a.v.sn;
  // S = Q (scale K)^T; dS carries the scale too, so dQ = dS K and dK = dS^T Q need no alpha.
  pack_transposed(ks, a.k.sn, a.k.sd, nk, g.D, w.kt.data(), np, a.scale);
  pack_transposed(vs, a.v.sn, a.v.sd, nk, g.D, w.vt.data(), np);
  pack_rows(ks, a.k.sn, a.k.sd, nk, g.D, w.kp.data(), dp);

  for (int64_t q0 = 0; q0 < g.N; q0 += tq) {
    const int64_t mq = std::min(tq, g.N - q0);
    pack_rows(qs + q0 * a.q.sn, a.q.sn, a.q.sd, mq, g.D, w.qp.data(), dp);
    pack_rows(dos + q0 * a.grad_out.sn, a.grad_out.sn, a.grad_out.sd, mq, g.D, w.dop.data(), dp);

    matmul(a.engine, mq, nk, g.D, w.qp.data(), dp, w.kt.data(), np, w.p.data(), np, false);
    for (int64_t i = 0; i < mq; ++i) {
      // P = exp(S - lse); the row sum exp_sum_inplace returns is not needed here.
      exp_sum_inplace(w.p.data() + i * np, nk, lse_seq[q0 + i]);
    }
    if (w.narrow) {
      // dV^T = dO^T P: d rows as long as the key tile, where dV = P^T dO would be d wide.
      pack_transposed(w.qp.data(), dp, int64_t(1), mq, g.D, w.qt.data(), w.mqp);
      pack_transposed(w.dop.data(), dp, int64_t(1), mq, g.D, w.dot.data(), w.mqp);
      matmul(a.engine, g.D, nk, mq, w.dot.data(), w.mqp, w.p.data(), np, w.dv.data(), np, q0 > 0);
    } else {
      tile_product<T>(nk, dp, mq, w.p.data(), 1, np, w.dop.data(), dp, w.dv.data(), dp, T(1), q0 > 0);
    }
    matmul(a.engine, mq, nk, g.D, w.dop.data(), dp, w.vt.data(), np, w.ds.data(), np, false);
    for (int64_t i = 0; i < mq; ++i) {
      softmax_grad_inplace(w.p.data() + i * np, w.ds.data() + i * np, nk, delta_seq[q0 + i], a.scale);
    }
    matmul(a.engine, mq, dp, nk, w.ds.data(), np, w.kp.data(), dp, dq_acc + q0 * dp, dp, true);
    if (w.narrow) {
      matmul(a.engine, g.D, nk, mq, w.qt.data(), w.mqp, w.ds.data(), np, w.dk.data(), np, q0 > 0);
    } else {
      tile_product<T>(nk, dp, mq, w.ds.data(), 1, np, w.qp.data(), dp, w.dk.data(), dp, T(1), q0 > 0);
    }
  }

  S* dks = a.grad_k.seq(s, g) + k0 * a.grad_k.sn;
  S* dvs = a.grad_v.seq(s, g) + k0 * a.grad_v.sn;
  if (w.narrow) {
    store_columns(dks, a.grad_k.sn, a.grad_k.sd, w.dk.data(), np, nk, g.D);
    store_columns(dvs, a.grad_v.sn, a.grad_v.sd, w.dv.data(), np, nk, g.D);
    return;
  }
  for (int64_t j = 0; j < nk; ++j) {
    store_row(dks + j * a.grad_k.sn, a.grad_k.sd, w.dk.data() + j * dp, g.D, T(1));
    store_row(dvs + j * a.grad_v.sn, a.grad_v.sd, w.dv.data() + j * dp, g.D, T(1));
  }
}

// delta_i = rowsum(dO_i * O_i) and the saved lse of one sequence, in the compute type.
template <typename S, typename T>
void row_terms(const Geometry& g, const View<const S>& out, const View<const S>& grad_out, const LseView<T>& lse,
               int64_t s, T* delta, T* lse_row) {
  const S* os = out.seq(s, g);
  const S* dos = grad_out.seq(s, g);
  const T* ls = lse.seq(s, g);
  for (int64_t i = 0; i < g.N; ++i) {
    const S* o = os + i * out.sn;
    const S* d = dos + i * grad_out.sn;
    T acc = 0;
    for (int64_t c = 0; c < g.D; ++c) acc += static_cast<T>(o[c * out.sd]) * static_cast<T>(d[c * grad_out.sd]);
    delta[i] = acc;
    lse_row[i] = ls[i * lse.sn];
  }
}

template <typename S, typename T>
void backward_kernel(const at::Tensor& q_t, const at::Tensor& k_t, const at::Tensor& v_t, const at::Tensor& out_t,
                     const at::Tensor& grad_out_t, const at::Tensor& lse_t, T scale, const at::Tensor& grad_q_t,
                     const at::Tensor& grad_k_t, const at::Tensor& grad_v_t) {
  const Geometry g{q_t.size(0), q_t.size(1), q_t.size(2), q_t.size(3), q_t.size(4)};
  const View<const S> out(out_t);
  const View<S> grad_q(grad_q_t);
  const LseView<T> lse(lse_t);
  const BackwardArgs<S, T> a{g,
                             View<const S>(q_t),
                             View<const S>(k_t),
                             View<const S>(v_t),
                             View<const S>(grad_out_t),
                             View<S>(grad_k_t),
                             View<S>(grad_v_t),
                             scale,
                             backward_tiles<T>(g),
                             choose_engine(c10::CppTypeToScalarType<T>::value)};
  const int64_t tk = a.tiles.k, k_tiles = (g.N + tk - 1) / tk;
  const int64_t threads = at::get_num_threads();
  const int64_t dp = padded<T>(g.D);

  auto store_dq = [&](int64_t s, int64_t i0, int64_t i1, const T* dq) {
    S* dqs = grad_q.seq(s, g);
    for (int64_t i = i0; i < i1; ++i) store_row(dqs + i * grad_q.sn, grad_q.sd, dq + i * dp, g.D, T(1));
  };

  if (g.sequences() >= 2 * threads) {
    // Enough sequences to keep every thread busy: a task owns whole sequences, so dQ, dK and
    // dV are all private to it.
    balanced_parallel_for(g.sequences(), [&](int64_t begin, int64_t end) {
      BackwardScratch<T> w(g, a.tiles);
      std::vector<T> delta(g.N), lse_row(g.N), dq(g.N * dp);
      for (int64_t s = begin; s < end; ++s) {
        row_terms(g, out, a.grad_out, lse, s, delta.data(), lse_row.data());
        std::fill(dq.begin(), dq.end(), T(0));
        for (int64_t kt = 0; kt < k_tiles; ++kt) {
          backward_key_tile(a, s, kt * tk, lse_row.data(), delta.data(), dq.data(), w);
        }
        store_dq(s, 0, g.N, dq.data());
      }
    });
    return;
  }

  // Few long sequences: split each one's key tiles across threads. dK/dV rows belong to one
  // key tile; dQ gathers from all of them, so each fixed group of consecutive key tiles sums
  // into its own dQ buffer and the buffers are added up in group order afterwards: the sums
  // run in one order whichever thread takes a group (the backward is deterministic).
  const int64_t groups = std::min(threads, k_tiles);
  std::vector<T> delta(g.N), lse_row(g.N), dq(groups * g.N * dp);
  for (int64_t s = 0; s < g.sequences(); ++s) {
    row_terms(g, out, a.grad_out, lse, s, delta.data(), lse_row.data());
    std::fill(dq.begin(), dq.end(), T(0));
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      BackwardScratch<T> w(g, a.tiles);
      for (int64_t group = begin; group < end; ++group) {
        T* mine = dq.data() + group * g.N * dp;
        for (int64_t kt = group * k_tiles / groups; kt < (group + 1) * k_tiles / groups; ++kt) {
          backward_key_tile(a, s, kt * tk, lse_row.data(), delta.data(), mine, w);
        }
      }
    });
    at::parallel_for(0, g.N, 256, [&](int64_t i0, int64_t i1) {
      for (int64_t group = 1; group < groups; ++group) {
        const T* other = dq.data() + group * g.N * dp;
        for (int64_t e = i0 * dp; e < i1 * dp; ++e) dq[e] += other[e];
      }
      store_dq(s, i0, i1, dq.data());
    });
  }
}

// ---------------------------------------------------------------------------------------
// Dispatcher entry points. float16/bfloat16 compute in float32 (at::opmath_type).

bool empty_problem(const at::Tensor& q) { return q.size(0) == 0 || q.size(1) == 0 || q.size(2) == 0 || q.size(3) == 0; }

void attention_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                           const at::Tensor& lse, double scale) {
  check_attention_forward(q, k, v, out, lse, scale, c10::DeviceType::CPU);
  if (empty_problem(q)) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "stt_attention_forward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, T>(q, k, v, out, lse, static_cast<T>(scale));
  });
}

void attention_backward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                            const at::Tensor& grad_out, const at::Tensor& lse, double scale, const at::Tensor& grad_q,
                            const at::Tensor& grad_k, const at::Tensor& grad_v) {
  check_attention_backward(q, k, v, out, grad_out, lse, scale, grad_q, grad_k, grad_v, c10::DeviceType::CPU);
  if (empty_problem(q)) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "stt_attention_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t, T>(q, k, v, out, grad_out, lse, static_cast<T>(scale), grad_q, grad_k, grad_v);
  });
}

}  // namespace
}  // namespace stt

TORCH_LIBRARY_IMPL(stt, CPU, m) {
  m.impl("_attention_forward", &stt::attention_forward_cpu);
  m.impl("_attention_backward", &stt::attention_backward_cpu);
}
