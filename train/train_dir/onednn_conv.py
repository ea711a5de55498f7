"""Convolutions for CPU training on oneDNN's blocked-layout kernels (onednn_conv.cc), as MindSpore custom operators.

MindSpore's CPU convolution takes NCHW only and runs oneDNN's GEMM convolution one image at a time; PyTorch reorders
into blocked layouts and runs oneDNN's direct kernels (jit:avx512_core on this machine), which are faster on most
of ResNet's layers; 1x1 convolutions on large maps run as oneDNN's GEMM on NCHW itself, at AVX-512 where
MindSpore's is held to AVX2. `resnet.Conv2d` calls these operators while training on CPU, for the layers where they
measured faster in a training step (3x3, 7x7, deep 1x1, 1x1 on maps of 14x14 and more: README, Performance); the
weights stay MindSpore's NCHW parameters, so checkpoints and exports are unchanged.

The same library holds the other CPU training operators that beat MindSpore's in a step: the small maps' matmuls on
oneDNN's GEMM and a convolution on a tiny map as one dense matrix (small_map_conv.cc, resnet.Conv2d), BatchNorm with
its residual sum and ReLU in one pass (norm_relu.cc, resnet.BatchNorm2d), and the whole momentum step in one pass
(fused_momentum.cc, train_step.FusedMomentum).

The library is built on first use from these sources with the system's C++ compiler (`$CXX`, else g++) against the
system's oneDNN (Debian's libdnnl-dev: `make venv` installs it where apt-get can), into a cache folder, once per
source and compiler. Without either, `load()` says why and training uses MindSpore's convolution.
"""
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("onednn_conv.cc")
# one library: also the dense matrix of convolutions on tiny maps (resnet.Conv2d) and train_step.FusedMomentum's step
SOURCES = (SOURCE, SOURCE.with_name("small_map_conv.cc"), SOURCE.with_name("fused_momentum.cc"),
           SOURCE.with_name("norm_relu.cc"))
# -ffp-contract=off: no fused multiply-adds, so the momentum step rounds as MindSpore's own kernels do
FLAGS = ("-O2", "-std=c++14", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC")
DISABLE = "RESNET_ONEDNN_CONV"  # "0" turns the operators off (the benchmark's and tests' reference runs)
# OpenMP threads that wait by sleeping. The library runs on OpenMP (libgomp, which MindSpore loads too): between two
# of its calls MindSpore's own threads run BatchNorm and the rest, and OpenMP threads spinning meanwhile starve them
# (a 32x32 training step ran 6x slower). libgomp reads this once, when it is loaded: before MindSpore is imported.
OPENMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def quiet_openmp(environ=os.environ):
    """Sets OPENMP_ENV unless the user set it: call before importing MindSpore (train.py does, first thing)."""
    for key, value in OPENMP_ENV.items():
        environ.setdefault(key, value)


class Library:
    """The compiled operators: `path` for ops.Custom, `version` ("oneDNN 2.6.3") for the log line."""

    def __init__(self, path, version):
        self.path, self.version = path, version

    def forward(self, output_shape):
        """y = conv(x, w) with geometry [stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right, dx?, Winograd?,
        plain layout?] (resnet._plan), and its gradients through one backward operator. `output_shape(x_shape)` gives y's shape."""
        import mindspore.ops as ops
        backward = ops.Custom(f"{self.path}:ConvBackward", out_shape=lambda dy, x, w, geometry: (x, w),
                              out_dtype=lambda dy, x, w, geometry: (x, w), func_type="aot")

        def bprop(x, w, geometry, out, dout):
            dx, dw = backward(dout, x, w, geometry)
            return dx, dw, ops.zeros_like(geometry)

        return ops.Custom(f"{self.path}:ConvForward", out_shape=lambda x, w, geometry: output_shape(x),
                          out_dtype=lambda x, w, geometry: x, func_type="aot", bprop=bprop)

    def dense_weights(self, output_shape):
        """B = DenseWeights(w, x, geometry) (small_map_conv.cc): a convolution on a tiny map as one (out channels *
        out pixels, in channels * in pixels) matrix, for y = x . B^T; x gives only its shape; its backward sums the
        taps' gradients back into w. `output_shape(x_shape)` is the convolution's output shape."""
        import mindspore.ops as ops
        backward = ops.Custom(f"{self.path}:DenseWeightsGrad", out_shape=lambda db, w, x, geometry: w,
                              out_dtype=lambda db, w, x, geometry: w, func_type="aot")

        def bprop(w, x, geometry, out, dout):
            return backward(dout, w, x, geometry), ops.zeros_like(x), ops.zeros_like(geometry)

        def matrix_shape(w, x, geometry):
            _, out_c, out_h, out_w = output_shape(x)
            return [out_c * out_h * out_w, x[1] * x[2] * x[3]]

        return ops.Custom(f"{self.path}:DenseWeights", out_shape=matrix_shape, out_dtype=lambda w, x, geometry: w,
                          func_type="aot", bprop=bprop)

    def matmul_by_weight(self):
        """c = MatmulByWeight(a, b) = a . b^T (small_map_conv.cc), as ops.MatMul(transpose_b=True), on oneDNN's GEMM
        at AVX-512; its backward gives both gradients in one operator."""
        import mindspore.ops as ops
        backward = ops.Custom(f"{self.path}:MatmulByWeightGrad", out_shape=lambda dc, a, b: (a, b),
                              out_dtype=lambda dc, a, b: (a, b), func_type="aot")

        def bprop(a, b, out, dout):
            return backward(dout, a, b)

        return ops.Custom(f"{self.path}:MatmulByWeight", out_shape=lambda a, b: [a[0], b[0]],
                          out_dtype=lambda a, b: a, func_type="aot", bprop=bprop)

    def batch_norm_relu(self, with_residual):
        """(y, saved, new_mean, new_var) = BatchNormRelu(x, gamma, beta, moving_mean, moving_var, settings), or
        BatchNormAddRelu(x, gamma, beta, moving_mean, moving_var, residual, settings) (norm_relu.cc): BatchNorm with
        batch statistics, plus the residual, then ReLU if settings[2]; new_mean and new_var are the moving statistics
        to assign. Its backward gives x's, gamma's, beta's (and the residual's) gradients in one operator."""
        import mindspore.ops as ops
        name = "BatchNormAddRelu" if with_residual else "BatchNormRelu"  # MindSpore keys the backward by name
        gradients = lambda dy, x, y, gamma, saved, settings: (x, gamma, gamma) + ((x,) if with_residual else ())
        backward = ops.Custom(f"{self.path}:{name}Grad", out_shape=gradients, out_dtype=gradients, func_type="aot")

        if with_residual:
            def bprop(x, gamma, beta, moving_mean, moving_var, residual, settings, out, dout):
                dx, dgamma, dbeta, dresidual = backward(dout[0], x, out[0], gamma, out[1], settings)
                return (dx, dgamma, dbeta, ops.zeros_like(moving_mean), ops.zeros_like(moving_var), dresidual,
                        ops.zeros_like(settings))
        else:
            def bprop(x, gamma, beta, moving_mean, moving_var, settings, out, dout):
                dx, dgamma, dbeta = backward(dout[0], x, out[0], gamma, out[1], settings)
                return (dx, dgamma, dbeta, ops.zeros_like(moving_mean), ops.zeros_like(moving_var),
                        ops.zeros_like(settings))

        return ops.Custom(f"{self.path}:{name}", out_shape=lambda x, gamma, *rest: (x, [2, gamma[0]], gamma, gamma),
                          out_dtype=lambda x, *rest: (x, x, x, x), func_type="aot", bprop=bprop)

    def momentum_step(self):
        """FusedMomentum(lr[n], decay[n], momentum[1], *vars, *accums, *grads) -> done[1] (fused_momentum.cc), which
        writes vars and accums in place: marked as writing memory, so MindSpore orders later reads after it."""
        import mindspore.ops as ops
        step = ops.Custom(f"{self.path}:FusedMomentum", out_shape=lambda *shapes: (1,),
                          out_dtype=lambda *dtypes: dtypes[0], func_type="aot")
        step.add_prim_attr("side_effect_mem", True)
        return step


def cache_dir(environ=os.environ):
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "resnet-train"


@functools.lru_cache(maxsize=None)
def load():
    """(Library, None) when the operators are usable here, else (None, why not)."""
    if os.environ.get(DISABLE) == "0":
        return None, f"{DISABLE}=0"
    if os.environ.get("OMP_WAIT_POLICY", "").lower() != "passive":
        return None, "OMP_WAIT_POLICY is not PASSIVE (set it before MindSpore is imported, as train.py does)"
    if platform.system() != "Linux":
        return None, "custom CPU operators need Linux"
    compiler = shutil.which(os.environ.get("CXX") or "g++")
    if compiler is None:
        return None, f"no C++ compiler ({os.environ.get('CXX') or 'g++'} not found)"
    try:
        path = build(compiler)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            if path.read_bytes()[:4] == b"\x7fELF":
                raise  # a sound file that does not load here (libdnnl.so.2 missing, a noexec cache): the reason
            path.unlink(missing_ok=True)  # a damaged build under the source's hash: built again
            lib = ctypes.CDLL(str(build(compiler)))
        lib.OneDnnVersion.restype = ctypes.c_char_p
        version = lib.OneDnnVersion()
        if not version:
            return None, "oneDNN does not start on this CPU"
        return Library(path, version.decode()), None
    except (OSError, subprocess.SubprocessError) as error:
        return None, str(error).splitlines()[0] if str(error) else type(error).__name__


def build(compiler):
    """The compiled library, built once per source and compiler; two jobs building at once each write their own
    temporary file and rename it into place."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    source = b"".join(path.read_bytes() for path in SOURCES)
    headers = Path("/usr/include/oneapi/dnnl/dnnl_version.h")  # a new oneDNN gets a new build
    library_version = headers.read_bytes() if headers.is_file() else b""
    tag = hashlib.sha256(source + version.encode() + platform.machine().encode() + library_version
                         + " ".join(FLAGS).encode()).hexdigest()[:16]
    folder = cache_dir()
    target = folder / f"onednn_conv-{tag}.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".onednn_conv-", suffix=".so")
    os.close(handle)
    try:
        result = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", temporary, "-ldnnl"],
                                capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            first = next((line for line in result.stderr.splitlines() if "error" in line),
                         (result.stderr.strip().splitlines() or ["?"])[0])
            hint = " (is libdnnl-dev installed?)" if "dnnl" in first else ""
            names = ", ".join(path.name for path in SOURCES)
            raise OSError(f"{Path(compiler).name} could not build {names}: {first.strip()}{hint}")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target
