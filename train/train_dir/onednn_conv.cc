// Convolution forward, data gradient and weight gradient on oneDNN's blocked-layout kernels (jit:avx512_core and
// the like), called from MindSpore as AOT custom operators (onednn_conv.py builds and loads this file).
//
// Tensors arrive and leave in MindSpore's layouts (NCHW activations, OIHW weights): each call reorders into the
// layouts the kernel asked for, runs it, and reorders the result back, as PyTorch does for plain tensors.
// geometry is int64 [stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right, input needs a gradient,
// Winograd wanted, plain layout] (Winograd: a 3x3 stride-1 convolution on oneDNN's jit_wino_4x3, where the CPU has
// it, else the direct kernel; plain layout: the activations stay NCHW, no reorders, and a 1x1 convolution runs as
// oneDNN's GEMM (gemm:jit) per image at AVX-512, where MindSpore's runs the same GEMM held to AVX2):
//   ConvForward(x, w, geometry) -> y
//   ConvBackward(dy, x, w, geometry) -> (dx, dw)     one op, so that dy is reordered once for both
#include <oneapi/dnnl/dnnl.hpp>

// oneDNN 2.x only: a 3.x build (Debian 13's, PyPI's onednn-devel-cpu-gomp) needs libdnnl.so.3, the soname of the
// oneDNN 3.10 MindSpore 2.10 bundles and loads first, so the dynamic loader would run these kernels on MindSpore's
// copy, held to AVX2 (measured: "oneDNN 3.10.1, avx2"). 2.x's libdnnl.so.2 keeps a separate copy and ISA setting.
#if DNNL_VERSION_MAJOR != 2
#error "onednn_conv.cc needs oneDNN 2.x (Debian 12's libdnnl-dev 2.6): 3.x's libdnnl.so.3 is MindSpore's own copy"
#endif

#include <array>
#include <condition_variable>
#include <functional>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace dnnl;
using tag = memory::format_tag;
using dt = memory::data_type;

int run_on_worker(const char *what, const std::function<void()> &body);  // below

namespace {

std::mutex g_lock;  // one call at a time: each already uses every core, and they share the buffers below

engine &cpu() {
  static engine e = [] {
    // MindSpore's own oneDNN is capped at AVX2 through ONEDNN_MAX_CPU_ISA (its AVX-512 path is a reference
    // kernel); this library's blocked kernels are the point of AVX-512, so it lifts the cap for itself only.
    dnnl::set_max_cpu_isa(cpu_isa::all);
    return engine(engine::kind::cpu, 0);
  }();
  return e;
}

stream &cpu_stream() {
  static stream s(cpu());
  return s;
}

struct Geometry {
  memory::dims src, wei, dst, strides, pad_l, pad_r;
  bool winograd = false, plain = false;
  std::string key(char kind) const {
    std::string k(1, kind);
    k += winograd ? "w" : "d";
    k += plain ? "p" : "b";
    for (const auto *d : {&src, &wei, &dst, &strides, &pad_l, &pad_r})
      for (auto v : *d) k += "," + std::to_string(v);
    return k;
  }
};

size_t product(const int64_t *shape, int ndim) {
  size_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= static_cast<size_t>(shape[i]);
  return n;
}

memory::dims dims_of(int ndim, const int64_t *shape) { return memory::dims(shape, shape + ndim); }

// Grow-only scratch buffers for tensors in blocked layouts, 64-byte aligned as oneDNN prefers (calls run one at a
// time, on the worker thread below).
struct Buffer {
  void *data = nullptr;
  size_t size = 0;
};
Buffer g_scratch[6];
void *scratch(int slot, size_t n) {
  if (slot >= 6) throw std::runtime_error("more blocked tensors than scratch buffers");
  Buffer &b = g_scratch[slot];
  if (b.size < n) {
    std::free(b.data);
    b.data = nullptr, b.size = 0;
    if (posix_memalign(&b.data, 64, n) != 0) throw std::bad_alloc();
    b.size = n;
  }
  return b.data;
}

// One oneDNN kernel with, for each of its three tensors, MindSpore's plain layout and the layout the kernel wants.
struct Kernel {
  primitive kernel;
  memory::desc plain[3], blocked[3];  // in src, weights, dst order
  int args[3];
  int output;  // which of the three the kernel writes
};

// The layouts asked of the kernel: weights in the kernel's choice (blocked), activations too or in MindSpore's NCHW.
struct Wanted {
  memory::desc src, wei, dst;
  explicit Wanted(const Geometry &g)
      : src(g.src, dt::f32, g.plain ? tag::nchw : tag::any),
        wei(g.wei, dt::f32, tag::any),
        dst(g.dst, dt::f32, g.plain ? tag::nchw : tag::any) {}
};

convolution_forward::primitive_desc forward_hint(const Geometry &g, algorithm algo) {
  const Wanted w(g);
  convolution_forward::desc d(prop_kind::forward_training, algo, w.src, w.wei, w.dst, g.strides, g.pad_l, g.pad_r);
  return convolution_forward::primitive_desc(d, cpu());
}

// The kernels built so far as "<f|d|w>:<oneDNN's name>" (forward, data and weight gradient; e.g.
// "w:jit_wino_4x3:avx512_core"), for KernelNames. Written on the worker thread while the caller holds g_lock.
std::set<std::string> g_kernel_names;

std::unique_ptr<Kernel> kernel_for(char kind, const Geometry &g, algorithm algo) {
  auto k = std::make_unique<Kernel>();
  k->plain[0] = memory::desc(g.src, dt::f32, tag::nchw);
  k->plain[1] = memory::desc(g.wei, dt::f32, tag::oihw);
  k->plain[2] = memory::desc(g.dst, dt::f32, tag::nchw);
  const Wanted w(g);
  auto hint = forward_hint(g, algo);
  if (kind == 'f') {
    k->kernel = convolution_forward(hint);
    g_kernel_names.insert("f:" + std::string(hint.impl_info_str()));
    k->blocked[0] = hint.src_desc(), k->blocked[1] = hint.weights_desc(), k->blocked[2] = hint.dst_desc();
    k->args[0] = DNNL_ARG_SRC, k->args[1] = DNNL_ARG_WEIGHTS, k->args[2] = DNNL_ARG_DST;
    k->output = 2;
  } else if (kind == 'd') {
    convolution_backward_data::desc d(algo, w.src, w.wei, w.dst, g.strides, g.pad_l, g.pad_r);
    convolution_backward_data::primitive_desc pd(d, cpu(), hint);
    k->kernel = convolution_backward_data(pd);
    g_kernel_names.insert("d:" + std::string(pd.impl_info_str()));
    k->blocked[0] = pd.diff_src_desc(), k->blocked[1] = pd.weights_desc(), k->blocked[2] = pd.diff_dst_desc();
    k->args[0] = DNNL_ARG_DIFF_SRC, k->args[1] = DNNL_ARG_WEIGHTS, k->args[2] = DNNL_ARG_DIFF_DST;
    k->output = 0;
  } else {
    convolution_backward_weights::desc d(algo, w.src, w.wei, w.dst, g.strides, g.pad_l, g.pad_r);
    convolution_backward_weights::primitive_desc pd(d, cpu(), hint);
    k->kernel = convolution_backward_weights(pd);
    g_kernel_names.insert("w:" + std::string(pd.impl_info_str()));
    k->blocked[0] = pd.src_desc(), k->blocked[1] = pd.diff_weights_desc(), k->blocked[2] = pd.diff_dst_desc();
    k->args[0] = DNNL_ARG_SRC, k->args[1] = DNNL_ARG_DIFF_WEIGHTS, k->args[2] = DNNL_ARG_DIFF_DST;
    k->output = 1;
  }
  return k;
}

const Kernel &cached_kernel(char kind, const Geometry &g) {
  static std::map<std::string, std::unique_ptr<Kernel>> kernels;
  auto &slot = kernels[g.key(kind)];
  if (!slot && g.winograd) {
    try {
      slot = kernel_for(kind, g, algorithm::convolution_winograd);
    } catch (const dnnl::error &) {  // not on this CPU (AVX-512 only) or not for this shape: the direct kernel
    }
  }
  if (!slot) slot = kernel_for(kind, g, algorithm::convolution_direct);
  return *slot;
}

// Blocked copies of the inputs made during one call, so that two kernels reading the same tensor in the same
// layout (dy in both gradients) reorder it once.
struct Staged {
  const void *plain;
  memory::desc blocked;
  memory mem;
};

// Runs the kernels in order on MindSpore's buffers (src, weights, dst roles of each).
void run(const Geometry &g, std::initializer_list<std::pair<char, std::array<void *, 3>>> steps) {
  auto &s = cpu_stream();
  std::vector<Staged> staged;
  int slot = 0;
  for (const auto &step : steps) {
    const Kernel &k = cached_kernel(step.first, g);
    memory mem[3];
    for (int i = 0; i < 3; ++i) {
      void *data = step.second[i];
      if (k.blocked[i] == k.plain[i]) {
        mem[i] = memory(k.plain[i], cpu(), data);
        continue;
      }
      if (i != k.output) {
        bool found = false;
        for (const auto &st : staged)
          if (st.plain == data && st.blocked == k.blocked[i]) mem[i] = st.mem, found = true;
        if (found) continue;
      }
      mem[i] = memory(k.blocked[i], cpu(), scratch(slot++, k.blocked[i].get_size()));
      if (i != k.output) {
        memory plain(k.plain[i], cpu(), data);
        reorder(plain, mem[i]).execute(s, plain, mem[i]);
        staged.push_back({data, k.blocked[i], mem[i]});
      }
    }
    k.kernel.execute(s, {{k.args[0], mem[0]}, {k.args[1], mem[1]}, {k.args[2], mem[2]}});
    int o = k.output;
    if (!(k.blocked[o] == k.plain[o])) {
      memory plain(k.plain[o], cpu(), step.second[o]);
      reorder(mem[o], plain).execute(s, mem[o], plain);
    }
  }
  s.wait();
}

Geometry geometry(const int64_t *shape_src, const int64_t *shape_wei, const int64_t *shape_dst, const int64_t *geo,
                  int64_t geo_length) {
  if (geo_length != 9) throw std::runtime_error("geometry has " + std::to_string(geo_length) + " entries, not 9");
  Geometry g;
  g.src = dims_of(4, shape_src);
  g.wei = dims_of(4, shape_wei);
  g.dst = dims_of(4, shape_dst);
  g.strides = {geo[0], geo[1]};
  g.pad_l = {geo[2], geo[4]};
  g.pad_r = {geo[3], geo[5]};
  g.winograd = geo[7] != 0;
  g.plain = geo[8] != 0;
  return g;
}

// Every call runs on this one thread, so OpenMP keeps one team of threads: MindSpore calls an operator from
// whichever of its threads is free, and libgomp would give each of them a team of its own.
class Worker {
 public:
  Worker() { std::thread([this] { loop(); }).detach(); }  // lives as long as the process

  void run(const std::function<void()> &job) {
    std::unique_lock<std::mutex> hold(lock_);
    job_ = &job, error_ = nullptr;
    wake_.notify_all();
    done_.wait(hold, [this] { return job_ == nullptr; });
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void loop() {
    std::unique_lock<std::mutex> hold(lock_);
    for (;;) {
      wake_.wait(hold, [this] { return job_ != nullptr; });
      try {
        (*job_)();
      } catch (...) {
        error_ = std::current_exception();
      }
      job_ = nullptr;
      done_.notify_all();
    }
  }

  std::mutex lock_;
  std::condition_variable wake_, done_;
  const std::function<void()> *job_ = nullptr;
  std::exception_ptr error_;
};

// Checks what MindSpore passed (float32, 4-D, the operator's arity), then runs `body` (run_on_worker).
int guarded(const char *name, int nparam, int expected, int *ndims, const char **dtypes,
            const std::function<void()> &body) {
  return run_on_worker(("onednn_conv " + std::string(name)).c_str(), [&] {
    if (nparam != expected) throw std::runtime_error("expected " + std::to_string(expected) + " tensors");
    for (int i = 0; i < nparam; ++i) {
      bool geometry = ndims[i] == 1 && std::strcmp(dtypes[i], "int64") == 0;
      if (!geometry && (ndims[i] != 4 || std::strcmp(dtypes[i], "float32") != 0))
        throw std::runtime_error(std::string("float32 NCHW tensors only, got ") + dtypes[i] + " of rank " +
                                 std::to_string(ndims[i]));
    }
    body();
  });
}

}  // namespace

// Runs `body` on the worker thread, one call at a time, for every operator of the library (small_map_conv.cc,
// fused_momentum.cc and norm_relu.cc too): each uses both cores, and OpenMP keeps one team. A failure is one line on stderr, "<what>:
// <why>", and a non-zero return, which MindSpore raises as an error.
int run_on_worker(const char *what, const std::function<void()> &body) {
  try {
    static Worker *worker = new Worker;  // never destroyed: its thread may outlive static destructors
    cpu();  // lifts the ISA cap before any oneDNN call, the GEMMs (small_map_conv.cc) included, which need no engine
    std::lock_guard<std::mutex> one_call_at_a_time(g_lock);
    worker->run(body);
    return 0;
  } catch (const std::exception &e) {
    std::fprintf(stderr, "%s: %s\n", what, e.what());
  } catch (...) {
    std::fprintf(stderr, "%s: unknown error\n", what);
  }
  return 1;
}

extern "C" {

int ConvForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                void *extra) {
  // x, w, geometry -> y
  return guarded("forward", nparam, 4, ndims, dtypes, [&] {
    Geometry g = geometry(shapes[0], shapes[1], shapes[3], static_cast<int64_t *>(params[2]), shapes[2][0]);
    run(g, {{'f', {params[0], params[1], params[3]}}});
  });
}

int ConvBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                 void *extra) {
  // dy, x, w, geometry -> dx, dw
  return guarded("backward", nparam, 6, ndims, dtypes, [&] {
    const int64_t *geo = static_cast<int64_t *>(params[3]);
    Geometry g = geometry(shapes[1], shapes[2], shapes[0], geo, shapes[3][0]);
    if (geo[6]) {
      run(g, {{'d', {params[4], params[2], params[0]}}, {'w', {params[1], params[5], params[0]}}});
    } else {  // the network's input: nobody reads its gradient
      std::memset(params[4], 0, product(shapes[1], 4) * sizeof(float));
      run(g, {{'w', {params[1], params[5], params[0]}}});
    }
  });
}

// The kernels built so far, comma-separated (which ones a network's convolutions ran on).
const char *KernelNames() {
  thread_local std::string text;  // valid until this thread's next call
  std::lock_guard<std::mutex> hold(g_lock);
  text.clear();
  for (const auto &name : g_kernel_names) text += (text.empty() ? "" : ",") + name;
  return text.c_str();
}

// "oneDNN X.Y.Z, <isa>" for the log line, or nullptr when oneDNN cannot run here.
const char *OneDnnVersion() {
  static std::string text;
  try {
    cpu();  // applies the ISA setting first
    const dnnl_version_t *v = dnnl_version();
    const char *isa = "x64";
    switch (get_effective_cpu_isa()) {
      case cpu_isa::avx512_core_amx: isa = "avx512_core_amx"; break;
      case cpu_isa::avx512_core_bf16: isa = "avx512_core_bf16"; break;
      case cpu_isa::avx512_core_vnni: isa = "avx512_core_vnni"; break;
      case cpu_isa::avx512_core: isa = "avx512_core"; break;
      case cpu_isa::avx2_vnni: isa = "avx2_vnni"; break;
      case cpu_isa::avx2: isa = "avx2"; break;
      case cpu_isa::avx: isa = "avx"; break;
      case cpu_isa::sse41: isa = "sse41"; break;
      default: break;
    }
    text = "oneDNN " + std::to_string(v->major) + "." + std::to_string(v->minor) + "." + std::to_string(v->patch) +
           ", " + isa;
    return text.c_str();
  } catch (const std::exception &e) {
    std::fprintf(stderr, "onednn_conv: %s\n", e.what());
    return nullptr;
  }
}
}
