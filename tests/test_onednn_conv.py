"""resnet.Conv2d on oneDNN's blocked kernels (train/train_dir/onednn_conv.cc) against MindSpore's convolution: the
same outputs and gradients for every convolution ResNet has, the same training on the demo data, and today's path,
with one line saying why, wherever the library cannot be built."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import onednn_conv
from conftest import TRAIN_DIR
from make_demo_data import make_demo_data

_disabled = os.environ.pop(onednn_conv.DISABLE, None)  # conftest turns the operators off for the other tests' jobs
LIBRARY, WHY_NOT = onednn_conv.load.__wrapped__()
if _disabled is not None:
    os.environ[onednn_conv.DISABLE] = _disabled
needs_library = pytest.mark.skipif(LIBRARY is None, reason=f"oneDNN convolutions unavailable: {WHY_NOT}")


@pytest.fixture(autouse=True)
def onednn_on(monkeypatch):
    monkeypatch.delenv(onednn_conv.DISABLE, raising=False)
    monkeypatch.delenv("RESNET_ONEDNN_WINOGRAD", raising=False)
    onednn_conv.load.cache_clear()
    yield
    onednn_conv.load.cache_clear()

# (kernel, stride, input map) for each padding: every convolution ResNet18-101 has (7x7/2 stem, 1x1 and 3x3 at
# strides 1 and 2), on even and odd maps (a "same" strided convolution pads one side more on even ones), down to
# the 1x1 maps of layer4 at 32x32 inputs, and 3x3 stride-1 ones on maps large enough for Winograd's kernels.
GEOMETRIES = [(7, 2, 32), (7, 2, 33), (1, 1, 8), (1, 2, 8), (1, 2, 7), (3, 1, 8), (3, 1, 7), (3, 2, 8), (3, 2, 7),
              (3, 1, 2), (3, 2, 4), (3, 1, 1), (1, 1, 1), (3, 2, 2), (1, 2, 2), (3, 1, 14), (3, 1, 17), (1, 1, 14),
              (1, 2, 28), (1, 2, 29)]
PADDINGS = ("same", "pytorch")


def convolution_cells(padding, forced=None, geometries=GEOMETRIES):
    """One convolution per geometry: MindSpore's nn.Conv2d, or resnet.Conv2d computing the `forced` way (on oneDNN,
    or as the tiny-map dense matrix) at every size."""
    import mindspore.nn as nn
    import resnet

    class Forced(resnet.Conv2d):
        def choose_kernel(self, batch, dtype, out_pixels, in_pixels):
            return forced

    cells = []
    for kernel, stride, _ in geometries:
        in_channels = 3 if kernel == 7 else 32
        pad = {"pad_mode": "same"} if padding == "same" else {"pad_mode": "pad", "padding": (kernel - 1) // 2}
        if forced is None:
            cell = nn.Conv2d(in_channels, 48, kernel, stride, **pad)
        else:
            cell = Forced(in_channels, 48, kernel, stride, **pad)
            cell.onednn_forward = LIBRARY.forward(cell.output_shape)
            cell.dense_weights = LIBRARY.dense_weights(cell.output_shape)
            cell.onednn_matmul_by_weight = LIBRARY.matmul_by_weight()
        cells.append(cell)
    return cells


def outputs_and_gradients(cells, inputs, directions, weights):
    """Each convolution's output, and the gradients of sum(output * direction) for its input and weight, in
    GRAPH_MODE and in training mode (where resnet.Conv2d uses oneDNN)."""
    import mindspore as ms
    import mindspore.nn as nn
    import mindspore.ops as ops

    class All(nn.Cell):
        def __init__(self):
            super().__init__()
            self.convs = nn.CellList(cells)

        def construct(self, *xs):
            return tuple(conv(x) for conv, x in zip(self.convs, xs))

    class Loss(nn.Cell):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def construct(self, *xs):
            total = 0
            for y, r in zip(self.net(*xs), directions):
                total = total + (y * r).sum()
            return total

    ms.set_context(mode=ms.GRAPH_MODE)
    net = All()
    for cell, weight in zip(cells, weights):
        cell.weight.set_data(ms.Tensor(weight))
    net.set_train()
    outputs = [y.asnumpy() for y in net(*inputs)]
    loss = Loss(net)
    loss.set_train()
    input_grads, weight_grads = ops.GradOperation(get_all=True, get_by_list=True)(
        loss, ms.ParameterTuple(net.trainable_params()))(*inputs)
    return outputs, [g.asnumpy() for g in input_grads], [g.asnumpy() for g in weight_grads]


def relative_error(ours, reference):
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def assert_like_mindspore(padding, forced, geometries):
    """Outputs and both gradients of the `forced` way against nn.Conv2d's, for each geometry."""
    import mindspore as ms
    rng = np.random.default_rng(0)
    reference_cells = convolution_cells(padding, None, geometries)
    inputs = tuple(ms.Tensor(rng.normal(size=(4, cell.in_channels, size, size)).astype(np.float32))
                   for cell, (_, _, size) in zip(reference_cells, geometries))
    weights = [rng.normal(scale=0.1, size=cell.weight.shape).astype(np.float32) for cell in reference_cells]
    reference_shapes = [cell(x).shape for cell, x in zip(reference_cells, inputs)]
    directions = tuple(ms.Tensor(rng.normal(size=shape).astype(np.float32)) for shape in reference_shapes)

    expected = outputs_and_gradients(reference_cells, inputs, directions, weights)
    got = outputs_and_gradients(convolution_cells(padding, forced, geometries), inputs, directions, weights)
    for name, ours, theirs in zip(("output", "input gradient", "weight gradient"), got, expected):
        for geometry, a, b in zip(geometries, ours, theirs):
            assert a.shape == b.shape, (name, geometry, a.shape, b.shape)
            assert relative_error(a, b) < 2e-5, (name, geometry, relative_error(a, b))


@needs_library
@pytest.mark.parametrize("padding", PADDINGS)
def test_every_resnet_convolution_matches_mindspore_forward_and_backward(padding):
    import resnet
    assert_like_mindspore(padding, resnet.ON_ONEDNN, GEOMETRIES)
    kernels = kernel_names()
    assert "f:jit_1x1" in kernels, kernels
    for kind in "fdw":  # 1x1 on maps of 14x14 and more: oneDNN's GEMM on NCHW
        assert f"{kind}:x64:gemm:jit" in kernels, kernels
    for kind in "fdw":  # forward, data gradient, weight gradient: each on Winograd where the CPU has it
        assert (f"{kind}:jit_wino_4x3" in kernels) == ("avx512_core" in LIBRARY.version), kernels


# Every convolution ResNet has on maps whose dense matrix is no larger than the weight (layer4 at 32x32 inputs: 3x3
# on 1x1 maps, the strided 3x3 from 2x2 to 1x1, 1x1 on 1x1), and on the 2x2 maps where resnet.Conv2d does not use it.
DENSE_GEOMETRIES = [(3, 1, 1), (3, 2, 2), (1, 1, 1), (3, 1, 2), (1, 2, 2), (3, 2, 3)]


@needs_library
@pytest.mark.parametrize("padding", PADDINGS)
def test_tiny_maps_as_one_dense_matrix_match_mindspore_forward_and_backward(padding):
    import resnet
    assert_like_mindspore(padding, resnet.AS_DENSE_MATRIX, DENSE_GEOMETRIES)


# Every convolution ResNet runs as one matmul over the batch (output maps of 2x2 and less), and the 1x1 and strided
# ones on larger maps, where the unfolding differs.
MATMUL_GEOMETRIES = [(3, 1, 2), (1, 1, 2), (3, 2, 4), (1, 2, 4), (3, 2, 3), (3, 1, 1), (1, 1, 1), (3, 2, 2),
                     (1, 2, 2), (1, 1, 4), (3, 1, 4)]


@needs_library
@pytest.mark.parametrize("padding", PADDINGS)
def test_small_maps_as_one_matmul_on_onednns_gemm_match_mindspore_forward_and_backward(padding):
    import resnet
    assert_like_mindspore(padding, resnet.AS_MATMUL, MATMUL_GEOMETRIES)


@needs_library
def test_the_gemm_operator_computes_a_times_b_transposed_and_both_gradients():
    """MatmulByWeight against float64 numpy on the shapes of ResNet50's small-map layers at batch 32."""
    import mindspore as ms
    import mindspore.nn as nn
    import mindspore.ops as ops

    class Product(nn.Cell):
        def __init__(self, direction):
            super().__init__()
            self.matmul, self.direction = LIBRARY.matmul_by_weight(), direction

        def construct(self, a, b):
            return (self.matmul(a, b) * self.direction).sum()

    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(3)
    for rows, columns, k in ((128, 256, 2304), (32, 2048, 512), (5, 3, 7)):
        a, b = (rng.normal(size=shape).astype(np.float32) for shape in ((rows, k), (columns, k)))
        direction = rng.normal(size=(rows, columns)).astype(np.float32)
        product = Product(ms.Tensor(direction))
        loss = product(ms.Tensor(a), ms.Tensor(b)).asnumpy()
        da, db = (g.asnumpy() for g in ops.GradOperation(get_all=True)(product)(ms.Tensor(a), ms.Tensor(b)))
        a64, b64, d64 = a.astype(np.float64), b.astype(np.float64), direction.astype(np.float64)
        assert abs(loss - ((a64 @ b64.T) * d64).sum()) <= 1e-5 * np.abs(a64 @ b64.T * d64).sum()
        assert da.shape == a.shape and relative_error(da, d64 @ b64) < 1e-6, (rows, columns, k)
        assert db.shape == b.shape and relative_error(db, d64.T @ a64) < 1e-6, (rows, columns, k)


@needs_library
@pytest.mark.parametrize("shape", [(4, 16, 14, 15), (3, 8, 3, 2)])
def test_batchnorm_with_relu_and_residual_matches_mindspore_forward_backward_and_moving_statistics(shape, monkeypatch):
    """resnet.BatchNorm2d as one operator (norm_relu.cc) against MindSpore's BatchNorm, Add and ReLU: outputs, the
    gradients of input, residual, gamma and beta, and the moving statistics after a step, in GRAPH_MODE, on maps
    large and tiny (shorter than a vector), with a mean far from zero and an outlier (where E[x^2] - E[x]^2
    loses digits unless shifted near the mean); frozen statistics stay MindSpore's inference normalisation."""
    import mindspore as ms
    import mindspore.nn as nn
    import mindspore.ops as ops
    import resnet
    monkeypatch.setattr(resnet, "FUSED_NORM_MIN_PIXELS", 1)  # tiny maps too (ResNet fuses 14x14 and up)
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(4)
    x = (rng.normal(size=shape) * 2 + 50).astype(np.float32)
    x[0, :, 0, 0] = 1e4  # an outlier in the corner, where a shift by one pixel's value would lose digits
    x = ms.Tensor(x)
    residual = ms.Tensor(rng.normal(size=shape).astype(np.float32))
    direction = ms.Tensor(rng.normal(size=shape).astype(np.float32))
    moving_mean = (rng.normal(size=shape[1]) + 50).astype(np.float32)

    class Norm(nn.Cell):
        def __init__(self, how):
            super().__init__()
            self.norm, self.how = resnet.BatchNorm2d(shape[1], gamma_init="normal", beta_init="normal"), how

        def construct(self, x, residual):
            if self.how == "norm":
                y = self.norm(x)
            elif self.how == "relu":
                y = self.norm(x, relu=True)
            else:
                y = self.norm(x, residual, relu=True)
            return (y * direction).sum()

    def run(how, fused, frozen=False):
        ms.set_seed(7)
        net = Norm(how)
        if fused:
            net.norm.onednn_norm, net.norm.onednn_norm_with_residual = (LIBRARY.batch_norm_relu(False),
                                                                        LIBRARY.batch_norm_relu(True))
        net.norm.moving_mean.set_data(ms.Tensor(moving_mean))
        net.norm.moving_variance.set_data(ms.Tensor(np.full(shape[1], 3.0, np.float32)))
        if frozen:
            net.norm.use_batch_statistics = False
        net.set_train()
        assert net.norm.runs_fused(x) == (fused and not frozen)
        inputs, weights = ops.GradOperation(get_all=True, get_by_list=True)(
            net, ms.ParameterTuple(net.trainable_params()))(x, residual)
        loss = net(x, residual)  # the moving statistics move once more
        return [loss.asnumpy(), *(g.asnumpy() for g in inputs), *(g.asnumpy() for g in weights),
                net.norm.moving_mean.asnumpy(), net.norm.moving_variance.asnumpy()]

    names = ("output", "input gradient", "residual gradient", "gamma gradient", "beta gradient", "moving mean",
             "moving variance")
    for how in ("norm", "relu", "residual"):
        ours, theirs = run(how, True), run(how, False)
        for name, a, b in zip(names, ours, theirs):
            if np.abs(b).max() > 0 or np.abs(a).max() > 0:
                assert relative_error(a, b) < 1e-5, (how, name, relative_error(a, b))
    for a, b in zip(run("relu", True, frozen=True), run("relu", False, frozen=True)):
        np.testing.assert_array_equal(a, b)  # both MindSpore's, with the moving statistics


@needs_library
def test_the_dense_matrix_keeps_height_and_width_apart():
    """Non-square maps (1x2, 2x1, 3x1 to 2x1), where a tap read with height and width swapped would show."""
    import mindspore as ms
    import mindspore.nn as nn
    import resnet

    class Dense(resnet.Conv2d):
        def choose_kernel(self, batch, dtype, out_pixels, in_pixels):
            return resnet.AS_DENSE_MATRIX

    rng = np.random.default_rng(2)
    for shape, stride in (((4, 8, 1, 2), 2), ((4, 8, 2, 1), 2), ((4, 8, 3, 1), 2), ((4, 8, 1, 2), 1)):
        reference = nn.Conv2d(8, 6, 3, stride, pad_mode="same")
        ours = Dense(8, 6, 3, stride, pad_mode="same")
        ours.dense_weights = LIBRARY.dense_weights(ours.output_shape)
        ours.onednn_matmul_by_weight = LIBRARY.matmul_by_weight()
        x = (ms.Tensor(rng.normal(size=shape).astype(np.float32)),)
        out_shape = reference(x[0]).shape
        direction = (ms.Tensor(rng.normal(size=out_shape).astype(np.float32)),)
        weights = [rng.normal(scale=0.1, size=(6, 8, 3, 3)).astype(np.float32)]
        expected = outputs_and_gradients([reference], x, direction, weights)
        got = outputs_and_gradients([ours], x, direction, weights)
        for name, a, b in zip(("output", "input gradient", "weight gradient"), got, expected):
            assert a[0].shape == b[0].shape and relative_error(a[0], b[0]) < 2e-5, (name, shape, stride)


def test_winograd_is_asked_for_3x3_stride_1_on_maps_of_14_and_more_unless_turned_off(monkeypatch):
    import resnet
    cases = {(3, 1, 14): 1, (3, 1, 13): 0, (3, 2, 28): 0, (1, 1, 56): 0, (7, 2, 224): 0}
    for (kernel, stride, size), wanted in cases.items():
        layer = resnet.Conv2d(16, 16, kernel, stride, pad_mode="pad", padding=(kernel - 1) // 2)
        assert resnet._plan(layer.plan_key, (8, 16, size, size), None, True)[3][7] == wanted, (kernel, stride, size)
        monkeypatch.setenv("RESNET_ONEDNN_WINOGRAD", "0")
        assert resnet._plan(layer.plan_key, (8, 16, size, size), None, True)[3][7] == 0
        monkeypatch.delenv("RESNET_ONEDNN_WINOGRAD")


def test_1x1_convolutions_on_maps_of_14x14_and_more_ask_for_the_plain_layout():
    import resnet
    cases = {(1, 1, 14): 1, (1, 1, 13): 0, (1, 2, 28): 1, (1, 2, 25): 0, (3, 1, 56): 0, (1, 1, 224): 1}
    for (kernel, stride, size), wanted in cases.items():
        layer = resnet.Conv2d(16, 16, kernel, stride, pad_mode="pad", padding=(kernel - 1) // 2)
        assert resnet._plan(layer.plan_key, (8, 16, size, size), None, True)[3][8] == wanted, (kernel, stride, size)


def kernel_names():
    """oneDNN's names of the kernels the library has built in this process (MindSpore loads the same file)."""
    import ctypes
    library = ctypes.CDLL(str(LIBRARY.path))
    library.KernelNames.restype = ctypes.c_char_p
    return library.KernelNames().decode()


@needs_library
def test_the_stem_skips_the_images_gradient_and_still_gets_its_weights_right():
    """ResNet's first convolution leaves its input gradient at zero (nobody reads it) and saves that work."""
    import mindspore as ms
    import resnet
    rng = np.random.default_rng(1)
    reference = convolution_cells("same")[:1]
    ours = convolution_cells("same", resnet.ON_ONEDNN)[:1]
    ours[0].input_needs_gradient = False
    x = (ms.Tensor(rng.normal(size=(2, 3, 32, 32)).astype(np.float32)),)
    direction = (ms.Tensor(rng.normal(size=(2, 48, 16, 16)).astype(np.float32)),)
    weights = [rng.normal(scale=0.1, size=(48, 3, 7, 7)).astype(np.float32)]
    expected = outputs_and_gradients(reference, x, direction, weights)
    got = outputs_and_gradients(ours, x, direction, weights)
    assert relative_error(got[0][0], expected[0][0]) < 2e-5
    assert relative_error(got[2][0], expected[2][0]) < 2e-5
    assert not got[1][0].any() and expected[1][0].any()
    assert resnet.create_model("resnet18", 2).conv1.input_needs_gradient is False


@needs_library
def test_only_training_on_cpu_uses_onednn_and_exports_stay_plain(tmp_path):
    """Inference, exports and other devices never meet the custom operator (an ONNX file holds plain convolutions)."""
    import mindspore as ms
    import onnx

    import export
    import resnet
    net = resnet.create_model("resnet50", 2)
    line = resnet.use_onednn_convolutions(net)
    assert line.startswith("convolutions: oneDNN blocked kernels") and LIBRARY.version in line
    one_by_one, three_by_three = net.layer4[0].down_sample[0], net.layer4[0].conv2
    assert one_by_one.onednn_forward is not None and three_by_three.onednn_forward is not None
    assert one_by_one.onednn_matmul_by_weight is not None  # small maps' matmuls too, while training
    assert net.norm.onednn_norm is not None and net.layer4[2].norm3.onednn_norm_with_residual is not None
    stem_map = ms.Tensor(np.zeros((8, 64, 112, 112), np.float32))
    net.set_train(True)
    assert net.norm.runs_fused(stem_map)
    assert not net.norm.runs_fused(stem_map[:, :, :8, :8])  # maps under 14x14: MindSpore's, faster in a step there
    for conv in (one_by_one, three_by_three):
        assert conv.choose_kernel(8, ms.float32, 56 * 56, 112 * 112) == resnet.ON_ONEDNN
        assert conv.choose_kernel(8, ms.float16, 56 * 56, 112 * 112) == resnet.AS_CONVOLUTION  # float32 only
    # 1x1 convolutions on maps of 2x2 and less stay one matmul over the batch (on oneDNN's GEMM), 3x3 ones run on
    # oneDNN's direct kernel ...
    assert one_by_one.choose_kernel(32, ms.float32, 4, 16) == resnet.AS_MATMUL
    assert three_by_three.choose_kernel(32, ms.float32, 4, 16) == resnet.ON_ONEDNN
    # ... or as one dense matrix where it is no larger than the weight: 3x3 from 2x2 or on 1x1 maps, not 2x2 ones
    on_one_pixel, on_two_by_two = net.layer4[1].conv2, net.layer3[1].conv2
    assert three_by_three.choose_kernel(32, ms.float32, 1, 4) == resnet.AS_DENSE_MATRIX
    assert on_one_pixel.choose_kernel(32, ms.float32, 1, 1) == resnet.AS_DENSE_MATRIX
    assert on_one_pixel.choose_kernel(32, ms.float16, 1, 1) == resnet.AS_MATMUL
    assert on_one_pixel.choose_kernel(4, ms.float32, 1, 1) == resnet.ON_ONEDNN  # too few images for a matmul
    assert on_two_by_two.choose_kernel(32, ms.float32, 4, 4) == resnet.ON_ONEDNN
    assert net.layer3[1].conv1.choose_kernel(32, ms.float32, 4, 4) == resnet.AS_MATMUL
    assert one_by_one.choose_kernel(32, ms.float32, 1, 4) == resnet.AS_MATMUL  # strided 1x1: 4 pixels for 1 tap
    shallow = net.layer1[0].conv1  # 1x1, 64 channels: one GEMM either way, the reorders would cost more ...
    assert shallow.choose_kernel(8, ms.float32, 8 * 8, 8 * 8) == resnet.AS_CONVOLUTION
    assert shallow.choose_kernel(8, ms.float32, 56 * 56, 56 * 56) == resnet.ON_ONEDNN  # ... but on NCHW, none
    net.set_train(False)
    assert not net.norm.runs_fused(stem_map)
    for conv in (one_by_one, three_by_three):
        assert conv.choose_kernel(8, ms.float32, 56 * 56, 112 * 112) == resnet.AS_CONVOLUTION
    assert on_one_pixel.choose_kernel(32, ms.float32, 1, 1) == resnet.AS_MATMUL  # inference: no custom operator
    export.export_graph(net, 32, tmp_path / "net.onnx")
    operators = {node.op_type for node in onnx.load(str(tmp_path / "net.onnx")).graph.node}
    assert "Conv" in operators and not any("custom" in op.lower() for op in operators), operators


@needs_library
def test_the_operator_refuses_what_it_cannot_compute_with_an_error_not_a_crash(capfd):
    """The library reads float32 NCHW only: anything else (float16, should a network reach it) is an error."""
    import mindspore as ms
    import resnet
    conv = resnet.Conv2d(16, 16, 3, 1, pad_mode="same")
    forward = LIBRARY.forward(conv.output_shape)
    geometry = ms.Tensor([1, 1, 1, 1, 1, 1, 1, 0, 0], ms.int64)
    x = np.ones((2, 16, 8, 8), np.float32)
    y = forward(ms.Tensor(x), conv.weight, geometry).asnumpy()  # PyNative, float32: computes
    assert np.allclose(y, conv.conv2d(ms.Tensor(x), conv.weight).asnumpy(), atol=1e-4)
    with pytest.raises(RuntimeError):
        forward(ms.Tensor(x, ms.float16), ms.Tensor(conv.weight.asnumpy(), ms.float16), geometry).asnumpy()
    assert "onednn_conv forward: float32 NCHW tensors only, got float16 of rank 4" in capfd.readouterr().err


@needs_library
def test_the_momentum_operator_refuses_tensors_that_do_not_match_with_an_error_not_a_crash(capfd):
    import mindspore as ms
    step = LIBRARY.momentum_step()
    one = ms.Tensor([1.0], ms.float32)
    var, accum = (ms.Parameter(ms.Tensor(np.ones(4, np.float32)), name=name) for name in ("var", "accum"))
    step(one * 0.5, one * 0.1, one * 0.9, var, accum, ms.Tensor(np.ones(4, np.float32))).asnumpy()  # computes
    np.testing.assert_allclose(var.asnumpy(), 1 - 0.5 * (0.9 + 1 + 0.1))
    for gradient, error in ((np.ones(3, np.float32), "parameter 0: its accumulation or gradient has another size"),
                            (np.ones(4, np.float16), "float32 only, got float16")):
        with pytest.raises(RuntimeError):
            step(one, one, one, var, accum, ms.Tensor(gradient)).asnumpy()
        assert f"fused_momentum: {error}" in capfd.readouterr().err
    np.testing.assert_allclose(var.asnumpy(), 1 - 0.5 * (0.9 + 1 + 0.1))  # refused: untouched


@needs_library
def test_the_norm_operator_refuses_tensors_that_do_not_match_with_an_error_not_a_crash(capfd):
    import mindspore as ms
    norm = LIBRARY.batch_norm_relu(True)
    x, residual = np.ones((2, 3, 4, 4), np.float32), np.zeros((2, 3, 4, 4), np.float32)
    x[0] = 3.0
    vector, settings = ms.Tensor(np.ones(3, np.float32)), ms.Tensor([1e-5, 0.1, 1.0], ms.float32)
    y = norm(ms.Tensor(x), vector, vector * 0, vector * 0, vector, ms.Tensor(residual), settings)[0].asnumpy()
    np.testing.assert_allclose(y, np.where(x > 2, 1.0, 0.0), atol=1e-4)  # computes: +1 and -1 sigma, then ReLU
    for x, residual, error in ((x, np.zeros((2, 3, 4, 5), np.float32), "the tensors are not all of one shape"),
                               (x.astype(np.float16), residual.astype(np.float16), "float32 only, got float16")):
        with pytest.raises(RuntimeError):
            norm(ms.Tensor(x), vector, vector * 0, vector * 0, vector, ms.Tensor(residual), settings)[0].asnumpy()
        assert f"norm_relu forward: {error}" in capfd.readouterr().err


@needs_library
def test_the_gemm_operator_refuses_matrices_that_do_not_match_with_an_error_not_a_crash(capfd):
    import mindspore as ms
    matmul = LIBRARY.matmul_by_weight()
    a, b = np.ones((4, 3), np.float32), np.ones((5, 3), np.float32)
    np.testing.assert_allclose(matmul(ms.Tensor(a), ms.Tensor(b)).asnumpy(), np.full((4, 5), 3.0))  # computes
    for a, b, error in ((a, np.ones((5, 2), np.float32), "a (rows, k) and b (columns, k) do not match"),
                        (a.astype(np.float16), b.astype(np.float16), "float32 matrices only, got float16")):
        with pytest.raises(RuntimeError):
            matmul(ms.Tensor(a), ms.Tensor(b)).asnumpy()
        assert f"small_map_conv matmul: {error}" in capfd.readouterr().err


def test_without_a_compiler_or_the_library_training_keeps_mindspore_convolutions(tmp_path, monkeypatch):
    import resnet
    import train_step
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # nothing built before
    no_libdnnl_dev = tmp_path / "g++"  # the real compiler, on a machine whose include path has no oneDNN
    (tmp_path / "include").mkdir()
    no_libdnnl_dev.write_text(f'#!/bin/sh\nexec g++ -nostdinc -isystem {tmp_path / "include"} "$@"\n')
    no_libdnnl_dev.chmod(0o755)
    cases = {"/nonexistent/g++": "no C++ compiler (/nonexistent/g++ not found)",
             str(no_libdnnl_dev): "fatal error: oneapi/dnnl/dnnl.hpp: No such file or directory (is libdnnl-dev "
                                  "installed?)"}
    try:
        for compiler, reason in cases.items():
            monkeypatch.setenv("CXX", compiler)
            onednn_conv.load.cache_clear()
            library, why_not = onednn_conv.load()
            assert library is None and reason in why_not and "\n" not in why_not
            net = resnet.create_model("resnet18", 2)
            assert resnet.use_onednn_convolutions(net) == f"convolutions: MindSpore's ({why_not})"
            assert all(getattr(cell, "onednn_forward", None) is None for _, cell in net.cells_and_names())
            optimizer = train_step.create_optimizer(net, np.full(2, 0.1, np.float32), 0.9, 1e-4)
            assert type(optimizer).__name__ == "Momentum"  # MindSpore's, not the library's fused step
        assert not list((tmp_path / "cache").rglob("*.so"))  # and no half-built file left behind
    finally:
        onednn_conv.load.cache_clear()


@needs_library
def test_two_jobs_building_at_once_and_a_damaged_build_both_end_with_a_working_library(tmp_path):
    """Each build writes its own temporary file and renames it into place; a damaged cached file is rebuilt."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import onednn_conv; library, why = onednn_conv.load(); "
            "print(library.path if library else 'none: ' + why)")
    jobs = [subprocess.Popen([sys.executable, "-c", code, str(TRAIN_DIR)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    paths = [job.communicate(timeout=300)[0].strip() for job in jobs]
    assert paths[0] == paths[1] and paths[0].endswith(".so"), paths
    built = Path(paths[0])
    assert [p.name for p in (tmp_path / "cache" / "resnet-train").iterdir()] == [built.name]  # no temporaries
    built.write_bytes(b"\0" * 100)  # a damaged file under the right name
    again = subprocess.run([sys.executable, "-c", code, str(TRAIN_DIR)], env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.stdout.strip() == str(built) and built.read_bytes()[:4] == b"\x7fELF", again.stderr[-2000:]


@needs_library
@pytest.mark.slow
def test_training_on_onednn_follows_mindspores_gradients_and_loss_curve(tmp_path):
    """ResNet50 from the same initial weights on the same demo batches (32x32), with oneDNN's convolutions and with
    MindSpore's: the same early losses, the same curve as training goes on, and from the weights it reached, the
    same gradient for every parameter to float rounding.

    Rounding differences (1e-6 a convolution) grow chaotically from about the fourth step by an amount that depends
    on the batches and on where rounding tips a discrete choice (a max pool's tie, a ReLU at zero): measured 4e-7 to
    4e-4 there, and single losses up to 9% apart by the ninth step on one of four starts 1e-7 apart, 0.6% on the
    others. So later losses are compared loosely, an epoch's mean at a time, and the exact comparison is of one
    step's gradients, which covers every backward operator at once. The gradients are taken after training, not at
    the start: each block's last BatchNorm starts at gamma 0, which zeroes the other convolutions' gradients."""
    import mindspore as ms
    import mindspore.dataset as ds
    import mindspore.nn as nn

    import datasets
    import resnet
    ms.set_context(mode=ms.GRAPH_MODE)  # as training runs (MindSpore's default is PyNative)
    cifar, _ = make_demo_data(tmp_path / "data", train=96, val=16, num_classes=4, seed=5)
    seed = ds.config.get_seed()
    ds.config.set_seed(5)  # the same shuffled, augmented batches every run
    try:
        batches = [(ms.Tensor(images), ms.Tensor(labels)) for images, labels in datasets.create_dataset(
            datasets.find_data(cifar), "train", 32, 32).create_tuple_iterator(output_numpy=True)]
    finally:
        ds.config.set_seed(seed)

    def network(on_onednn, weights=None):
        ms.set_seed(0)
        net = resnet.create_model("resnet50", 4)
        if weights:
            ms.load_param_into_net(net, {name: ms.Parameter(value, name) for name, value in weights.items()})
        if on_onednn:
            assert resnet.use_onednn_convolutions(net).startswith("convolutions: oneDNN")
        return net

    def losses(on_onednn):
        net = network(on_onednn)
        step = nn.TrainOneStepCell(nn.WithLossCell(net, nn.CrossEntropyLoss()),
                                   nn.Momentum(net.trainable_params(), 0.01, 0.9))
        step.set_train()
        curve = [float(step(images, labels).asnumpy()) for _ in range(3) for images, labels in batches]
        return curve, {param.name: param.asnumpy() for param in net.get_parameters()}

    def gradients(on_onednn, weights):
        net = network(on_onednn, weights)
        step = nn.ForwardValueAndGrad(nn.WithLossCell(net, nn.CrossEntropyLoss()), weights=net.trainable_params(),
                                      get_by_list=True)
        step.set_train()
        _, grads = step(*batches[0])
        return {param.name: grad.asnumpy() for param, grad in zip(net.trainable_params(), grads)}

    (ours, _), (theirs, trained) = losses(True), losses(False)
    assert len(ours) == 9
    for a, b in zip(ours[:3], theirs):  # measured: 2e-7 apart; with dw 0.1% off, 8e-4 at the third step
        assert abs(a - b) <= 1e-4 * b, (ours, theirs)
    for epoch in range(3):
        a, b = (np.mean(curve[epoch * 3:epoch * 3 + 3]) for curve in (ours, theirs))
        assert abs(a - b) <= 5e-2 * b, (ours, theirs)
    assert ours[-1] < ours[0]  # and it learns

    ours, theirs = gradients(True, trained), gradients(False, trained)
    assert ours.keys() == theirs.keys() and len(ours) == 161  # every weight, BatchNorm's gamma and beta, the head
    assert min(np.linalg.norm(grad) for grad in theirs.values()) > 0
    apart = {name: np.linalg.norm(ours[name] - theirs[name]) / np.linalg.norm(theirs[name]) for name in ours}
    # measured: 5e-5 at most (a BatchNorm beta's small gradient), 5e-6 over all
    assert max(apart.values()) <= 1e-3, sorted(apart.items(), key=lambda item: -item[1])[:5]
    overall = (sum(np.sum((ours[name] - theirs[name]) ** 2) for name in ours)
               / sum(np.sum(grad ** 2) for grad in theirs.values())) ** 0.5
    assert overall <= 1e-4, overall


def test_the_shared_training_job_trained_on_onednn(trained):
    """The job most tests read (tests/conftest.py `trained`, which must learn) ran as a user's does: on oneDNN."""
    assert (LIBRARY is None) != ("convolutions: oneDNN blocked kernels where faster" in trained["result"].stdout)
