"""The ResNet network family, with the MindSpore tutorial's parameter names (checkpoints.py loads other families'
weights into it).

Parameter names follow the tutorial so that its checkpoints load unchanged:
`conv1`, `norm`, `layerN.i.conv1..3`, `layerN.i.norm1..3`, `layerN.i.down_sample.0/1`, `fc`.
Two tutorial bugs are fixed: the basic block's conv2 takes `out_channel` inputs and has its own norm,
and the classifier uses global average pooling, so any input size works.

Convolutions pad the way the weights were trained: "same" (the tutorial, mindspore models) or "explicit"
symmetric (k-1)/2 padding (MindCV, mindvision), which shifts strided convolutions by a pixel; "pytorch"
(torchvision, timm) also pads the stem's max pool by one pixel on every side, where the others pad it "same". A
checkpoint written by this code records its padding as `resnet_padding`, and labels.json as `padding`.

On CPU, a convolution whose output map is 2x2 or smaller runs as one matmul over the batch (`Conv2d`), which makes
training at 32x32 about 1.8x faster. While training, convolutions run on oneDNN's kernels where those are faster
(`use_onednn_convolutions`, onednn_conv.py): the small maps' 1x1 matmuls on its GEMM, their 3x3 ones on its direct
kernels, larger maps on its blocked kernels; and BatchNorm with the residual sum and ReLU after it runs as one
operator on maps of 196 pixels (14x14) and more (`BatchNorm2d`).
"""
import itertools
import os
import weakref

import mindspore as ms
import mindspore.nn as nn
import mindspore.ops as ops
from mindspore.common.initializer import HeNormal

import onednn_conv

HEAD_PREFIX = "fc."


PADDINGS = ("same", "explicit", "pytorch")


SMALL_MAP_PIXELS = 4  # output maps up to 2x2 pixels run as one matmul on CPU ...
MATMUL_MIN_BATCH = 8  # ... in batches of 8 or more: a single image's GEMM is no narrower than its convolution's
AS_CONVOLUTION, AS_MATMUL, ON_ONEDNN, AS_DENSE_MATRIX = 0, 1, 2, 3  # how a Conv2d computes (choose_kernel) ...
KERNEL_METHODS = {AS_CONVOLUTION: "as_convolution", AS_MATMUL: "as_matmul", ON_ONEDNN: "on_onednn",
                  AS_DENSE_MATRIX: "as_dense_matrix"}  # ... in these
ONEDNN_MIN_1X1_CHANNELS = 1024
# 1x1 convolutions with output maps of at least 14x14 (224 inputs' first three stages) run as oneDNN's GEMM on
# MindSpore's NCHW tensors (no reorders), at AVX-512 where MindSpore's is held to AVX2: a 224x224 step 1.10x faster.
PLAIN_GEMM_MIN_SIDE = 14
# 3x3 stride-1 convolutions with output maps of at least 14x14 (224 inputs' first three stages) run on oneDNN's
# Winograd kernels where the CPU has them: 0.53x-0.80x the direct kernel's time there, slower on smaller maps (README,
# Performance). RESNET_ONEDNN_WINOGRAD=0 turns them off (the benchmark's comparison).
# Read when a graph compiles: with MindSpore's compile cache on, clear the cache after changing it.
WINOGRAD_MIN_SIDE = 14
# BatchNorm with its ReLU and residual as one operator (BatchNorm2d) on maps of 196 pixels (14x14) and more, where it is
# 3-4x faster than MindSpore's kernels and a 224x224 step 1.15-1.23x; on the 8x8 and 4x4 maps of 32x32 inputs, though
# faster alone, it made the step 1.03-1.14x slower (README, Performance).
FUSED_NORM_MIN_PIXELS = 14 * 14


_PLAN_KEYS = itertools.count()
_LAYERS = weakref.WeakValueDictionary()  # Conv2d by plan_key, for _plan


@ops.constexpr(reuse_result=False)
def _plan(plan_key, x_shape, dtype, training):
    """How a Conv2d computes an input of `x_shape`: (its method, pads, output size, the oneDNN operator's geometry),
    worked out by Python while the graph compiles and put in it as one constant. Traced into the graph instead,
    this arithmetic made ResNet18's training graph compile 1.7x slower and its validation graph 2.2x. `training`
    (the layer's own, which choose_kernel reads) is an argument so that no plan is reused across set_train."""
    del training
    layer = _LAYERS[plan_key]
    (top, bottom, left, right), (_, _, out_h, out_w) = layer.pads(*x_shape[2:]), layer.output_shape(x_shape)
    compute = KERNEL_METHODS[layer.choose_kernel(x_shape[0], dtype, out_h * out_w, x_shape[2] * x_shape[3])]
    winograd = (layer.kernel_size == (3, 3) and layer.stride == (1, 1) and min(out_h, out_w) >= WINOGRAD_MIN_SIDE
                and os.environ.get("RESNET_ONEDNN_WINOGRAD") != "0")
    plain = layer.runs_as_plain_gemm(out_h * out_w)
    geometry = (*layer.stride, top, bottom, left, right, int(layer.input_needs_gradient), int(winograd), int(plain))
    return compute, (top, bottom, left, right), (out_h, out_w), geometry


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same results) that computes small output maps as one matrix multiply on CPU.

    MindSpore's CPU convolution runs one GEMM per image, as wide as the output map, so on the 2x2 and 1x1 maps of
    ResNet's last two stages (32x32 inputs) it runs at a few GFLOP/s. Unfolding the batch into one matmul makes a
    convolution's forward and backward 1.4x (3x3 on 2x2) to 10x (1x1 on 1x1) faster there, and ResNet50's whole
    training step at 32x32 about 1.8x faster (README, Performance). From 4x4 maps on, or for fewer than 8 images
    (batch-1 inference), the convolution is faster. While training, 3x3 and 7x7 convolutions and the deep 1x1 ones
    run on oneDNN's blocked kernels where the library is built (`use_onednn_convolutions`, onednn_conv.py), the 3x3
    stride-1 ones on large maps on its Winograd kernels, 1x1 ones on large maps as its GEMM on NCHW, and those on
    1x1 maps (and the 3x3 from 2x2 to 1x1) as one dense matrix with no padding in it; the small maps' matmuls run on
    oneDNN's GEMM at AVX-512. GPU and Ascend keep their convolutions.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.small_maps_as_matmul = (ms.get_context("device_target") == "CPU" and self.group == 1
                                     and self.dilation in ((1, 1), (1, 1, 1, 1)) and self.data_format == "NCHW")
        self.matmul_by_weight = ops.MatMul(transpose_b=True)
        self.onednn_forward = None  # set by use_onednn_convolutions ...
        self.dense_weights = None  # ... as are these
        self.onednn_matmul_by_weight = None
        self.input_needs_gradient = True  # False for the network's first convolution: nothing reads the images' one
        self.plan_key = next(_PLAN_KEYS)
        _LAYERS[self.plan_key] = self

    def __setstate__(self, state):  # a copy (copy.copy/deepcopy, pickle) plans as itself, and outlives its original
        super().__setstate__(state)
        self.__dict__ = dict(self.__dict__)  # Cell shares the original's in a shallow copy: the key would be shared
        self.plan_key = next(_PLAN_KEYS)
        _LAYERS[self.plan_key] = self

    def pads(self, in_h, in_w):
        """(top, bottom, left, right) as the convolution pads a map of this size."""
        if self.pad_mode == "pad":
            return self.padding if isinstance(self.padding, tuple) else (self.padding,) * 4
        if self.pad_mode == "valid":
            return (0, 0, 0, 0)
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        total_h = max((in_h + sh - 1) // sh * sh - sh + kh - in_h, 0)  # "same": output ceil(in / stride)
        total_w = max((in_w + sw - 1) // sw * sw - sw + kw - in_w, 0)
        return (total_h // 2, total_h - total_h // 2, total_w // 2, total_w - total_w // 2)

    def construct(self, x):
        compute, pads, out_size, geometry = _plan(self.plan_key, x.shape, x.dtype, self.training)
        output = getattr(self, compute)(x, pads, out_size, geometry)  # only the method chosen is compiled
        if self.has_bias:
            output = self.bias_add(output, self.bias)
        return output

    def choose_kernel(self, batch, dtype, out_pixels, in_pixels):
        """How this layer computes, by what measured fastest in a training step (README, Performance)."""
        if self.small_maps_as_matmul and out_pixels <= SMALL_MAP_PIXELS and batch >= MATMUL_MIN_BATCH:
            if self.training and self.dense_weights is not None and dtype == ms.float32:
                # The dense matrix wins where it is no larger than the weight (3x3 on 1x1 maps: 5.6x faster,
                # forward and backward); on 2x2 maps building it costs more than the padding's products it saves,
                # and there oneDNN's direct kernel beats unfolding 3x3 patches for a GEMM (a step 1.01-1.05x faster).
                if self.dense_matrix_fits(out_pixels, in_pixels):
                    return AS_DENSE_MATRIX
                if self.kernel_size != (1, 1):
                    return ON_ONEDNN
            return AS_MATMUL
        # In a training step, oneDNN's kernels (with their reorders) beat MindSpore's on 3x3 and 7x7 convolutions,
        # and on 1x1 ones in the deep layers (1024+ channels); a shallow 1x1 convolution is one GEMM either way, and
        # the reorders cost more than they save, unless it runs on NCHW without them (large maps: _plan).
        deep = max(self.in_channels, self.out_channels) >= ONEDNN_MIN_1X1_CHANNELS
        if self.training and self.onednn_forward is not None and dtype == ms.float32 and (
                self.kernel_size != (1, 1) or deep or self.runs_as_plain_gemm(out_pixels)):
            return ON_ONEDNN
        return AS_CONVOLUTION

    def dense_matrix_fits(self, out_pixels, in_pixels):
        """Whether the dense matrix from input to output pixels is no larger than the kernel (as_dense_matrix)."""
        return out_pixels * in_pixels <= self.kernel_size[0] * self.kernel_size[1]

    def runs_as_plain_gemm(self, out_pixels):
        """Whether oneDNN runs this convolution as its GEMM on NCHW, with no reorders (1x1 on large maps)."""
        return self.kernel_size == (1, 1) and out_pixels >= PLAIN_GEMM_MIN_SIDE ** 2

    def output_shape(self, x_shape):
        """[n, out_channels, out_h, out_w] for an input of `x_shape` (also the custom operator's shape inference)."""
        n, _, in_h, in_w = x_shape
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        top, bottom, left, right = self.pads(in_h, in_w)
        return [n, self.out_channels, (in_h + top + bottom - kh) // sh + 1, (in_w + left + right - kw) // sw + 1]

    def as_convolution(self, x, pads, out_size, geometry):
        return self.conv2d(x, self.weight)

    def on_onednn(self, x, pads, out_size, geometry):
        return self.onednn_forward(x, self.weight, ms.Tensor(geometry, ms.int64))

    def as_dense_matrix(self, x, pads, out_size, geometry):
        if self.kernel_size == (1, 1) and x.shape[2] * x.shape[3] == 1:  # the matrix is the weight: nothing to copy
            matrix = self.weight.reshape(self.out_channels, -1)
        else:
            matrix = self.dense_weights(self.weight, x, ms.Tensor(geometry, ms.int64))  # (out * Q, in * P)
        return self.matmul(x.reshape(x.shape[0], -1), matrix).reshape(x.shape[0], -1, *out_size)

    def as_matmul(self, x, pads, out_size, geometry):
        n, c, _, _ = x.shape
        out_h, out_w = out_size
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        if (kh, kw, sh, sw) == (1, 1, 1, 1) and pads == (0, 0, 0, 0):
            columns = x.transpose(0, 2, 3, 1).reshape(n * out_h * out_w, c)
        else:
            top, bottom, left, right = pads
            if top != bottom or left != right:  # "same" with a stride pads one side more; unfold pads both alike
                x = ops.Pad(((0, 0), (0, 0), (top, bottom), (left, right)))(x)
                top, left = 0, 0
            columns = ops.unfold(x, (kh, kw), padding=(top, left), stride=(sh, sw))  # (n, c * kh * kw, out pixels)
            columns = columns.transpose(0, 2, 1).reshape(n * out_h * out_w, c * kh * kw)
        # weights stay (out, in * kh * kw): transposing them in the matmul, not in memory, keeps it fast
        output = self.matmul(columns, self.weight.reshape(self.out_channels, -1))
        return output.reshape(n, out_h, out_w, -1).transpose(0, 3, 1, 2)

    def matmul(self, a, b):
        """a . b^T, training on oneDNN's GEMM at AVX-512 where the library is built (2.5-4x MindSpore's MatMul on
        these shapes), else MindSpore's MatMul (inference and exports too)."""
        if self.training and self.onednn_matmul_by_weight is not None and a.dtype == ms.float32:
            return self.onednn_matmul_by_weight(a, b)
        return self.matmul_by_weight(a, b)


def use_onednn_convolutions(net):
    """Training on CPU: the convolutions that oneDNN's kernels run faster run there, and BatchNorm with its residual
    and ReLU as one operator (BatchNorm2d), where the library builds (inference and exports keep MindSpore's).
    Returns the log line saying which kernels training uses (None off CPU)."""
    if ms.get_context("device_target") != "CPU":
        return None
    library, reason = onednn_conv.load()
    if library is None:
        return f"convolutions: MindSpore's ({reason})"
    convolutions = [cell for _, cell in net.cells_and_names() if isinstance(cell, Conv2d) and cell.small_maps_as_matmul]
    try:
        operators = [(library.forward(cell.output_shape), library.dense_weights(cell.output_shape))
                     for cell in convolutions]
        matmul_by_weight = library.matmul_by_weight()
        norms = (library.batch_norm_relu(False), library.batch_norm_relu(True))
    except (TypeError, ValueError, RuntimeError) as error:  # e.g. MS_CUSTOM_AOT_WHITE_LIST leaves the cache out
        return f"convolutions: MindSpore's (the custom operator was refused: {str(error).splitlines()[0]})"
    for cell, (forward, dense_weights) in zip(convolutions, operators):
        cell.onednn_forward, cell.dense_weights, cell.onednn_matmul_by_weight = forward, dense_weights, matmul_by_weight
    for _, cell in net.cells_and_names():
        if isinstance(cell, BatchNorm2d):
            cell.onednn_norm, cell.onednn_norm_with_residual = norms
    return (f"convolutions: oneDNN blocked kernels where faster ({library.version}, built from "
            f"{onednn_conv.SOURCE.name}); BatchNorm, residual and ReLU as one operator on maps of 14x14 and more")


def _conv(in_channel, out_channel, kernel_size, stride=1, padding="same"):
    # He init (the tutorial's N(0, 0.02) makes from-scratch training of deep nets diverge)
    symmetric = padding in ("explicit", "pytorch")
    pad = {"pad_mode": "pad", "padding": (kernel_size - 1) // 2} if symmetric else {"pad_mode": "same"}
    return Conv2d(in_channel, out_channel, kernel_size=kernel_size, stride=stride,
                  weight_init=HeNormal(mode="fan_out", nonlinearity="relu"), **pad)


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d (same parameters; results within float rounding) that can add a residual and apply a ReLU after
    it: `norm(x, residual, relu=True)` is relu(norm(x) + residual).

    Training on CPU with batch statistics, where the library is built, this is one operator forward and one backward
    on maps of 196 pixels (14x14) and more (norm_relu.cc, `use_onednn_convolutions`), in place of MindSpore's
    BatchNorm, Add and ReLU and their gradients, each a pass over memory; elsewhere (smaller maps, inference, exports,
    frozen statistics, GPU and Ascend) they are MindSpore's. The extra arguments go through construct, so that mixed
    precision's wrapper (amp O2, which wraps every BatchNorm) passes them on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.relu = ops.ReLU()
        self.onednn_norm = None  # set by use_onednn_convolutions, as is this, for a residual
        self.onednn_norm_with_residual = None

    def construct(self, x, residual=None, relu=False):
        if self.runs_fused(x):
            settings = ms.Tensor([self.eps, self.momentum, 1.0 if relu else 0.0], ms.float32)
            if residual is None:
                y, _, mean, variance = self.onednn_norm(x, self.gamma, self.beta, self.moving_mean,
                                                        self.moving_variance, settings)
            else:
                y, _, mean, variance = self.onednn_norm_with_residual(x, self.gamma, self.beta, self.moving_mean,
                                                                      self.moving_variance, residual, settings)
            ops.assign(self.moving_mean, mean)
            ops.assign(self.moving_variance, variance)
            return y
        y = super().construct(x)
        if residual is not None:
            y = y + residual
        if relu:
            y = self.relu(y)
        return y

    def runs_fused(self, x):
        return (self.training and self.use_batch_statistics is not False and self.onednn_norm is not None
                and self.format == "NCHW" and x.dtype == ms.float32 and x.ndim == 4
                and x.shape[2] * x.shape[3] >= FUSED_NORM_MIN_PIXELS)


def _norm(channel, last_in_block=False):
    # A residual block's last norm starts at zero, so every block starts as the identity (Goyal et al. 2017)
    return BatchNorm2d(channel, gamma_init="zeros" if last_in_block else "ones")


class BasicBlock(nn.Cell):
    """Two 3x3 convolutions (ResNet18/34)."""
    expansion = 1

    def __init__(self, in_channel, out_channel, stride=1, down_sample=None, padding="same"):
        super().__init__()
        self.conv1 = _conv(in_channel, out_channel, 3, stride, padding)
        self.norm1 = _norm(out_channel)
        self.conv2 = _conv(out_channel, out_channel, 3, padding=padding)
        self.norm2 = _norm(out_channel, last_in_block=True)
        self.down_sample = down_sample

    def construct(self, x):
        identity = x if self.down_sample is None else self.down_sample(x)
        out = self.norm1(self.conv1(x), relu=True)
        return self.norm2(self.conv2(out), identity, relu=True)


class Bottleneck(nn.Cell):
    """1x1 -> 3x3 (strided) -> 1x1 with 4x expansion (ResNet50/101)."""
    expansion = 4

    def __init__(self, in_channel, out_channel, stride=1, down_sample=None, padding="same"):
        super().__init__()
        self.conv1 = _conv(in_channel, out_channel, 1)
        self.norm1 = _norm(out_channel)
        self.conv2 = _conv(out_channel, out_channel, 3, stride, padding)
        self.norm2 = _norm(out_channel)
        self.conv3 = _conv(out_channel, out_channel * self.expansion, 1)
        self.norm3 = _norm(out_channel * self.expansion, last_in_block=True)
        self.down_sample = down_sample

    def construct(self, x):
        identity = x if self.down_sample is None else self.down_sample(x)
        out = self.norm1(self.conv1(x), relu=True)
        out = self.norm2(self.conv2(out), relu=True)
        return self.norm3(self.conv3(out), identity, relu=True)


def _stem_pool(padding):
    """3x3 max pool, stride 2. PyTorch pads one pixel on each side; zeros then do what its -inf would, because the
    pool's input has passed a ReLU (no value below 0), and a zero pad runs on every MindSpore version and in ONNX."""
    if padding != "pytorch":
        return nn.MaxPool2d(kernel_size=3, stride=2, pad_mode="same")  # MindSpore's families
    return nn.SequentialCell([nn.Pad(((0, 0), (0, 0), (1, 1), (1, 1))),
                              nn.MaxPool2d(kernel_size=3, stride=2, pad_mode="valid")])


def _make_layer(in_channel, block, channel, block_count, stride=1, padding="same"):
    out_channel = channel * block.expansion
    down_sample = None
    if stride != 1 or in_channel != out_channel:
        down_sample = nn.SequentialCell([
            _conv(in_channel, out_channel, 1, stride),
            _norm(out_channel),
        ])
    blocks = [block(in_channel, channel, stride=stride, down_sample=down_sample, padding=padding)]
    blocks += [block(out_channel, channel, padding=padding) for _ in range(1, block_count)]
    return nn.SequentialCell(blocks)


class ResNet(nn.Cell):
    def __init__(self, block, layer_counts, num_classes, padding="same"):
        super().__init__()
        self.padding = padding
        self.conv1 = _conv(3, 64, 7, stride=2, padding=padding)
        self.conv1.input_needs_gradient = False
        self.norm = _norm(64)
        self.max_pool = _stem_pool(padding)
        self.layer1 = _make_layer(64, block, 64, layer_counts[0], padding=padding)
        self.layer2 = _make_layer(64 * block.expansion, block, 128, layer_counts[1], 2, padding)
        self.layer3 = _make_layer(128 * block.expansion, block, 256, layer_counts[2], 2, padding)
        self.layer4 = _make_layer(256 * block.expansion, block, 512, layer_counts[3], 2, padding)
        self.num_features = 512 * block.expansion
        self.fc = nn.Dense(self.num_features, num_classes)

    def features(self, x):
        x = self.max_pool(self.norm(self.conv1(x), relu=True))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return ops.mean(x, axis=(2, 3))  # global average pooling: any input size

    def construct(self, x):
        return self.fc(self.features(x))

    def freeze_backbone(self):
        """Fixed-feature mode: only `fc` trains."""
        self.train_only(["fc"])

    def train_only(self, layers):
        """Partial fine-tuning: only the named top-level layers (e.g. layer4, fc) train; BatchNorm elsewhere keeps
        its moving statistics untouched, so frozen layers compute exactly what the pretrained ones did."""
        prefixes = tuple(f"{layer}." for layer in layers)
        for name, param in self.parameters_and_names():
            param.requires_grad = name.startswith(prefixes)
        for name, cell in self.cells_and_names():
            if isinstance(cell, nn.BatchNorm2d) and not f"{name}.".startswith(prefixes):
                cell.use_batch_statistics = False


ARCHS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


def create_model(arch, num_classes, padding="same"):
    block, layer_counts = ARCHS[arch]
    return ResNet(block, layer_counts, num_classes, padding)
