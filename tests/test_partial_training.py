"""Fixed-feature mode on cached backbone features, and partial fine-tuning (--trainable, --backbone_lr_scale)."""
import mindspore as ms
import numpy as np
import pytest
from conftest import read_json, run_train

import datasets
import train_step
from resnet import create_model

pytestmark = pytest.mark.slow
QUICK = ["--arch", "resnet18", "--image_size", 32, "--batch_size", 16, "--aim_system_metrics", "false"]


@pytest.fixture(scope="module")
def pretrained(module_tmp):
    """A resnet18 checkpoint with non-trivial BatchNorm statistics, standing in for ImageNet weights."""
    ms.set_seed(0)
    net = create_model("resnet18", 4)
    rng = np.random.default_rng(0)
    for name, param in net.parameters_and_names():
        if name.endswith(("moving_mean", "moving_variance")):
            value = rng.uniform(0.5, 1.5, param.shape) if "variance" in name else rng.normal(0, 0.2, param.shape)
            param.set_data(ms.Tensor(value.astype(np.float32)))
    path = module_tmp / "resnet18.ckpt"
    ms.save_checkpoint(net, str(path))
    return path


def evaluate(checkpoint, data, image_size=32):
    """Accuracy of the complete network in a checkpoint on the validation split, image by image."""
    net = create_model("resnet18", 4)
    ms.load_param_into_net(net, ms.load_checkpoint(str(checkpoint)))
    net.set_train(False)
    right = total = 0
    val = datasets.create_dataset(datasets.find_data(data), "val", image_size, 16)
    for images, labels in val.create_tuple_iterator(output_numpy=True):
        right += int((net(ms.Tensor(images)).asnumpy().argmax(1) == labels).sum())
        total += len(labels)
    return right / total


def test_cached_features_train_a_head_that_the_whole_network_carries(small_data, pretrained, tmp_path):
    out = tmp_path / "out"
    result = run_train("--data_url", small_data[0], "--output_url", out, "--pretrain_url", pretrained, "--freeze",
                       "--epochs", 8, "--lr", 0.01, *QUICK)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "features: 64 train (1 view(s) per image) and 32 val vectors of 512" in result.stdout
    history = read_json(out / "metrics.json")
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    # The checkpoint is the whole network; on images it scores what the head scored on cached features.
    best = max(history, key=lambda r: r["val_accuracy"])
    assert evaluate(out / "resnet18-best.ckpt", small_data[0]) == pytest.approx(best["val_accuracy"], abs=1e-6)
    before, after = ms.load_checkpoint(str(pretrained)), ms.load_checkpoint(str(out / "resnet18-last.ckpt"))
    for name in before:
        if not name.startswith("fc."):
            assert np.array_equal(before[name].asnumpy(), after[name].asnumpy()), name


def test_disk_cache_is_reused_and_views_multiply_the_training_features(small_data, pretrained, tmp_path):
    args = ["--data_url", small_data[0], "--pretrain_url", pretrained, "--freeze", "--epochs", 1,
            "--feature_cache", "disk", "--cache_dir", tmp_path / "cache", *QUICK]
    first = run_train(*args, "--output_url", tmp_path / "a")
    second = run_train(*args, "--output_url", tmp_path / "b")
    assert first.returncode == second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]
    assert "computed once" in first.stdout and "features: reusing" in second.stdout
    assert read_json(tmp_path / "a" / "metrics.json")[0]["val_accuracy"] == \
        read_json(tmp_path / "b" / "metrics.json")[0]["val_accuracy"]
    views = run_train(*args, "--feature_views", 3, "--output_url", tmp_path / "c")
    assert views.returncode == 0 and "features: 192 train (3 view(s) per image)" in views.stdout


def test_trainable_layers_train_and_the_rest_stays_bit_identical(small_data, pretrained, tmp_path):
    out = tmp_path / "out"
    result = run_train("--data_url", small_data[0], "--output_url", out, "--pretrain_url", pretrained,
                       "--trainable", "layer4,fc", "--backbone_lr_scale", 0.1, "--epochs", 1, "--lr", 0.05, *QUICK)
    assert result.returncode == 0, result.stderr[-3000:]
    before, after = ms.load_checkpoint(str(pretrained)), ms.load_checkpoint(str(out / "resnet18-last.ckpt"))
    changed = {name for name in before if not np.array_equal(before[name].asnumpy(), after[name].asnumpy())}
    assert changed and all(name.startswith(("layer4.", "fc.")) for name in changed)
    assert "layer4.1.norm2.moving_mean" in changed  # trained layers' BatchNorm statistics do move


def test_backbone_learning_rate_scale():
    net = create_model("resnet18", 3)
    schedule = train_step.cosine_lr(0.1, 2, 5, 1)
    optimizer = train_step.create_optimizer(net, schedule, 0.9, 1e-4, backbone_lr_scale=0.1)
    head = optimizer.get_lr_parameter(net.fc.weight).asnumpy()
    backbone = optimizer.get_lr_parameter(net.layer2[0].conv1.weight).asnumpy()
    np.testing.assert_allclose(head, schedule, rtol=1e-6)
    np.testing.assert_allclose(backbone, schedule * 0.1, rtol=1e-6)
