"""--pretrain_url takes a ResNet checkpoint of any of the four published MindSpore families.

MindCV's network is built by the real `mindcv` package; the mindvision and mindspore-models checkpoints are written
with the parameter names of their public sources (mindvision/classification/models/backbones/resnet.py with
blocks.ConvNormActivation and head.DenseHead; mindspore models official/cv/ResNet/src/resnet.py), spelled out here
independently of the mapping under test.
"""
import re

import mindspore as ms
import numpy as np
import pytest

import export
from checkpoints import checkpoint_padding, load_pretrained, to_our_names
from errors import UserError
from resnet import create_model


def randomise(net, seed=0):
    """Non-trivial weights and BatchNorm statistics, so that equal outputs mean equal computation."""
    rng = np.random.default_rng(seed)
    for name, param in net.parameters_and_names():
        if name.endswith("moving_variance"):
            value = rng.uniform(0.5, 1.5, param.shape)
        elif name.endswith(("moving_mean", "beta")):
            value = rng.normal(0, 0.1, param.shape)
        elif name.endswith("gamma"):
            value = rng.uniform(0.5, 1.5, param.shape)
        else:
            continue
        param.set_data(ms.Tensor(value.astype(np.float32)))
    return net


def logits(net, images):
    net.set_train(False)
    return net(ms.Tensor(images)).asnumpy()


def quiet(_):
    pass


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).normal(size=(2, 3, 224, 224)).astype(np.float32)


def test_mindcv_resnet50_is_reproduced_not_just_loaded(tmp_path, images):
    from mindcv.models import create_model as mindcv_model
    ms.set_seed(0)
    theirs = randomise(mindcv_model("resnet50", num_classes=10, pretrained=False))
    path = tmp_path / "resnet50-mindcv.ckpt"
    ms.save_checkpoint(theirs, str(path))
    expected = logits(theirs, images)

    assert checkpoint_padding(path) == "explicit"
    ours = create_model("resnet50", 10, "explicit")
    messages = []
    loaded, skipped = load_pretrained(ours, path, log=messages.append)
    assert skipped == [] and loaded == len(list(ours.get_parameters()))
    assert "(mindcv checkpoint, explicit padding)" in messages[0] and "head loaded" in messages[0]
    got = logits(ours, images)
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()

    # The same weights with the tutorial's "same" padding compute something else: the padding matters.
    same = create_model("resnet50", 10, "same")
    ms.load_param_into_net(same, to_our_names(ms.load_checkpoint(str(path)), path)[2])
    assert np.abs(logits(same, images) - expected).max() > 1e-2 * np.abs(expected).max()
    with pytest.raises(UserError, match="explicit padding but the network uses same"):
        load_pretrained(same, path, log=quiet)


def test_our_checkpoint_remembers_the_padding(tmp_path, images):
    net = randomise(create_model("resnet18", 4, "explicit"))
    path = tmp_path / "fine-tuned.ckpt"
    export.save_checkpoint(net, path)
    assert checkpoint_padding(path) == "explicit"
    again = create_model("resnet18", 4, checkpoint_padding(path))
    load_pretrained(again, path, log=quiet)
    np.testing.assert_allclose(logits(again, images[:, :, :64, :64]), logits(net, images[:, :, :64, :64]),
                               rtol=1e-5, atol=1e-5)


def mindvision_name(ours):
    """mindvision: backbone.* of ConvNormActivation blocks (features.0 conv, features.1 norm), head.dense."""
    for pattern, replacement in ((r"^conv1\.", "backbone.conv1.features.0."),
                                 (r"^norm\.", "backbone.conv1.features.1."),
                                 (r"^(layer\d\.\d+)\.conv(\d)\.", r"backbone.\1.conv\2.features.0."),
                                 (r"^(layer\d\.\d+)\.norm(\d)\.", r"backbone.\1.conv\2.features.1."),
                                 (r"^(layer\d\.\d+)\.down_sample\.(\d)\.", r"backbone.\1.down_sample.features.\2."),
                                 (r"^fc\.", "head.dense.")):
        if re.match(pattern, ours):
            return re.sub(pattern, replacement, ours)
    raise AssertionError(ours)


def models_zoo_name(ours):
    """mindspore models official/cv/ResNet: bn1, layerN.i.bnK, down_sample_layer, end_point."""
    for pattern, replacement in ((r"^norm\.", "bn1."), (r"^(layer\d\.\d+)\.norm(\d)\.", r"\1.bn\2."),
                                 (r"\.down_sample\.", ".down_sample_layer."), (r"^fc\.", "end_point.")):
        if re.search(pattern, ours):
            return re.sub(pattern, replacement, ours)
    return ours


@pytest.mark.parametrize("family, rename, padding, classes", [
    ("mindvision", mindvision_name, "explicit", 1000),
    ("mindspore-models", models_zoo_name, "same", 1001),
])
def test_published_name_tables_map_every_backbone_parameter(tmp_path, family, rename, padding, classes):
    source = randomise(create_model("resnet50", classes, padding), seed=3)
    values = {name: p.asnumpy() for name, p in source.parameters_and_names()}
    params = [{"name": rename(name), "data": ms.Tensor(value)} for name, value in values.items()]
    params += [{"name": f"moments.{rename('fc.weight')}", "data": ms.Tensor(np.zeros((classes, 2048), np.float32))},
               {"name": "global_step", "data": ms.Tensor(np.int32(100))}]
    path = tmp_path / f"{family}.ckpt"
    ms.save_checkpoint(params, str(path))

    assert checkpoint_padding(path) == padding
    net = create_model("resnet50", 10, padding)
    messages = []
    loaded, skipped = load_pretrained(net, path, log=messages.append)
    assert f"({family} checkpoint, {padding} padding)" in messages[0]
    backbone = len([n for n in values if not n.startswith("fc.")])
    assert f"{backbone}/{backbone} backbone, head re-initialised" in messages[0]  # another class count
    assert sorted(s.split()[0] for s in skipped) == ["fc.bias", "fc.weight"]
    for name, param in net.parameters_and_names():
        if not name.startswith("fc."):
            np.testing.assert_array_equal(param.asnumpy(), values[name], err_msg=name)


def test_a_checkpoint_of_no_known_family_is_named(tmp_path):
    path = tmp_path / "vgg.ckpt"
    ms.save_checkpoint([{"name": "features.0.weight", "data": ms.Tensor(np.zeros((2, 2), np.float32))}], str(path))
    with pytest.raises(UserError, match="not a ResNet checkpoint of a known family"):
        checkpoint_padding(path)
