// BatchNorm in training, with the ReLU after it and the residual sum before that ReLU, in one pass each way
// (resnet.BatchNorm2d; onednn_conv.py builds this file into the same library as onednn_conv.cc).
//
// MindSpore runs BatchNorm, Add, ReLU and, backward, ReluGrad, AddN and BatchNormGrad as separate kernels, each a
// pass over the activations: on CPU these are memory-bound, and a ResNet50 step at 224x224 spent 300 ms in them.
// Here the forward reads x twice (statistics, then the output) and the backward reads dy, y and x twice:
//   y = relu(gamma * (x - mean) / sqrt(var + eps) + beta [+ residual])     mean, var: the batch's, per channel
//   BatchNormRelu(x, gamma, beta, moving_mean, moving_var, settings) -> (y, saved, new_mean, new_var)
//   BatchNormReluGrad(dy, x, y, gamma, saved, settings) -> (dx, dgamma, dbeta)
//   BatchNormAddRelu(x, gamma, beta, moving_mean, moving_var, residual, settings) -> (y, saved, new_mean, new_var)
//   BatchNormAddReluGrad(dy, x, y, gamma, saved, settings) -> (dx, dgamma, dbeta, dresidual)
// (two names, as MindSpore keys a custom operator's backward by its function's name)
// settings: float32 [eps, momentum, relu (0 or 1)]; saved: (2, C) the batch mean and 1 / sqrt(var + eps);
// new_mean, new_var: the moving statistics after this batch, as MindSpore's BatchNorm updates them (moving * (1 -
// momentum) + batch * momentum, the variance unbiased), for the caller to assign (ops.assign orders only against its
// own parameter; written in place, they would make this operator a side effect on all memory).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <stdexcept>
#include <string>

int run_on_worker(const char *what, const std::function<void()> &body);  // onednn_conv.cc

namespace {

struct Planes {  // an NCHW tensor as N x C planes of H * W values
  int64_t n, c, pixels;
  int64_t count() const { return n * pixels; }  // values a channel holds
  int64_t at(int64_t image, int64_t channel) const { return (image * c + channel) * pixels; }
};

void check_float32(int nparam, const char **dtypes) {
  for (int i = 0; i < nparam; ++i)
    if (std::strcmp(dtypes[i], "float32") != 0) throw std::runtime_error(std::string("float32 only, got ") + dtypes[i]);
}

// x's shape, after checking that every other tensor is a (C) vector, an NCHW tensor like x, or settings.
Planes planes_of(int *ndims, int64_t **shapes, int x, std::initializer_list<int> like_x,
                 std::initializer_list<int> vectors) {
  if (ndims[x] != 4) throw std::runtime_error("NCHW tensors only, got rank " + std::to_string(ndims[x]));
  const int64_t *s = shapes[x];
  for (int i : like_x)
    if (ndims[i] != 4 || std::memcmp(shapes[i], s, 4 * sizeof(int64_t)) != 0)
      throw std::runtime_error("the tensors are not all of one shape");
  for (int i : vectors)
    if (ndims[i] != 1 || shapes[i][0] != s[1]) throw std::runtime_error("a parameter is not one value a channel");
  if (s[0] * s[2] * s[3] < 2) throw std::runtime_error("batch statistics need two values a channel or more");
  return Planes{s[0], s[1], s[2] * s[3]};
}

// The loops over one channel (its plane in every image), compiled for AVX2 and for any x86-64 (the library may be
// built on one machine and run on another): memory-bound, they run about twice as fast with AVX2's wider vectors.
// Sums are in float along a plane and in double across planes.
#if defined(__x86_64__)
#define CHANNEL_LOOP __attribute__((target_clones("avx2", "default")))
#else
#define CHANNEL_LOOP
#endif

// sum(x - shift_by) and sum((x - shift_by)^2): around a value near the channel's mean, E[x^2] - E[x]^2 keeps its
// digits where the mean is large.
CHANNEL_LOOP void shifted_sums(const float *x, const Planes p, int64_t c, float shift_by, double &sum,
                               double &squares) {
  sum = 0, squares = 0;
  for (int64_t image = 0; image < p.n; ++image) {
    const float *in = x + p.at(image, c);
    float s = 0.f, q = 0.f;
#pragma omp simd reduction(+ : s, q)
    for (int64_t i = 0; i < p.pixels; ++i) {
      const float v = in[i] - shift_by;
      s += v;
      q += v * v;
    }
    sum += s, squares += q;
  }
}

CHANNEL_LOOP float plane_mean(const float *in, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += in[i];
  return s / n;
}

// y = (x - mean) * scale + beta [+ residual], then the ReLU if asked.
CHANNEL_LOOP void normalize(const float *x, const float *residual, float *y, const Planes p, int64_t c, float mean,
                            float scale, float beta, bool relu) {
  for (int64_t image = 0; image < p.n; ++image) {
    const int64_t at = p.at(image, c);
    const float *in = x + at, *add = residual ? residual + at : nullptr;
    float *out = y + at;
    if (add) {
#pragma omp simd
      for (int64_t i = 0; i < p.pixels; ++i) {
        const float v = (in[i] - mean) * scale + beta + add[i];
        out[i] = (relu && !(v > 0.f)) ? 0.f : v;
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < p.pixels; ++i) {
        const float v = (in[i] - mean) * scale + beta;
        out[i] = (relu && !(v > 0.f)) ? 0.f : v;
      }
    }
  }
}

// dy where the ReLU passed its input (y > 0), or dy itself without a ReLU.
inline float through_relu(float dy, float y, bool relu) { return (!relu || y > 0.f) ? dy : 0.f; }

// sum(dz) and sum(dz * (x - mean)), dz = dy where the ReLU passed it (written to dresidual if there is one).
CHANNEL_LOOP void gradient_sums(const float *dy, const float *x, const float *y, float *dresidual, const Planes p,
                                int64_t c, bool relu, float mean, double &sum, double &products) {
  sum = 0, products = 0;
  for (int64_t image = 0; image < p.n; ++image) {
    const int64_t at = p.at(image, c);
    const float *g = dy + at, *in = x + at, *out = y + at;
    float s = 0.f, q = 0.f;
#pragma omp simd reduction(+ : s, q)
    for (int64_t i = 0; i < p.pixels; ++i) {
      const float dz = through_relu(g[i], out[i], relu);
      s += dz;
      q += dz * (in[i] - mean);
    }
    sum += s, products += q;
    if (dresidual) {
      float *d = dresidual + at;
#pragma omp simd
      for (int64_t i = 0; i < p.pixels; ++i) d[i] = through_relu(g[i], out[i], relu);
    }
  }
}

// dx = k * dz + a * (x - mean) + b.
CHANNEL_LOOP void input_gradient(const float *dy, const float *x, const float *y, float *dx, const Planes p,
                                 int64_t c, bool relu, float mean, float k, float a, float b) {
  for (int64_t image = 0; image < p.n; ++image) {
    const int64_t at = p.at(image, c);
    const float *g = dy + at, *in = x + at, *out = y + at;
    float *d = dx + at;
#pragma omp simd
    for (int64_t i = 0; i < p.pixels; ++i) {
      const float dz = through_relu(g[i], out[i], relu);
      d[i] = k * dz + a * (in[i] - mean) + b;
    }
  }
}

}  // namespace

extern "C" {

int BatchNormRelu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                  void *extra) {
  return run_on_worker("norm_relu forward", [&] {  // also BatchNormAddRelu's
    if (nparam != 10 && nparam != 11)
      throw std::runtime_error("expected x, gamma, beta, moving mean and variance, [residual,] settings -> y, saved, "
                               "moving mean and variance");
    check_float32(nparam, dtypes);
    const bool has_residual = nparam == 11;
    const int settings_at = has_residual ? 6 : 5, y_at = settings_at + 1;
    const Planes p = planes_of(ndims, shapes, 0,
                               has_residual ? std::initializer_list<int>{5, y_at} : std::initializer_list<int>{y_at},
                               {1, 2, 3, 4, y_at + 2, y_at + 3});
    if (ndims[settings_at] != 1 || shapes[settings_at][0] != 3)
      throw std::runtime_error("settings: float32 [eps, momentum, relu]");
    if (ndims[y_at + 1] != 2 || shapes[y_at + 1][0] != 2 || shapes[y_at + 1][1] != p.c)
      throw std::runtime_error("saved: (2, channels)");
    const float *x = static_cast<const float *>(params[0]), *gamma = static_cast<const float *>(params[1]),
                *beta = static_cast<const float *>(params[2]);
    const float *moving_mean = static_cast<const float *>(params[3]),
                *moving_var = static_cast<const float *>(params[4]);
    float *new_mean = static_cast<float *>(params[y_at + 2]), *new_var = static_cast<float *>(params[y_at + 3]);
    const float *residual = has_residual ? static_cast<const float *>(params[5]) : nullptr;
    const float *settings = static_cast<const float *>(params[settings_at]);
    float *y = static_cast<float *>(params[y_at]), *saved = static_cast<float *>(params[y_at + 1]);
    const float eps = settings[0], momentum = settings[1];
    const bool relu = settings[2] != 0.f;
    const int64_t count = p.count();

#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < p.c; ++c) {
      const float shift_by = plane_mean(x + p.at(0, c), p.pixels);  // the first image's: near the batch's
      double sum, squares;
      shifted_sums(x, p, c, shift_by, sum, squares);
      const double shifted_mean = sum / count, mean = shifted_mean + shift_by;
      const double var = std::max(squares / count - shifted_mean * shifted_mean, 0.0);
      const double rstd = 1.0 / std::sqrt(var + eps);
      saved[c] = static_cast<float>(mean);
      saved[p.c + c] = static_cast<float>(rstd);
      new_mean[c] = moving_mean[c] * (1.f - momentum) + static_cast<float>(mean) * momentum;
      new_var[c] = moving_var[c] * (1.f - momentum) + static_cast<float>(var * count / (count - 1)) * momentum;
      normalize(x, residual, y, p, c, static_cast<float>(mean), static_cast<float>(gamma[c] * rstd), beta[c], relu);
    }
  });
}

int BatchNormReluGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                      void *extra) {
  return run_on_worker("norm_relu backward", [&] {  // also BatchNormAddReluGrad's
    if (nparam != 9 && nparam != 10)
      throw std::runtime_error("expected dy, x, y, gamma, saved, settings -> dx, dgamma, dbeta[, dresidual]");
    check_float32(nparam, dtypes);
    const bool has_residual = nparam == 10;
    const Planes p = planes_of(ndims, shapes, 1, has_residual ? std::initializer_list<int>{0, 2, 6, 9}
                                                              : std::initializer_list<int>{0, 2, 6}, {3, 7, 8});
    if (ndims[4] != 2 || shapes[4][0] != 2 || shapes[4][1] != p.c) throw std::runtime_error("saved: (2, channels)");
    if (ndims[5] != 1 || shapes[5][0] != 3) throw std::runtime_error("settings: float32 [eps, momentum, relu]");
    const float *dy = static_cast<const float *>(params[0]), *x = static_cast<const float *>(params[1]),
                *y = static_cast<const float *>(params[2]), *gamma = static_cast<const float *>(params[3]),
                *saved = static_cast<const float *>(params[4]);
    const bool relu = static_cast<const float *>(params[5])[2] != 0.f;
    float *dx = static_cast<float *>(params[6]), *dgamma = static_cast<float *>(params[7]),
          *dbeta = static_cast<float *>(params[8]);
    float *dresidual = has_residual ? static_cast<float *>(params[9]) : nullptr;
    const int64_t count = p.count();

#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < p.c; ++c) {
      const float mean = saved[c], rstd = saved[p.c + c];
      double sum, products;  // of dz and dz * (x - mean), where dz = dy where the ReLU passed it
      gradient_sums(dy, x, y, dresidual, p, c, relu, mean, sum, products);
      const double dg = products * rstd;  // sum(dz * xhat)
      dgamma[c] = static_cast<float>(dg);
      dbeta[c] = static_cast<float>(sum);
      // dx = gamma * rstd * (dz - sum / count - xhat * dg / count), as k * dz + a * (x - mean) + b
      const double k = static_cast<double>(gamma[c]) * rstd;
      input_gradient(dy, x, y, dx, p, c, relu, mean, static_cast<float>(k), static_cast<float>(-k * rstd * dg / count),
                     static_cast<float>(-k * sum / count));
    }
  });
}

int BatchNormAddRelu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                     void *extra) {
  return BatchNormRelu(nparam, params, ndims, shapes, dtypes, stream, extra);
}

int BatchNormAddReluGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                         void *extra) {
  return BatchNormReluGrad(nparam, params, ndims, shapes, dtypes, stream, extra);
}
}
