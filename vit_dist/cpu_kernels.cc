// Fused float32 kernels for MindSpore's CPU backend, called as AOT custom ops (cpu_kernels.py).
// Every function has MindSpore's AOT signature: inputs then outputs in params, their shapes in
// ndims/shapes. Rows (or blocks of elements) are split over vit_dist_set_threads() threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

namespace {

int g_threads = 1;

int64_t element_count(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

// Runs work(part, begin, end) over [0, total) cut into one part per thread; the caller takes part 0.
template <class Work> void split_over_threads(int64_t total, int parts, Work work) {
  int64_t chunk = (total + parts - 1) / parts;
  std::vector<std::thread> helpers;
  for (int p = 1; p < parts; ++p) {
    int64_t begin = std::min(total, p * chunk), end = std::min(total, begin + chunk);
    helpers.emplace_back(work, p, begin, end);
  }
  work(0, int64_t{0}, std::min(total, chunk));
  for (auto &helper : helpers) helper.join();
}

int parts_for(int64_t rows) { return rows < 64 ? 1 : g_threads; }

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr int64_t kBlock = 4096;  // elementwise work is split in blocks of this many elements

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
  std::vector<float> partial(2 * parts * d, 0.f);  // per part: dgamma, then dbeta
  split_over_threads(rows, parts, [&](int part, int64_t begin, int64_t end) {
    float *part_dgamma = partial.data() + 2 * part * d, *part_dbeta = part_dgamma + d;
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
  for (int64_t i = 0; i < d; ++i) {
    float sum_dgamma = 0.f, sum_dbeta = 0.f;
    for (int p = 0; p < parts; ++p) {
      sum_dgamma += partial[2 * p * d + i];
      sum_dbeta += partial[2 * p * d + d + i];
    }
    dgamma[i] = sum_dgamma;
    dbeta[i] = sum_dbeta;
  }
  return 0;
}

// Exact GELU: y = x Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2.
extern "C" int GeluForward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  const int64_t n = element_count(ndims[0], shapes[0]), blocks = (n + kBlock - 1) / kBlock;
  split_over_threads(blocks, parts_for(blocks), [=](int, int64_t begin, int64_t end) {
    for (int64_t i = begin * kBlock, stop = std::min(n, end * kBlock); i < stop; ++i) {
      y[i] = 0.5f * x[i] * (1.f + std::erf(x[i] * kInvSqrt2));
    }
  });
  return 0;
}

// x, dy -> dx = dy (Phi(x) + x phi(x)), phi the standard normal density.
extern "C" int GeluBackward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *x = static_cast<const float *>(params[0]), *dy = static_cast<const float *>(params[1]);
  float *dx = static_cast<float *>(params[2]);
  const int64_t n = element_count(ndims[0], shapes[0]), blocks = (n + kBlock - 1) / kBlock;
  split_over_threads(blocks, parts_for(blocks), [=](int, int64_t begin, int64_t end) {
    for (int64_t i = begin * kBlock, stop = std::min(n, end * kBlock); i < stop; ++i) {
      const float cdf = 0.5f * (1.f + std::erf(x[i] * kInvSqrt2));
      const float pdf = kInvSqrt2Pi * std::exp(-0.5f * x[i] * x[i]);
      dx[i] = dy[i] * (cdf + x[i] * pdf);
    }
  });
  return 0;
}
