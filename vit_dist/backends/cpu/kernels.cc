// Fused float32 kernels for MindSpore's CPU backend, called as AOT custom ops (cpu_kernels.py).
// Every function has MindSpore's AOT signature: inputs then outputs in params, their shapes in
// ndims/shapes. Rows (or attention's (image, head) pairs) are split over vit_dist_set_threads() threads.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace {

int g_threads = 1;

int64_t element_count(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

// Helper threads that live as long as the process: a thread started per call begins on its
// creator's core, and the scheduler takes about a millisecond to move it to the idle one.
class HelperPool {
 public:
  // Runs work(part) for every part in [0, parts), part 0 on the calling thread; returns when all ran.
  void run(int parts, const std::function<void(int)> &work) {
    std::lock_guard<std::mutex> one_job(run_mutex_);  // kernels launched from several threads take turns
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (int id = static_cast<int>(helpers_) + 1; id < parts; ++id, ++helpers_) {
        std::thread([this, id] { serve(id); }).detach();
      }
      work_ = &work;
      parts_ = parts;
      pending_ = parts - 1;
      ++generation_;
    }
    wake_.notify_all();
    work(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
  }

 private:
  void serve(int id) {
    std::unique_lock<std::mutex> lock(mutex_);
    for (uint64_t seen = generation_ - 1;; seen = generation_) {
      wake_.wait(lock, [&] { return generation_ != seen; });
      if (id >= parts_) continue;
      const std::function<void(int)> &work = *work_;
      lock.unlock();
      work(id);
      lock.lock();
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex run_mutex_, mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int)> *work_ = nullptr;
  int parts_ = 0, pending_ = 0;
  size_t helpers_ = 0;
  uint64_t generation_ = 0;
};

// Never destroyed: its detached helpers may still wait on it while the process exits.
HelperPool &helper_pool() {
  static HelperPool *pool = new HelperPool;
  return *pool;
}

// Runs work(part, begin, end) over [0, total) cut into one part per thread.
template <class Work> void split_over_threads(int64_t total, int parts, Work work) {
  const int64_t chunk = (total + parts - 1) / parts;
  helper_pool().run(parts, [&](int part) {
    const int64_t begin = std::min(total, part * chunk);
    work(part, begin, std::min(total, begin + chunk));
  });
}

int parts_for(int64_t rows) { return rows < 64 ? 1 : g_threads; }

// One part per thread for work that comes in a few large tasks.
int tasks_for(int64_t tasks) { return static_cast<int>(std::min<int64_t>(g_threads, std::max<int64_t>(tasks, 1))); }

// out[i] = sum over parts of partial[part * n + i]: per-thread partial sums, reduced.
void sum_parts(const float *partial, int parts, int64_t n, float *out) {
  for (int64_t i = 0; i < n; ++i) {
    float sum = 0.f;
    for (int p = 0; p < parts; ++p) sum += partial[p * n + i];
    out[i] = sum;
  }
}

// Small dense products for attention: C (M x N) = A (M x K) B (K x N), row-major with leading
// dimensions, A read transposed (stored K x M) when kTransA. A register tile of up to 4 rows by 4
// vectors of 16 columns accumulates over K; GCC's vector extension maps it onto the host's widest
// registers (-march=native). Columns past the last whole 16 take a scalar loop.
typedef float v16 __attribute__((vector_size(64)));

inline v16 load16(const float *p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <int kRows, int kVectors, bool kTransA>
void gemm_tile(int64_t k_len, const float *a, int64_t lda, const float *b, int64_t ldb, float *c, int64_t ldc) {
  v16 acc[kRows][kVectors] = {};
  for (int64_t k = 0; k < k_len; ++k) {
    v16 bk[kVectors];
    for (int v = 0; v < kVectors; ++v) bk[v] = load16(b + k * ldb + 16 * v);
    for (int r = 0; r < kRows; ++r) {
      const float ar = kTransA ? a[k * lda + r] : a[r * lda + k];
      for (int v = 0; v < kVectors; ++v) acc[r][v] += ar * bk[v];
    }
  }
  for (int r = 0; r < kRows; ++r) std::memcpy(c + r * ldc, acc[r], sizeof acc[r]);
}

template <bool kTransA>
using TileFn = void (*)(int64_t, const float *, int64_t, const float *, int64_t, float *, int64_t);

template <bool kTransA, int... kRowsMinusOne>
TileFn<kTransA> tile_for(int rows, int vectors, std::integer_sequence<int, kRowsMinusOne...>) {
  static const TileFn<kTransA> tiles[4][4] = {
      {gemm_tile<kRowsMinusOne + 1, 1, kTransA>...}, {gemm_tile<kRowsMinusOne + 1, 2, kTransA>...},
      {gemm_tile<kRowsMinusOne + 1, 3, kTransA>...}, {gemm_tile<kRowsMinusOne + 1, 4, kTransA>...}};
  return tiles[vectors - 1][rows - 1];
}

template <bool kTransA>
void gemm(int64_t m, int64_t n, int64_t k, const float *a, int64_t lda, const float *b, int64_t ldb, float *c,
          int64_t ldc) {
  const int64_t whole = n - n % 16;
  for (int64_t i = 0; i < m; i += 4) {
    const int rows = static_cast<int>(std::min<int64_t>(4, m - i));
    const float *ai = kTransA ? a + i : a + i * lda;
    for (int64_t j = 0; j < whole; j += 64) {
      const int vectors = static_cast<int>(std::min<int64_t>(4, (whole - j) / 16));
      tile_for<kTransA>(rows, vectors, std::make_integer_sequence<int, 4>{})(k, ai, lda, b + j, ldb, c + i * ldc + j,
                                                                            ldc);
    }
    for (int r = 0; r < rows; ++r) {
      for (int64_t j = whole; j < n; ++j) {
        float sum = 0.f;
        for (int64_t kk = 0; kk < k; ++kk) sum += (kTransA ? ai[kk * lda + r] : ai[r * lda + kk]) * b[kk * ldb + j];
        c[(i + r) * ldc + j] = sum;
      }
    }
  }
}

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

std::mutex g_steps_mutex;
std::condition_variable g_step_done;
uint64_t g_steps_done = 0;

}  // namespace

extern "C" void vit_dist_set_threads(int threads) { g_threads = std::max(1, threads); }

// x (..., D), gamma (D), beta (D), epsilon (1) -> y (..., D), mean (...), rstd (...)
extern "C" int LayerNormForward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *x = static_cast<const float *>(params[0]), *gamma = static_cast<const float *>(params[1]);
  const float *beta = static_cast<const float *>(params[2]), epsilon = *static_cast<const float *>(params[3]);
  float *y = static_cast<float *>(params[4]), *mean = static_cast<float *>(params[5]);
  float *rstd = static_cast<float *>(params[6]);
  const int64_t d = shapes[0][ndims[0] - 1], rows = element_count(ndims[0], shapes[0]) / d;
  split_over_threads(rows, parts_for(rows), [=](int, int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float *xr = x + r * d;
      float sum = 0.f, squares = 0.f;
      for (int64_t i = 0; i < d; ++i) sum += xr[i];
      const float m = sum / d;
      for (int64_t i = 0; i < d; ++i) squares += (xr[i] - m) * (xr[i] - m);
      const float s = 1.f / std::sqrt(squares / d + epsilon);
      mean[r] = m;
      rstd[r] = s;
      for (int64_t i = 0; i < d; ++i) y[r * d + i] = (xr[i] - m) * s * gamma[i] + beta[i];
    }
  });
  return 0;
}

// dy, x, gamma, mean, rstd -> dx, dgamma, dbeta, with xhat = (x - mean) rstd and g = dy gamma:
// dx = rstd (g - mean(g) - xhat mean(g xhat)), dgamma = sum over rows of dy xhat, dbeta = sum of dy.
extern "C" int LayerNormBackward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *dy = static_cast<const float *>(params[0]), *x = static_cast<const float *>(params[1]);
  const float *gamma = static_cast<const float *>(params[2]), *mean = static_cast<const float *>(params[3]);
  const float *rstd = static_cast<const float *>(params[4]);
  float *dx = static_cast<float *>(params[5]), *dgamma = static_cast<float *>(params[6]);
  float *dbeta = static_cast<float *>(params[7]);
  const int64_t d = shapes[0][ndims[0] - 1], rows = element_count(ndims[0], shapes[0]) / d;
  const int parts = parts_for(rows);
  std::vector<float> partial_dgamma(parts * d, 0.f), partial_dbeta(parts * d, 0.f);
  split_over_threads(rows, parts, [&](int part, int64_t begin, int64_t end) {
    float *part_dgamma = partial_dgamma.data() + part * d, *part_dbeta = partial_dbeta.data() + part * d;
    for (int64_t r = begin; r < end; ++r) {
      const float *dyr = dy + r * d, *xr = x + r * d;
      const float m = mean[r], s = rstd[r];
      float g_sum = 0.f, gx_sum = 0.f;
      for (int64_t i = 0; i < d; ++i) {
        const float xhat = (xr[i] - m) * s, g = dyr[i] * gamma[i];
        g_sum += g;
        gx_sum += g * xhat;
        part_dgamma[i] += dyr[i] * xhat;
        part_dbeta[i] += dyr[i];
      }
      const float g_mean = g_sum / d, gx_mean = gx_sum / d;
      for (int64_t i = 0; i < d; ++i) {
        dx[r * d + i] = s * (dyr[i] * gamma[i] - g_mean - (xr[i] - m) * s * gx_mean);
      }
    }
  });
  sum_parts(partial_dgamma.data(), parts, d, dgamma);
  sum_parts(partial_dbeta.data(), parts, d, dbeta);
  return 0;
}

// Exact GELU of x + bias, y = u Phi(u) with u = x + bias, Phi(u) = (1 + erf(u / sqrt 2)) / 2: fc1's
// bias is added here, in the pass GELU makes anyway, rather than in one more pass over memory.
// x (rows, N), bias (N) -> y (rows, N)
extern "C" int BiasGeluForward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *x = static_cast<const float *>(params[0]), *bias = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  const int64_t n = shapes[1][0], rows = element_count(ndims[0], shapes[0]) / n;
  split_over_threads(rows, parts_for(rows), [=](int, int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float *xr = x + r * n;
      float *yr = y + r * n;
      for (int64_t i = 0; i < n; ++i) {
        const float u = xr[i] + bias[i];
        yr[i] = 0.5f * u * (1.f + std::erf(u * kInvSqrt2));
      }
    }
  });
  return 0;
}

// x, bias, dy -> dx = dy (Phi(u) + u phi(u)), phi the standard normal density; dbias = column sums of dx.
extern "C" int BiasGeluBackward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *x = static_cast<const float *>(params[0]), *bias = static_cast<const float *>(params[1]);
  const float *dy = static_cast<const float *>(params[2]);
  float *dx = static_cast<float *>(params[3]), *dbias = static_cast<float *>(params[4]);
  const int64_t n = shapes[1][0], rows = element_count(ndims[0], shapes[0]) / n;
  const int parts = parts_for(rows);
  std::vector<float> partial(parts * n, 0.f);
  split_over_threads(rows, parts, [&](int part, int64_t begin, int64_t end) {
    float *part_dbias = partial.data() + part * n;
    for (int64_t r = begin; r < end; ++r) {
      const float *xr = x + r * n, *dyr = dy + r * n;
      float *dxr = dx + r * n;
      for (int64_t i = 0; i < n; ++i) {
        const float u = xr[i] + bias[i];
        const float cdf = 0.5f * (1.f + std::erf(u * kInvSqrt2));
        const float pdf = kInvSqrt2Pi * std::exp(-0.5f * u * u);
        dxr[i] = dyr[i] * (cdf + u * pdf);
        part_dbias[i] += dxr[i];
      }
    }
  });
  sum_parts(partial.data(), parts, n, dbias);
  return 0;
}

// Multi-head self-attention with q, k and v in one tensor, as one MatMul over the three projections
// makes it: qkv (B, T, 3D) holds q, k, v side by side, each D = H x hd wide, their biases in bias (3D).
// Each (image, head) pair is one task: its q, k, v are gathered (bias added) into contiguous blocks and
// the four products are small GEMMs below; the softmax probabilities are kept for the backward, each
// row padded to Tp = T rounded up to 16 columns (zeros) so that every GEMM row is whole vectors.
struct AttentionShape {
  int64_t batch, tokens, dim, heads, head_dim, padded;
  AttentionShape(const int64_t *qkv_shape, int64_t heads_)
      : batch(qkv_shape[0]), tokens(qkv_shape[1]), dim(qkv_shape[2] / 3), heads(heads_), head_dim(dim / heads_),
        padded((tokens + 15) / 16 * 16) {}
  int64_t pairs() const { return batch * heads; }
};

// One (image, head) pair's q, k or v (which = 0, 1, 2) plus bias, times scale, as a (T, hd) block.
void gather_head(const AttentionShape &s, const float *qkv, const float *bias, int64_t pair, int which, float scale,
                 float *out) {
  const int64_t b = pair / s.heads, column = which * s.dim + pair % s.heads * s.head_dim;
  const float *rows = qkv + b * s.tokens * 3 * s.dim + column, *head_bias = bias + column;
  for (int64_t t = 0; t < s.tokens; ++t) {
    const float *row = rows + t * 3 * s.dim;
    float *out_row = out + t * s.head_dim;
    for (int64_t d = 0; d < s.head_dim; ++d) out_row[d] = (row[d] + head_bias[d]) * scale;
  }
}

// The same transposed, as (hd, Tp), 16 tokens at a time so that reads and writes stay in cache lines
// (the padding columns are left as they are: zero).
void gather_head_transposed(const AttentionShape &s, const float *qkv, const float *bias, int64_t pair, int which,
                            float *out) {
  const int64_t b = pair / s.heads, column = which * s.dim + pair % s.heads * s.head_dim, stride = 3 * s.dim;
  const float *rows = qkv + b * s.tokens * stride + column, *head_bias = bias + column;
  for (int64_t t0 = 0; t0 < s.tokens; t0 += 16) {
    const int64_t t1 = std::min(s.tokens, t0 + 16);
    for (int64_t d = 0; d < s.head_dim; ++d) {
      float *out_row = out + d * s.padded;
      for (int64_t t = t0; t < t1; ++t) out_row[t] = rows[t * stride + d] + head_bias[d];
    }
  }
}

// Row-wise softmax over the first `tokens` of each padded row; the padding becomes zero.
void softmax_rows(float *scores, int64_t tokens, int64_t padded) {
  for (int64_t i = 0; i < tokens; ++i) {
    float *row = scores + i * padded;
    float top = row[0];
    for (int64_t j = 1; j < tokens; ++j) top = std::max(top, row[j]);
    // exp over the whole padded row keeps the loop in whole vectors; min() keeps the padding finite.
    for (int64_t j = 0; j < padded; ++j) row[j] = std::exp(std::min(row[j] - top, 0.f));
    float sum = 0.f;
    for (int64_t j = 0; j < tokens; ++j) sum += row[j];
    const float inv = 1.f / sum;
    for (int64_t j = 0; j < tokens; ++j) row[j] *= inv;
    for (int64_t j = tokens; j < padded; ++j) row[j] = 0.f;
  }
}

// qkv (B, T, 3D), bias (3D), head_scale (H: hd^-1/2 per head, its length the head count)
//   -> context (B, T, D), probs (B, H, T, Tp)
// S = (scale q) k^T, P = softmax(S), context = P v.
extern "C" int AttentionForward(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const float *qkv = static_cast<const float *>(params[0]), *bias = static_cast<const float *>(params[1]);
  const float scale = *static_cast<const float *>(params[2]);
  float *context = static_cast<float *>(params[3]), *probs = static_cast<float *>(params[4]);
  const AttentionShape s(shapes[0], shapes[2][0]);
  const int64_t t = s.tokens, hd = s.head_dim, tp = s.padded;
  split_over_threads(s.pairs(), tasks_for(s.pairs()), [&](int, int64_t begin, int64_t end) {
    std::vector<float> q(t * hd), k_transposed(hd * tp, 0.f), v(t * hd);
    for (int64_t pair = begin; pair < end; ++pair) {
      gather_head(s, qkv, bias, pair, 0, scale, q.data());
      gather_head_transposed(s, qkv, bias, pair, 1, k_transposed.data());
      gather_head(s, qkv, bias, pair, 2, 1.f, v.data());
      float *p = probs + pair * t * tp;
      gemm<false>(t, tp, hd, q.data(), hd, k_transposed.data(), tp, p, tp);
      softmax_rows(p, t, tp);
      const int64_t b = pair / s.heads, h = pair % s.heads;
      gemm<false>(t, hd, t, p, tp, v.data(), hd, context + b * t * s.dim + h * hd, s.dim);
    }
  });
  return 0;
}

// dcontext (B, T, D), qkv, bias, head_scale, probs -> dqkv (B, T, 3D), dbias (3D). With dS' = scale P
// (dP - rowsum(P dP)) and dP = dcontext v^T: dq = dS' k, dk = dS'^T q, dv = P^T dcontext (q, k, v with
// their biases, q unscaled); each bias gradient is the column sum of its part.
extern "C" int AttentionBackward(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const float *dcontext = static_cast<const float *>(params[0]), *qkv = static_cast<const float *>(params[1]);
  const float *bias = static_cast<const float *>(params[2]), scale = *static_cast<const float *>(params[3]);
  const float *probs = static_cast<const float *>(params[4]);
  float *dqkv = static_cast<float *>(params[5]), *dbias = static_cast<float *>(params[6]);
  const AttentionShape s(shapes[1], shapes[3][0]);
  const int64_t t = s.tokens, hd = s.head_dim, tp = s.padded, d3 = 3 * s.dim;
  const int parts = tasks_for(s.pairs());
  std::vector<float> partial(parts * d3, 0.f);
  split_over_threads(s.pairs(), parts, [&](int part, int64_t begin, int64_t end) {
    std::vector<float> q(t * hd), k(t * hd), v_transposed(hd * tp, 0.f), ds(t * tp);
    for (int64_t pair = begin; pair < end; ++pair) {
      gather_head(s, qkv, bias, pair, 0, 1.f, q.data());
      gather_head(s, qkv, bias, pair, 1, 1.f, k.data());
      gather_head_transposed(s, qkv, bias, pair, 2, v_transposed.data());
      const int64_t b = pair / s.heads, column = pair % s.heads * hd;
      const float *p = probs + pair * t * tp, *dout = dcontext + b * t * s.dim + column;
      float *dq = dqkv + b * t * d3 + column, *dk = dq + s.dim, *dv = dk + s.dim;
      gemm<true>(t, hd, t, p, tp, dout, s.dim, dv, d3);
      gemm<false>(t, tp, hd, dout, s.dim, v_transposed.data(), tp, ds.data(), tp);
      for (int64_t i = 0; i < t; ++i) {
        const float *pi = p + i * tp;
        float *dsi = ds.data() + i * tp;
        float dot = 0.f;
        for (int64_t j = 0; j < t; ++j) dot += pi[j] * dsi[j];
        for (int64_t j = 0; j < tp; ++j) dsi[j] = scale * pi[j] * (dsi[j] - dot);
      }
      gemm<false>(t, hd, t, ds.data(), tp, k.data(), hd, dq, d3);
      gemm<true>(t, hd, t, ds.data(), tp, q.data(), hd, dk, d3);
      float *part_dbias = partial.data() + part * d3 + column;
      for (int64_t row = 0; row < t; ++row) {
        for (int which = 0; which < 3; ++which) {
          const float *grad = dq + row * d3 + which * s.dim;
          float *sums = part_dbias + which * s.dim;
          for (int64_t d = 0; d < hd; ++d) sums[d] += grad[d];
        }
      }
    }
  });
  sum_parts(partial.data(), parts, d3, dbias);
  return 0;
}

// The last op of a train step: passes its float32 scalar through and counts the step as done, so the
// host can sleep until then (vit_dist_wait_steps) instead of spinning in MindSpore's queue wait.
extern "C" int StepDone(int, void **params, int *, int64_t **, const char **, void *, void *) {
  *static_cast<float *>(params[1]) = *static_cast<const float *>(params[0]);
  {
    std::lock_guard<std::mutex> lock(g_steps_mutex);
    ++g_steps_done;
  }
  g_step_done.notify_all();
  return 0;
}

// How many StepDone calls have run in this process.
extern "C" uint64_t vit_dist_steps_done() {
  std::lock_guard<std::mutex> lock(g_steps_mutex);
  return g_steps_done;
}

// Blocks until `steps` StepDone calls have run in this process, or `timeout_s` has passed; returns
// whether they have.
extern "C" int vit_dist_wait_steps(uint64_t steps, double timeout_s) {
  std::unique_lock<std::mutex> lock(g_steps_mutex);
  return g_step_done.wait_for(lock, std::chrono::duration<double>(timeout_s), [=] { return g_steps_done >= steps; });
}
