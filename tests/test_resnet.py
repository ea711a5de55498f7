"""The network: tutorial parameter names, every depth and input size, small maps as matmul, and pretrained loading."""
import itertools

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

import resnet
from errors import UserError
from checkpoints import load_pretrained
from resnet import ARCHS, MATMUL_MIN_BATCH, create_model
from tutorial_resnet import TutorialResNet50


def names(net):
    return {name for name, _ in net.parameters_and_names()}


def predict(net, images):
    net.set_train(False)
    return net(ms.Tensor(images)).asnumpy()


@pytest.fixture(scope="module")
def tutorial_checkpoint(module_tmp):
    """A checkpoint of the tutorial's ResNet50 with non-trivial BatchNorm statistics, and the net that made it."""
    ms.set_seed(0)
    net = TutorialResNet50(num_classes=1000)
    rng = np.random.default_rng(0)
    for name, param in net.parameters_and_names():
        if name.endswith(("moving_mean", "moving_variance", "beta")):
            value = rng.uniform(0.5, 1.5, param.shape) if "variance" in name else rng.normal(0, 0.1, param.shape)
            param.set_data(ms.Tensor(value.astype(np.float32)))
    path = module_tmp / "resnet50_224_new.ckpt"
    ms.save_checkpoint(net, str(path))
    return path, net


def test_parameter_names_follow_the_tutorial():
    got = names(create_model("resnet50", 10))
    for expected in ("conv1.weight", "norm.gamma", "norm.moving_mean", "layer1.0.conv3.weight",
                     "layer1.0.norm3.moving_variance", "layer1.0.down_sample.0.weight", "layer1.0.down_sample.1.beta",
                     "layer4.2.norm2.gamma", "fc.weight", "fc.bias"):
        assert expected in got
    basic = names(create_model("resnet18", 10))
    assert {"layer1.0.norm1.gamma", "layer1.0.norm2.gamma", "layer2.0.down_sample.0.weight"} <= basic


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_arch_takes_any_input_size(arch):
    net = create_model(arch, 7)
    for side in (32, 72):
        assert predict(net, np.zeros((2, 3, side, side), np.float32)).shape == (2, 7)


class WeightedSum(nn.Cell):
    """A loss whose gradient with respect to the output is `direction`: gradients of every output element count."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def construct(self, x, direction):
        return (self.net(x) * direction).sum()


def output_and_gradients(net, x, mode):
    rng = np.random.default_rng(1)
    out = net(x)
    direction = ms.Tensor(rng.normal(size=out.shape).astype(np.float32))
    grad = ms.grad(WeightedSum(net), grad_position=0, weights=net.trainable_params())
    if mode == ms.GRAPH_MODE:
        grad = ms.jit(grad)
    x_grad, weight_grads = grad(x, direction)
    return [out.asnumpy(), x_grad.asnumpy()] + [g.asnumpy() for g in weight_grads]


PAD_MODES = {"same": lambda kernel: {"pad_mode": "same"},
             "explicit": lambda kernel: {"pad_mode": "pad", "padding": (kernel - 1) // 2},
             "asymmetric": lambda kernel: {"pad_mode": "pad", "padding": (0, 1, 1, 0)},
             "valid": lambda kernel: {"pad_mode": "valid"}}


@pytest.mark.parametrize("mode", [pytest.param(ms.GRAPH_MODE, id="graph", marks=pytest.mark.slow),  # 130+ compilations
                                  pytest.param(ms.PYNATIVE_MODE, id="pynative")])
def test_small_maps_as_matmul_compute_what_the_convolution_computes(mode, monkeypatch):
    """Every kernel, stride, map size and padding: the same output, input gradient and weight/bias gradients as
    MindSpore's convolution, and the matmul path is the one taken for maps up to 2x2 in batches of 8 or more."""
    ms.set_context(mode=mode, device_target="CPU")
    taken = []
    if mode == ms.PYNATIVE_MODE:  # Python runs construct, so the path taken can be counted
        as_matmul = resnet.Conv2d.as_matmul
        monkeypatch.setattr(resnet.Conv2d, "as_matmul", lambda self, *a: taken.append(a) or as_matmul(self, *a))
    small = large = 0
    # Compiled, two graphs a case: the paddings ResNet uses ("same", symmetric "explicit") and an asymmetric one, on
    # maps up to 3x3 (PyNative: every case).
    sides, pad_modes = (((1, 2, 3), ("same", "explicit", "asymmetric")) if mode == ms.GRAPH_MODE
                        else ((1, 2, 3, 5), PAD_MODES))
    for kernel, stride, side, pad_mode in itertools.product((1, 3), (1, 2), sides, pad_modes):
        if (kernel, side, pad_mode) in {(3, 1, "valid"), (3, 2, "valid"), (3, 1, "asymmetric")}:
            continue  # no output pixel: MindSpore refuses these
        rng = np.random.default_rng(kernel * 100 + side)
        ours = resnet.Conv2d(6, 5, kernel, stride=stride, has_bias=True, **PAD_MODES[pad_mode](kernel))
        assert ours.small_maps_as_matmul
        reference = nn.Conv2d(6, 5, kernel, stride=stride, has_bias=True, **PAD_MODES[pad_mode](kernel))
        for name, param in ours.parameters_and_names():
            param.set_data(ms.Tensor(rng.normal(size=param.shape).astype(np.float32)))
            getattr(reference, name).set_data(param.data)
        x = ms.Tensor(rng.normal(size=(MATMUL_MIN_BATCH, 6, side, side)).astype(np.float32))
        got, expected = output_and_gradients(ours, x, mode), output_and_gradients(reference, x, mode)
        case = f"kernel {kernel}, stride {stride}, {side}x{side}, {pad_mode}"
        assert [g.shape for g in got] == [e.shape for e in expected], case
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4, err_msg=case)
        is_small = got[0].shape[2] * got[0].shape[3] <= resnet.SMALL_MAP_PIXELS
        small, large = small + is_small, large + (not is_small)
    assert small and large
    if mode == ms.PYNATIVE_MODE:
        assert len(taken) == 2 * small  # the output, and again under the gradient
        taken.clear()
        resnet._conv(6, 5, 3)(ms.Tensor(np.ones((MATMUL_MIN_BATCH - 1, 6, 2, 2), np.float32)))
        assert not taken  # small batches (batch-1 inference) keep the convolution


@pytest.mark.slow
def test_resnet50_on_32x32_trains_the_same_with_small_maps_as_matmul():
    """The whole network, compiled: logits and every weight's gradient as with convolutions throughout."""
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    x = ms.Tensor(np.random.default_rng(2).normal(size=(MATMUL_MIN_BATCH, 3, 32, 32)).astype(np.float32))
    results = []
    for as_matmul in (True, False):
        ms.set_seed(0)
        net = create_model("resnet50", 10)
        for _, cell in net.cells_and_names():
            if isinstance(cell, resnet.Conv2d):
                cell.small_maps_as_matmul = as_matmul
        net.set_train(False)  # moving statistics: the same logits whatever the batch
        results.append(output_and_gradients(net, x, ms.GRAPH_MODE))
    for got, expected in zip(*results):
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


def test_tutorial_checkpoint_loads_unchanged_and_computes_the_same(tutorial_checkpoint):
    path, tutorial = tutorial_checkpoint
    net = create_model("resnet50", 1000)
    loaded, skipped = load_pretrained(net, path, log=lambda _: None)
    assert loaded == len(names(net)) and skipped == []
    images = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(predict(net, images), predict(tutorial, images), rtol=1e-4, atol=1e-4)


def test_head_of_another_size_is_replaced(tutorial_checkpoint):
    path, tutorial = tutorial_checkpoint
    net = create_model("resnet50", 10)
    messages = []
    loaded, skipped = load_pretrained(net, path, log=messages.append)
    assert loaded == len(names(net)) - 2
    assert sorted(s.split()[0] for s in skipped) == ["fc.bias", "fc.weight"]
    assert "head re-initialised" in messages[0] and "fc.weight (shape (1000, 2048) != (10, 2048))" in messages[1]
    ours = dict(net.parameters_and_names())
    np.testing.assert_array_equal(ours["layer3.4.norm2.moving_mean"].asnumpy(),
                                  dict(tutorial.parameters_and_names())["layer3.4.norm2.moving_mean"].asnumpy())


def test_checkpoint_of_another_arch_is_refused(tmp_path):
    path = tmp_path / "resnet18.ckpt"
    ms.save_checkpoint(create_model("resnet18", 10), str(path))
    with pytest.raises(UserError, match="does not fit this architecture"):
        load_pretrained(create_model("resnet50", 10), path, log=lambda _: None)


def test_optimizer_state_is_ignored(tmp_path):
    net = create_model("resnet18", 5)
    params = [{"name": n, "data": p} for n, p in net.parameters_and_names()]
    params += [{"name": "moments.fc.weight", "data": ms.Tensor(np.zeros((5, 512), np.float32))},
               {"name": "learning_rate", "data": ms.Tensor(np.float32(0.1))}]
    ms.save_checkpoint(params, str(tmp_path / "with_state.ckpt"))
    loaded, skipped = load_pretrained(create_model("resnet18", 5), tmp_path / "with_state.ckpt", log=lambda _: None)
    assert loaded == len(names(net)) and skipped == []


def test_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"definitely not protobuf" * 10)
    with pytest.raises(UserError, match="not a readable MindSpore checkpoint"):
        load_pretrained(create_model("resnet18", 10), path, log=lambda _: None)


def test_freeze_leaves_only_the_head_trainable():
    net = create_model("resnet50", 3)
    net.freeze_backbone()
    assert sorted(p.name for p in net.trainable_params()) == ["fc.bias", "fc.weight"]


def test_a_copied_network_compiles_and_computes_after_its_original_is_gone():
    """Each Conv2d's plan is found by its key while the graph compiles: a deep or shallow copy gets its own."""
    import copy
    import gc
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    x = ms.Tensor(np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32))
    original = resnet.create_model("resnet18", 3)
    original.set_train(False)
    expected = original(x).asnumpy()
    copied = copy.deepcopy(original)
    del original
    gc.collect()
    np.testing.assert_allclose(copied(x).asnumpy(), expected, rtol=1e-5, atol=1e-5)
    shallow = copy.copy(copied.conv1)  # Cell shares the original's attributes in a shallow copy, but not the key
    assert shallow.plan_key != copied.conv1.plan_key
    del shallow
    gc.collect()
    np.testing.assert_allclose(copied(x).asnumpy(), expected, rtol=1e-5, atol=1e-5)
