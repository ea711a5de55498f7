"""The training step: one optimiser update that also counts the batch's right predictions."""
import mindspore as ms
import mindspore.nn as nn
import numpy as np

import fit
from resnet import create_model


def test_train_step_counts_right_predictions_and_updates_the_weights():
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    ms.set_seed(3)
    net = create_model("resnet18", 3)
    images = np.random.default_rng(0).normal(size=(8, 3, 32, 32)).astype(np.float32)
    net.set_train(True)  # train mode: batch statistics, as inside the step
    predicted = net(ms.Tensor(images)).asnumpy().argmax(1)
    labels = np.where(np.arange(8) < 5, predicted, (predicted + 1) % 3).astype(np.int32)  # 5 right, 3 wrong

    loss_fn = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    optimizer = fit.create_optimizer(net, fit.cosine_lr(0.1, 1, 1), momentum=0.9, weight_decay=1e-4)
    before = net.fc.weight.asnumpy().copy()
    step = fit.TrainStep(fit.LossAndCorrect(net, loss_fn), optimizer)
    step.set_train()
    loss, correct = step(ms.Tensor(images), ms.Tensor(labels))

    assert float(correct.asnumpy()) == 5.0
    assert np.isfinite(loss.asnumpy()).all() and float(loss.asnumpy()) > 0
    assert not np.array_equal(before, net.fc.weight.asnumpy())
    assert "fc.weight" in {p.name for p in step.trainable_params()}  # the network's own names, no prefix
