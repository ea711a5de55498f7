"""The training step: one optimiser update that also counts the batch's right predictions, with loss scaling when
mixed precision needs it; and how each device is set to train."""
import mindspore as ms
import mindspore.nn as nn
import numpy as np
import pytest

import runtime
import train_step
from errors import UserError
from resnet import create_model


def test_train_step_counts_right_predictions_and_updates_the_weights():
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    ms.set_seed(3)
    net = create_model("resnet18", 3)
    images = np.random.default_rng(0).normal(size=(8, 3, 32, 32)).astype(np.float32)
    net.set_train(True)  # train mode: batch statistics, as inside the step
    predicted = net(ms.Tensor(images)).asnumpy().argmax(1)
    labels = np.where(np.arange(8) < 5, predicted, (predicted + 1) % 3).astype(np.int32)  # 5 right, 3 wrong

    loss_fn = train_step.create_loss()
    optimizer = train_step.create_optimizer(net, train_step.cosine_lr(0.1, 1, 1), momentum=0.9, weight_decay=1e-4)
    before = net.fc.weight.asnumpy().copy()
    step = train_step.TrainStep(train_step.LossAndCorrect(net, loss_fn), optimizer)
    step.set_train()
    loss, correct = step(ms.Tensor(images), ms.Tensor(labels))

    assert float(correct.asnumpy()) == 5.0
    assert np.isfinite(loss.asnumpy()).all() and float(loss.asnumpy()) > 0
    assert not np.array_equal(before, net.fc.weight.asnumpy())
    assert "fc.weight" in {p.name for p in step.trainable_params()}  # the network's own names, no prefix


def small_step(loss_scale=None):
    """A two-layer net's TrainStep, from the same initial weights each time."""
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    ms.set_seed(5)
    net = nn.SequentialCell([nn.Dense(6, 16), nn.ReLU(), nn.Dense(16, 3)])
    optimizer = nn.Momentum(net.trainable_params(), learning_rate=0.1, momentum=0.9)
    loss_fn = train_step.create_loss()
    step = train_step.TrainStep(train_step.LossAndCorrect(net, loss_fn), optimizer, loss_scale)
    step.set_train()
    return net, step


def batch(seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(12, 6)).astype(np.float32), (np.arange(12) % 3).astype(np.int32)


def weights(net):
    return [p.asnumpy().copy() for p in net.get_parameters()]


def test_loss_scaling_makes_the_same_update_as_plain_fp32():
    images, labels = batch()
    plain_net, plain = small_step()
    scaled_net, scaled = small_step(train_step.DynamicLossScale(initial=2.0 ** 12))
    for _ in range(3):
        plain_loss, _ = plain(ms.Tensor(images), ms.Tensor(labels))
        scaled_loss, _ = scaled(ms.Tensor(images), ms.Tensor(labels))
        assert float(scaled_loss.asnumpy()) == pytest.approx(float(plain_loss.asnumpy()), rel=1e-5)  # unscaled
    for a, b in zip(weights(plain_net), weights(scaled_net)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_an_overflowing_step_is_skipped_and_the_scale_adapts():
    scale = train_step.DynamicLossScale(initial=2.0 ** 10, window=2)
    net, step = small_step(scale)
    images, labels = batch()
    values = []
    for _ in range(3):
        step(ms.Tensor(images), ms.Tensor(labels))
        values.append(float(scale.value.asnumpy()))
    assert values == [1024.0, 2048.0, 2048.0]  # doubled after 2 clean steps in a row

    before = weights(net) + [p.asnumpy().copy() for p in step.optimizer.moments]
    overflowing = images.copy()
    overflowing[0, 0] = np.inf
    step(ms.Tensor(overflowing), ms.Tensor(labels))
    after = weights(net) + [p.asnumpy().copy() for p in step.optimizer.moments]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))  # weights and momentum untouched
    assert float(scale.value.asnumpy()) == 1024.0 and int(scale.clean_steps.asnumpy()) == 0

    step(ms.Tensor(images), ms.Tensor(labels))  # training goes on at the lower scale
    assert not np.array_equal(before[0], weights(net)[0])


@pytest.mark.parametrize("device, amp_level, dataset_sink, expected", [
    ("CPU", "auto", "auto", ("O0", False, False)),
    ("GPU", "auto", "auto", ("O2", True, False)),
    ("Ascend", "auto", "auto", ("O2", True, True)),
    ("GPU", "O0", "auto", ("O0", False, False)),
    ("Ascend", "auto", "false", ("O2", True, False)),
    ("GPU", "auto", "true", ("O2", True, True)),
])
def test_training_plan_per_device(device, amp_level, dataset_sink, expected):
    assert tuple(runtime.plan_training(device, amp_level, dataset_sink)) == expected


@pytest.mark.parametrize("amp_level, dataset_sink", [("O2", "auto"), ("auto", "true")])
def test_cpu_refuses_mixed_precision_and_dataset_sink(amp_level, dataset_sink):
    with pytest.raises(UserError, match="needs GPU or Ascend"):
        runtime.plan_training("CPU", amp_level, dataset_sink)


def test_mixed_precision_trainer_trains_in_fp16_with_fp32_weights_and_logits():
    """What O2 does (run on CPU, which can, though train.py never picks it there): the convolutions compute in fp16,
    the weights and the logits stay fp32, and the loss-scaled step updates the weights."""
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    ms.set_seed(0)
    net = create_model("resnet18", 3)
    images = ms.Tensor(np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32))
    net.set_train(False)
    fp32_logits = net(images).asnumpy()
    optimizer = train_step.create_optimizer(net, train_step.cosine_lr(0.1, 1, 1), momentum=0.9, weight_decay=1e-4)
    trainer = train_step.create_trainer(net, optimizer, 3, runtime.TrainingPlan("O2", True, False))
    evaluate = trainer.eval_network
    evaluate.set_train(False)
    _, logits, _ = evaluate(images, ms.Tensor(np.zeros(4, np.int32)))
    assert logits.dtype == ms.float32
    assert not np.array_equal(logits.asnumpy(), fp32_logits)  # computed in fp16 ...
    np.testing.assert_allclose(logits.asnumpy(), fp32_logits, rtol=0.05, atol=0.05)  # ... to fp16 precision

    step = trainer.train_network
    assert isinstance(step.loss_scale, train_step.DynamicLossScale)
    step.set_train()
    before = net.fc.weight.asnumpy().copy()
    scales = []
    for _ in range(12):  # the first steps may overflow fp16 at the initial scale of 2**16: skipped, scale halved
        loss, _ = step(images, ms.Tensor(np.arange(4, dtype=np.int32) % 3))
        scales.append(float(step.loss_scale.value.asnumpy()))
        if not np.array_equal(before, net.fc.weight.asnumpy()):
            break
    assert np.isfinite(loss.asnumpy()).all()
    assert net.fc.weight.dtype == ms.float32 and not np.array_equal(before, net.fc.weight.asnumpy()), scales
    assert all(later <= earlier for earlier, later in zip(scales, scales[1:])), scales


class FixedLogits(nn.Cell):
    """Logits of a chosen margin whatever the input, plus a trainable bias so the optimiser has work."""

    def __init__(self, logits):
        super().__init__()
        self.logits = ms.Tensor(logits)
        self.bias = ms.Parameter(ms.Tensor(np.zeros(logits.shape[1], np.float32)), name="fc.bias")

    def construct(self, images):
        return self.logits[:images.shape[0]] + self.bias


@pytest.mark.parametrize("margin", [1.0, 100.0, 1000.0])
def test_the_loss_is_exact_when_a_wrong_class_leads_by_far(margin):
    """A confidently wrong prediction is a large finite loss, in training and in validation, never inf."""
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    logits = np.array([[margin / 2, -margin / 2, 0.0], [0.0, 3.0, -1.0]], np.float32)
    labels = np.array([1, 1], np.int32)  # the first is wrong by `margin`, the second right
    exact = np.mean([np.logaddexp.reduce(row.astype(np.float64)) - row[label] for row, label in zip(logits, labels)])
    net = FixedLogits(logits)
    optimizer = nn.Momentum(net.trainable_params(), learning_rate=0.0, momentum=0.9)
    trainer = train_step.create_trainer(net, optimizer, 3)
    data = ms.dataset.NumpySlicesDataset({"image": np.zeros((2, 4), np.float32), "label": labels},
                                         shuffle=False).batch(2)
    trainer.train_network.set_train()
    loss, correct = trainer.train_network(ms.Tensor(np.zeros((2, 4), np.float32)), ms.Tensor(labels))
    assert float(loss.asnumpy()) == pytest.approx(exact, rel=1e-5) and float(correct.asnumpy()) == 1.0
    assert trainer.eval(data)["loss"] == pytest.approx(exact, rel=1e-5)


def test_class_weights_auto_weigh_the_loss_as_the_formula_says():
    """N / (C x n_c) per class, and the weighted mean sum(w[y] * loss) / sum(w[y]), in training and validation."""
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    weights = train_step.class_weights([30, 10, 20], num_classes=4)
    np.testing.assert_allclose(weights, [60 / 90, 60 / 30, 60 / 60, 1.0], rtol=1e-6)  # room for a 4th class: 1
    logits = np.array([[2.0, -1.0, 0.5, 0.0], [0.3, 0.2, -2.0, 0.0], [-1.0, 1.0, 3.0, 0.0]], np.float32)
    labels = np.array([0, 1, 2], np.int32)
    each = np.array([np.logaddexp.reduce(row.astype(np.float64)) - row[label] for row, label in zip(logits, labels)])
    expected = (weights[labels] * each).sum() / weights[labels].sum()
    net = FixedLogits(logits)
    optimizer = nn.Momentum(net.trainable_params(), learning_rate=0.0, momentum=0.9)
    trainer = train_step.create_trainer(net, optimizer, 4, weights=weights)
    trainer.train_network.set_train()
    loss, _ = trainer.train_network(ms.Tensor(np.zeros((3, 4), np.float32)), ms.Tensor(labels))
    assert float(loss.asnumpy()) == pytest.approx(expected, rel=1e-5)
    assert abs(expected - each.mean()) > 0.1  # the weights do change it
    data = ms.dataset.NumpySlicesDataset({"image": np.zeros((3, 4), np.float32), "label": labels},
                                         shuffle=False).batch(3)
    assert trainer.eval(data)["loss"] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(UserError, match="needs images of every class"):
        train_step.class_weights([5, 0])


def test_macro_f1_from_a_confusion_matrix():
    confusion = [[5, 1, 0], [2, 3, 0], [0, 0, 0]]  # class 2: no images and never predicted, so left out
    precision, recall = np.array([5 / 7, 3 / 4]), np.array([5 / 6, 3 / 5])
    assert train_step.macro_f1(confusion) == pytest.approx(np.mean(2 * precision * recall / (precision + recall)))
    assert train_step.macro_f1([[0, 4], [0, 4]]) == pytest.approx((0 + 2 * 0.5 * 1 / 1.5) / 2)  # never right: 0


def test_first_predictions_are_the_first_images_classes_across_batches_and_epochs():
    metric = train_step.FirstPredictions(5)
    for epoch in range(2):  # Model.eval clears it before each validation
        metric.clear()
        metric.update(ms.Tensor(np.eye(3, dtype=np.float32)[[2, 0, 1]]), ms.Tensor(np.zeros(3, np.int32)))
        metric.update(ms.Tensor(np.eye(3, dtype=np.float32)[[1, 1, 0]] * (epoch + 1)), ms.Tensor(np.zeros(3)))
        metric.update(ms.Tensor(np.eye(3, dtype=np.float32)), ms.Tensor(np.zeros(3)))  # past the 5: ignored
        assert metric.eval().tolist() == [2, 0, 1, 1, 1]


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "class-weighted"])
def test_a_short_last_batch_filled_up_gives_the_numbers_of_the_images_alone(tmp_path, weighted):
    """Validation fills its last batch up to the batch size (one compiled graph, not two): every batch is full, and
    accuracy, top-5, the confusion matrix, the loss (class-weighted too) and the preview's predictions are those of
    the real images. A split smaller than one batch is left as it is (one graph either way)."""
    import datasets
    from make_demo_data import write_cifar
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    rng = np.random.default_rng(4)
    classes = 6
    images, labels = rng.integers(0, 256, (70, 32, 32, 3), dtype=np.uint8), np.arange(70) % classes
    source = datasets.find_data(write_cifar(tmp_path / "cifar", (images, labels), (images, labels),
                                            [f"c{i}" for i in range(classes)]))
    padded = datasets.create_dataset(source, "val", 32, 32, pad_last_batch=True)
    batches = list(padded.create_tuple_iterator(output_numpy=True))
    assert [len(batch_labels) for _, batch_labels in batches] == [32, 32, 32]
    assert (batches[-1][1][6:] == datasets.PADDING_LABEL).all() and not batches[-1][0][6:].any()
    assert (np.concatenate([batch_labels for _, batch_labels in batches])[:70] == labels).all()
    small = datasets.create_dataset(source, "val", 32, 128, pad_last_batch=True)
    assert [len(batch_labels) for _, batch_labels in small.create_tuple_iterator(output_numpy=True)] == [70]

    ms.set_seed(1)
    net = nn.SequentialCell(nn.Flatten(), nn.Dense(3 * 32 * 32, classes))
    net.set_train(False)
    logits = np.concatenate([net(ms.Tensor(batch_images)).asnumpy() for batch_images, _ in batches])[:70]
    loss_fn = train_step.create_loss(np.linspace(0.5, 3, classes) if weighted else None)
    batch_losses = [float(loss_fn(ms.Tensor(logits[i:i + 32]), ms.Tensor(labels[i:i + 32].astype(np.int32))).asnumpy())
                    for i in range(0, 70, 32)]  # MindSpore's Loss metric: the mean of the batches' losses

    metrics = train_step.create_metrics(classes, preview_count=80)
    scores = ms.train.Model(net, loss_fn, metrics=metrics).eval(padded, dataset_sink_mode=False)
    predicted = logits.argmax(1)
    assert scores["accuracy"] == pytest.approx((predicted == labels).mean())
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert scores["top5_accuracy"] == pytest.approx((top5 == labels[:, None]).any(axis=1).mean())
    confusion = np.zeros((classes, classes))
    np.add.at(confusion, (labels, predicted), 1)
    assert (np.asarray(scores["confusion"]) == confusion).all()
    assert scores["loss"] == pytest.approx(np.mean(batch_losses), rel=1e-5)
    assert scores["first_predictions"].tolist() == predicted.tolist()  # 70 of the 80 asked: no padding's


class ApplyGradients(nn.Cell):
    def __init__(self, optimizer):
        super().__init__()
        self.optimizer = optimizer

    def construct(self, gradients):
        return self.optimizer(gradients)


@pytest.mark.parametrize("backbone_lr_scale", [0.1, 1.0])  # a learning rate per group, or one for all
def test_momentum_sgd_follows_its_formula_bitwise_with_groups_decay_and_a_schedule(momentum_kind, backbone_lr_scale):
    """create_optimizer's momentum SGD against the formula in float32 numpy, to the bit, on resnet18's parameters:
    the head at the full rate and the backbone at a fraction, weight decay on weights but not on BatchNorm or
    biases, a learning rate that changes every step, and the momentum a resume state restored (its Parameter).
    nn.Momentum and the fused operator compute it the same way."""
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    ms.set_seed(4)
    net = create_model("resnet18", 5)
    schedule = np.array([0.2, 0.1, 0.05], np.float32)
    optimizer = train_step.create_optimizer(net, schedule, 0.9, 1e-3, backbone_lr_scale=backbone_lr_scale)
    assert type(optimizer).__name__ == momentum_kind
    optimizer.momentum.set_data(ms.Tensor(0.8, ms.float32))  # as loading resume.ckpt does
    params = list(optimizer.parameters)
    assert [m.name for m in optimizer.moments] == ["moments." + p.name for p in params]  # resume states as before
    rates = [np.float32(1.0 if p.name.startswith("fc.") else backbone_lr_scale) for p in params]  # before a cell
    rng = np.random.default_rng(0)                                                                # prefixes names
    gradients = [rng.normal(scale=0.01, size=p.shape).astype(np.float32) for p in params]
    initial = [p.asnumpy().copy() for p in params]
    expected = [w.copy() for w in initial]
    accums = [np.zeros_like(w) for w in expected]
    step = ApplyGradients(optimizer)
    for lr in schedule:
        step(tuple(ms.Tensor(g) for g in gradients))
        for i, (p, g) in enumerate(zip(params, gradients)):
            decay = np.float32(1e-3 if p.ndim > 1 else 0.0)
            accums[i] = accums[i] * np.float32(0.8) + (g + decay * expected[i])
            expected[i] = expected[i] - np.float32(lr * rates[i]) * accums[i]
    assert optimizer.global_step.asnumpy().item() == 3
    for p, m, want, accum in zip(params, optimizer.moments, expected, accums):
        np.testing.assert_array_equal(m.asnumpy(), accum, err_msg=m.name)
        np.testing.assert_array_equal(p.asnumpy(), want, err_msg=p.name)
    assert not any(np.array_equal(p.asnumpy(), before) for p, before in zip(params, initial))  # every one moved


def test_the_fused_step_refuses_what_it_does_not_compute(monkeypatch):
    import onednn_conv
    monkeypatch.delenv(onednn_conv.DISABLE, raising=False)
    library, why_not = onednn_conv.load.__wrapped__()
    if library is None:
        pytest.skip(f"no C++ library here: {why_not}")
    net = create_model("resnet18", 5)
    groups = [{"params": net.trainable_params(), "grad_centralization": True}]
    with pytest.raises(ValueError, match="plain momentum SGD with constant weight decay only"):
        train_step.FusedMomentum(groups, ms.Tensor(np.full(2, 0.1, np.float32)), 0.9, library.momentum_step())
