// Convolutions on tiny maps as matrix products (resnet.Conv2d.as_matmul and as_dense_matrix; onednn_conv.py builds
// this file into the same library as onednn_conv.cc).
//
// The products run on oneDNN's GEMM at AVX-512 (MindSpore's MatMul is held to AVX2 and ran them 2.5-4x slower):
//   MatmulByWeight(a, b) -> a . b^T        a (rows, k), b (columns, k), as ops.MatMul(transpose_b=True)
//   MatmulByWeightGrad(dc, a, b) -> (dc . b, dc^T . a)
//
// On ResNet's 1x1 maps (layer4 at 32x32 inputs), a 3x3 convolution meets padding in 8 of its 9 taps, yet the
// unfolded matmul multiplies them all. Written as y(n, out*Q) = x(n, in*P) . B^T, with B holding, for each output
// pixel q and input pixel p, the tap that joins them (zero where none does), the convolution multiplies only what
// is there, and x and y need no transposes (NCHW rows are already (channel, pixel)). resnet.Conv2d uses it where B
// is no larger than the weight (out pixels * in pixels <= kernel taps), where it measured faster.
//   DenseWeights(w, x, geometry) -> B (out * Q, in * P)     x only for its shape
//   DenseWeightsGrad(dB, w, x, geometry) -> dw              the taps' gradients summed back
// geometry is onednn_conv.cc's: int64 [stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right, ...].
#include <cstdint>
#include <cstdio>
#include <oneapi/dnnl/dnnl.h>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>

int run_on_worker(const char *what, const std::function<void()> &body);  // onednn_conv.cc

namespace {

struct Taps {
  int64_t out_c, in_c, kh, kw, in_h, in_w, out_h, out_w, stride_h, stride_w, top, left;

  // The tap joining output pixel q to input pixel p, as an offset in one (in_c, kh, kw) filter, or -1.
  int64_t tap(int64_t q, int64_t p) const {
    const int64_t ty = p / in_w + top - (q / out_w) * stride_h, tx = p % in_w + left - (q % out_w) * stride_w;
    return (ty >= 0 && ty < kh && tx >= 0 && tx < kw) ? ty * kw + tx : -1;
  }
};

Taps taps_of(int *ndims, int64_t **shapes, const char **dtypes, const int64_t *geometry, int weight, int matrix) {
  for (int i : {weight, weight + 1})
    if (ndims[i] != 4 || std::strcmp(dtypes[i], "float32") != 0)
      throw std::runtime_error(std::string("float32 NCHW tensors only, got ") + dtypes[i] + " of rank " +
                               std::to_string(ndims[i]));
  if (ndims[weight + 2] != 1 || shapes[weight + 2][0] < 6 || std::strcmp(dtypes[weight + 2], "int64") != 0)
    throw std::runtime_error("geometry: int64 [stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right, ...]");
  const int64_t *w = shapes[weight], *x = shapes[weight + 1];
  Taps t{w[0], w[1], w[2], w[3], x[2], x[3], 0, 0, geometry[0], geometry[1], geometry[2], geometry[4]};
  if (x[1] != t.in_c || t.stride_h < 1 || t.stride_w < 1) throw std::runtime_error("input and weight do not match");
  t.out_h = (t.in_h + geometry[2] + geometry[3] - t.kh) / t.stride_h + 1;
  t.out_w = (t.in_w + geometry[4] + geometry[5] - t.kw) / t.stride_w + 1;
  const int64_t *b = shapes[matrix];
  if (ndims[matrix] != 2 || b[0] != t.out_c * t.out_h * t.out_w || b[1] != t.in_c * t.in_h * t.in_w)
    throw std::runtime_error("the dense matrix is not (out channels * out pixels, in channels * in pixels)");
  return t;
}

// C (m, n) = op(A) . op(B), row-major, op transposing where asked.
void gemm(char trans_a, char trans_b, int64_t m, int64_t n, int64_t k, const float *a, const float *b, float *c) {
  const int64_t lda = trans_a == 'N' ? k : m, ldb = trans_b == 'N' ? n : k;
  if (dnnl_sgemm(trans_a, trans_b, m, n, k, 1.f, a, lda, b, ldb, 0.f, c, n) != dnnl_success)
    throw std::runtime_error("oneDNN's sgemm failed");
}

// Checks that tensors first .. first + count - 1 are float32 matrices.
void check_matrices(int *ndims, const char **dtypes, int first, int count) {
  for (int i = first; i < first + count; ++i)
    if (ndims[i] != 2 || std::strcmp(dtypes[i], "float32") != 0)
      throw std::runtime_error(std::string("float32 matrices only, got ") + dtypes[i] + " of rank " +
                               std::to_string(ndims[i]));
}

}  // namespace

extern "C" {

int MatmulByWeight(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                   void *extra) {
  return run_on_worker("small_map_conv matmul", [&] {
    if (nparam != 3) throw std::runtime_error("expected a, b -> a . b^T");
    check_matrices(ndims, dtypes, 0, 3);
    const int64_t rows = shapes[0][0], columns = shapes[1][0], k = shapes[0][1];
    if (shapes[1][1] != k || shapes[2][0] != rows || shapes[2][1] != columns)
      throw std::runtime_error("a (rows, k) and b (columns, k) do not match");
    gemm('N', 'T', rows, columns, k, static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
         static_cast<float *>(params[2]));
  });
}

int MatmulByWeightGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                       void *extra) {
  return run_on_worker("small_map_conv matmul backward", [&] {
    if (nparam != 5) throw std::runtime_error("expected dc, a, b -> da, db");
    check_matrices(ndims, dtypes, 0, 5);
    const int64_t rows = shapes[1][0], columns = shapes[2][0], k = shapes[1][1];
    if (shapes[2][1] != k || shapes[0][0] != rows || shapes[0][1] != columns)
      throw std::runtime_error("dc (rows, columns), a (rows, k) and b (columns, k) do not match");
    const float *dc = static_cast<const float *>(params[0]);
    gemm('N', 'N', rows, k, columns, dc, static_cast<const float *>(params[2]), static_cast<float *>(params[3]));
    gemm('T', 'N', columns, k, rows, dc, static_cast<const float *>(params[1]), static_cast<float *>(params[4]));
  });
}

int DenseWeights(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                 void *extra) {
  return run_on_worker("small_map_conv forward", [&] {
    if (nparam != 4) throw std::runtime_error("expected w, x, geometry -> B");
    const Taps t = taps_of(ndims, shapes, dtypes, static_cast<int64_t *>(params[2]), 0, 3);
    const float *w = static_cast<const float *>(params[0]);
    float *b = static_cast<float *>(params[3]);
    const int64_t out_pixels = t.out_h * t.out_w, in_pixels = t.in_h * t.in_w, filter = t.in_c * t.kh * t.kw;
#pragma omp parallel for
    for (int64_t o = 0; o < t.out_c; ++o)
      for (int64_t q = 0; q < out_pixels; ++q) {
        float *row = b + (o * out_pixels + q) * t.in_c * in_pixels;
        for (int64_t p = 0; p < in_pixels; ++p) {
          const int64_t tap = t.tap(q, p);
          for (int64_t c = 0; c < t.in_c; ++c)
            row[c * in_pixels + p] = tap < 0 ? 0.f : w[o * filter + c * t.kh * t.kw + tap];
        }
      }
  });
}

int DenseWeightsGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                     void *extra) {
  return run_on_worker("small_map_conv backward", [&] {
    if (nparam != 5) throw std::runtime_error("expected dB, w, x, geometry -> dw");
    const Taps t = taps_of(ndims, shapes, dtypes, static_cast<int64_t *>(params[3]), 1, 0);
    if (std::strcmp(dtypes[0], "float32") != 0) throw std::runtime_error(std::string("float32 only, got ") + dtypes[0]);
    const float *db = static_cast<const float *>(params[0]);
    float *dw = static_cast<float *>(params[4]);
    const int64_t out_pixels = t.out_h * t.out_w, in_pixels = t.in_h * t.in_w, filter = t.in_c * t.kh * t.kw;
#pragma omp parallel for
    for (int64_t o = 0; o < t.out_c; ++o) {
      float *d = dw + o * filter;
      std::memset(d, 0, filter * sizeof(float));
      for (int64_t q = 0; q < out_pixels; ++q) {
        const float *row = db + (o * out_pixels + q) * t.in_c * in_pixels;
        for (int64_t p = 0; p < in_pixels; ++p) {
          const int64_t tap = t.tap(q, p);
          if (tap < 0) continue;
          for (int64_t c = 0; c < t.in_c; ++c) d[c * t.kh * t.kw + tap] += row[c * in_pixels + p];
        }
      }
    }
  });
}
}
