// One momentum-SGD step for every parameter at once, weight decay included, as a MindSpore AOT custom operator
// (train_step.FusedMomentum; onednn_conv.py builds it into the same library as onednn_conv.cc).
//
// nn.Momentum runs ApplyMomentum for every parameter and weight decay's Mul and AddN for each decayed one (269
// kernels for ResNet50), each a pass over memory; this is one pass and one kernel, with the same arithmetic in the
// same order, so the results are bitwise those of nn.Momentum:
//   accum = accum * momentum + (grad + decay * var);  var -= lr * accum
// FusedMomentum(lr[n], decay[n], momentum[1], var_1..var_n, accum_1..accum_n, grad_1..grad_n) -> done[1]
// It writes var and accum in place, as ApplyMomentum does (the Python side marks the operator as writing memory).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

int run_on_worker(const char *what, const std::function<void()> &body);  // onednn_conv.cc

namespace {

int64_t element_count(int ndim, const int64_t *shape) {
  int64_t count = 1;
  for (int d = 0; d < ndim; ++d) count *= shape[d];
  return count;
}

bool is_float32(const char *dtype) { return std::strcmp(dtype, "float32") == 0; }

}  // namespace

extern "C" int FusedMomentum(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  return run_on_worker("fused_momentum", [&] {
    if (nparam < 7 || (nparam - 4) % 3 != 0)
      throw std::runtime_error("expected lr, decay, momentum and three tensors a parameter");
    const int n = (nparam - 4) / 3;
    for (int i = 0; i < nparam; ++i)
      if (!is_float32(dtypes[i])) throw std::runtime_error(std::string("float32 only, got ") + dtypes[i]);
    if (element_count(ndims[0], shapes[0]) != n || element_count(ndims[1], shapes[1]) != n ||
        element_count(ndims[2], shapes[2]) < 1)
      throw std::runtime_error("one learning rate and one decay a parameter, and a momentum");
    std::vector<int64_t> sizes(n);
    for (int i = 0; i < n; ++i) {
      sizes[i] = element_count(ndims[3 + i], shapes[3 + i]);
      if (element_count(ndims[3 + n + i], shapes[3 + n + i]) != sizes[i] ||
          element_count(ndims[3 + 2 * n + i], shapes[3 + 2 * n + i]) != sizes[i])
        throw std::runtime_error("parameter " + std::to_string(i) + ": its accumulation or gradient has another size");
    }
    const float *lr = static_cast<const float *>(params[0]);
    const float *decay = static_cast<const float *>(params[1]);
    const float momentum = *static_cast<const float *>(params[2]);

    // Chunks across all parameters, so that both cores share the large tensors and the many small ones alike.
    const int64_t chunk = 1 << 14;
    std::vector<std::pair<int, int64_t>> chunks;  // (parameter, first element)
    for (int i = 0; i < n; ++i)
      for (int64_t begin = 0; begin < sizes[i]; begin += chunk) chunks.emplace_back(i, begin);

#pragma omp parallel for schedule(dynamic, 4)
    for (int64_t c = 0; c < static_cast<int64_t>(chunks.size()); ++c) {
      const int i = chunks[c].first;
      const int64_t begin = chunks[c].second, end = std::min(begin + chunk, sizes[i]);
      float *var = static_cast<float *>(params[3 + i]);
      float *accum = static_cast<float *>(params[3 + n + i]);
      const float *grad = static_cast<const float *>(params[3 + 2 * n + i]);
      const float rate = lr[i], weight_decay = decay[i];
#pragma omp simd
      for (int64_t k = begin; k < end; ++k) {
        const float a = accum[k] * momentum + (grad[k] + weight_decay * var[k]);
        accum[k] = a;
        var[k] -= rate * a;
      }
    }
    *static_cast<float *>(params[nparam - 1]) = 0.f;
  });
}
