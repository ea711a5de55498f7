"""The training step: loss with right-prediction counts, the optimiser and its schedule, loss scaling, and the
`Model` that trains and validates with them."""
import math

import mindspore as ms
import mindspore.nn as nn
import mindspore.ops as ops
import numpy as np
from mindspore.train import Model

import onednn_conv
from datasets import without_padding
from errors import UserError
from resnet import HEAD_PREFIX
from runtime import TrainingPlan


def learning_rates(base_lr, epochs, steps_per_epoch, warmup_epochs=0.0, schedule="cosine", step_epochs=None,
                   gamma=0.1):
    """Per-step learning rates: a linear warmup to `base_lr`, then `schedule`: cosine decay to zero, a drop by
    `gamma` every `step_epochs` (default: a third of the epochs after warmup), or constant. `steps_per_epoch` may be
    fractional (updates per epoch, with accumulation)."""
    total = int(math.ceil(epochs * steps_per_epoch))
    warmup = min(max(int(round(warmup_epochs * steps_per_epoch)), 1 if warmup_epochs > 0 else 0), total)
    step = np.arange(total, dtype=np.float64)
    warm = base_lr * (step + 1) / max(warmup, 1)
    after = step - warmup
    if schedule == "cosine":
        decayed = 0.5 * base_lr * (1 + np.cos(math.pi * after / max(total - warmup, 1)))
    elif schedule == "step":
        every = step_epochs * steps_per_epoch if step_epochs else max(total - warmup, 1) / 3
        decayed = base_lr * gamma ** np.floor(np.maximum(after, 0) / max(every, 1))
    elif schedule == "constant":
        decayed = np.full_like(step, base_lr)
    else:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}")
    return np.where(step < warmup, warm, decayed).astype(np.float32)


def cosine_lr(base_lr, epochs, steps_per_epoch, warmup_epochs=0.0):
    """Per-step learning rates: linear warmup to `base_lr`, then cosine decay to zero."""
    return learning_rates(base_lr, epochs, steps_per_epoch, warmup_epochs)


def create_optimizer(net, lr_schedule, momentum, weight_decay, backbone_lr_scale=1.0, kind="momentum"):
    """Momentum SGD (or AdamW: decoupled weight decay) over the trainable parameters; no weight decay on BatchNorm
    and biases; the backbone (all but `fc`) optionally at a fraction of the learning rate."""
    params = net.trainable_params()
    groups = []
    for is_head, scale in ((True, 1.0), (False, backbone_lr_scale)):
        part = [p for p in params if p.name.startswith(HEAD_PREFIX) == is_head]
        for decayed in (True, False):
            chosen = [p for p in part if (len(p.shape) > 1) == decayed]
            if chosen:
                group = {"params": chosen, "weight_decay": weight_decay if decayed else 0.0}
                if scale != 1.0:
                    group["lr"] = ms.Tensor(lr_schedule * scale)
                groups.append(group)
    groups.append({"order_params": params})
    if kind == "adamw":
        return nn.AdamWeightDecay(groups, learning_rate=ms.Tensor(lr_schedule), beta1=0.9, beta2=0.999, eps=1e-8)
    library = onednn_conv.load()[0] if ms.get_context("device_target") == "CPU" else None
    if library is not None:
        return FusedMomentum(groups, ms.Tensor(lr_schedule), momentum, library.momentum_step())
    return nn.Momentum(groups, learning_rate=ms.Tensor(lr_schedule), momentum=momentum)


class FusedMomentum(nn.Momentum):
    """nn.Momentum (as create_optimizer makes it: no Nesterov, loss scale or gradient centralisation) with the whole
    step, weight decay included, in one CPU operator (fused_momentum.cc) instead of three kernels a decayed parameter
    and one for the others: bitwise the same numbers, in a third of the time (README, Performance). The same
    parameters, moments, momentum and step counter, so checkpoints and resume states are nn.Momentum's."""

    def __init__(self, params, learning_rate, momentum, step_operator):
        super().__init__(params, learning_rate=learning_rate, momentum=momentum)
        if self.use_nesterov or self.need_scale or self.dynamic_weight_decay or any(
                getattr(self, "grad_centralization_flags", ())):
            raise ValueError("FusedMomentum computes plain momentum SGD with constant weight decay only")
        count = len(self._parameters)
        decays = self.weight_decay if isinstance(self.weight_decay, tuple) else (self.weight_decay,) * count
        self.decays = ms.Tensor([float(decay) if decayed else 0.0 for decay, decayed in zip(decays, self.decay_flags)],
                                ms.float32)
        self.step_operator = step_operator

    def construct(self, gradients):
        lr = self.get_lr()
        self.assignadd(self.global_step, self.global_step_increase_tensor)
        if self.is_group_lr:
            rates = ops.stack(lr)
        else:
            rates = ops.broadcast_to(ops.reshape(lr, (1,)), (len(self._parameters),))
        momentum = ops.reshape(self.momentum, (1,))  # the Parameter, which a resume state restores
        return self.step_operator(rates, self.decays, momentum, *self._parameters, *self.moments, *gradients)


def real_rows(logits, labels):
    """(logits, labels) as NumPy arrays without the rows that fill a last batch up (datasets.PADDING_LABEL)."""
    logits, labels = (np.asarray(x.asnumpy() if isinstance(x, ms.Tensor) else x) for x in (logits, labels))
    labels, logits = without_padding(labels, logits)
    return logits, labels


class _LeavesOutPadding:
    """For a MindSpore metric fed (logits, labels): the rows filling a last batch up are left out."""

    def update(self, logits, labels):
        super().update(*real_rows(logits, labels))


class Accuracy(_LeavesOutPadding, nn.Accuracy):
    """Right predictions over images."""


class Top5Accuracy(_LeavesOutPadding, nn.Top5CategoricalAccuracy):
    """Images whose class is among the 5 highest logits."""


class ConfusionMatrix(_LeavesOutPadding, nn.ConfusionMatrix):
    """Counts (rows: true class, columns: predicted); quiet about classes absent from a split."""

    def eval(self):
        with np.errstate(invalid="ignore", divide="ignore"):
            return super().eval()


class FirstPredictions(nn.Metric):
    """The classes predicted for the first `count` images validated: the unshuffled validation split's first
    images are the Aim preview's, so the validation pass predicts them (a forward of its own compiled another
    graph, seconds every job)."""

    def __init__(self, count):
        super().__init__()
        self.count = count
        self.clear()

    def clear(self):
        self._predicted = []

    def update(self, logits, labels):
        missing = self.count - len(self._predicted)
        if missing > 0:
            self._predicted += real_rows(logits, labels)[0].argmax(axis=1)[:missing].tolist()

    def eval(self):
        return np.array(self._predicted, dtype=np.int64)


def class_accuracy(confusion):
    """Per-class recall from a confusion matrix (rows: true class); NaN for a class with no images."""
    confusion = np.asarray(confusion, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.diag(confusion) / confusion.sum(axis=1)


def macro_f1(confusion):
    """The mean over classes of F1 = 2PR / (P + R), each class's precision and recall from a confusion matrix
    (rows: true class); 0 for a class never predicted or never right, and classes absent from both left out."""
    confusion = np.asarray(confusion, dtype=np.float64)
    right, truth, predicted = np.diag(confusion), confusion.sum(axis=1), confusion.sum(axis=0)
    present = (truth + predicted) > 0
    f1 = np.divide(2 * right, truth + predicted, out=np.zeros_like(right), where=present)  # = 2PR / (P + R)
    return float(f1[present].mean()) if present.any() else float("nan")


def class_weights(counts, num_classes=None):
    """Inverse-frequency weights, N / (C x n_c), from the training split's images per class: every class then
    weighs as much in the loss. Classes beyond the data's (room left by --num_classes) get 1."""
    counts = np.asarray(counts, dtype=np.float64)
    if (counts == 0).any():
        raise UserError(f"--class_weights auto needs images of every class in the training split; counts: "
                        f"{counts.astype(int).tolist()}")
    weights = counts.sum() / (len(counts) * counts)
    return np.concatenate([weights, np.ones((num_classes or len(counts)) - len(counts))]).astype(np.float32)


class LossAndCorrect(nn.Cell):
    """The network and its loss; also returns how many of the batch's predictions were right (no gradient)."""

    def __init__(self, net, loss_fn):
        super().__init__(auto_prefix=False)  # parameter names stay the network's own
        self.net, self.loss_fn = net, loss_fn

    def construct(self, images, labels):
        logits = self.net(images)
        truth = labels.argmax(-1) if labels.ndim == 2 else labels  # mixup/cutmix: the larger share counts
        correct = ops.stop_gradient((logits.argmax(-1) == truth).astype(ms.float32).sum())
        return self.loss_fn(logits, labels), correct


class ScaledLoss(nn.Cell):
    """The loss times the loss scale, for fp16 gradients that would otherwise underflow; the unscaled loss and the
    right predictions ride along."""

    def __init__(self, net_with_loss):
        super().__init__(auto_prefix=False)
        self.net_with_loss = net_with_loss

    def construct(self, images, labels, scale):
        loss, correct = self.net_with_loss(images, labels)
        return loss * scale.astype(loss.dtype), loss, correct


class DynamicLossScale(nn.Cell):
    """The loss scale of mixed-precision training: halved after a step whose gradients overflow (that step is
    skipped), doubled after `window` clean steps in a row. Its state is saved with the optimiser's for --resume."""

    def __init__(self, initial=2.0 ** 16, factor=2.0, window=1000):
        super().__init__()
        self.value = ms.Parameter(ms.Tensor(initial, ms.float32), name="loss_scale", requires_grad=False)
        self.clean_steps = ms.Parameter(ms.Tensor(0, ms.int32), name="loss_scale_clean_steps", requires_grad=False)
        self.factor, self.window = factor, window
        self.one = ms.Tensor(1.0, ms.float32)

    def construct(self, finite):
        clean = ops.select(finite, self.clean_steps + 1, ops.zeros_like(self.clean_steps))
        grow = clean >= self.window
        value = ops.select(finite, ops.select(grow, self.value * self.factor, self.value),
                           ops.maximum(self.value / self.factor, self.one))
        ops.assign(self.clean_steps, ops.select(grow, ops.zeros_like(clean), clean))
        return ops.assign(self.value, value)


_unscale = ops.MultitypeFuncGraph("unscale")
_is_finite = ops.MultitypeFuncGraph("is_finite")
_add_to = ops.MultitypeFuncGraph("add_to")
_clear = ops.MultitypeFuncGraph("clear")
_times = ops.MultitypeFuncGraph("times")
_average_into = ops.MultitypeFuncGraph("average_into")


@_unscale.register("Tensor", "Tensor")
def _unscale_tensor(scale, grad):
    return grad / scale.astype(grad.dtype)


@_is_finite.register("Tensor")
def _is_finite_tensor(grad):
    return ops.isfinite(grad).all()


@_add_to.register("Tensor", "Tensor")
def _add_to_tensor(total, grad):
    return ops.assign_add(total, grad.astype(total.dtype))


@_clear.register("Tensor")
def _clear_tensor(total):
    return ops.assign(total, ops.zeros_like(total))


@_times.register("Number", "Tensor")
def _times_tensor(factor, value):
    return value * factor


@_times.register("Tensor", "Tensor")
def _times_by_tensor(factor, value):
    return value * factor.astype(value.dtype)


_square_sum = ops.MultitypeFuncGraph("square_sum")


@_square_sum.register("Tensor")
def _square_sum_tensor(grad):
    return (grad.astype(ms.float32) ** 2).sum()


def clip_to_global_norm(grads, max_norm, hyper_map):
    """`grads` scaled by min(1, max_norm / their global L2 norm) (ops.clip_by_global_norm is deprecated)."""
    norm = ops.sqrt(ops.stack(hyper_map(_square_sum, grads)).sum())
    factor = ops.minimum(ms.Tensor(1.0, ms.float32), max_norm / ops.maximum(norm, ms.Tensor(1e-12, ms.float32)))
    return hyper_map(ops.partial(_times, factor), grads)


@_average_into.register("Tensor", "Tensor", "Tensor")
def _average_into_tensor(decay, average, value):
    return ops.assign(average, average * decay.astype(average.dtype) + value.astype(average.dtype) *
                      (1 - decay).astype(average.dtype))


class WeightAverage(nn.Cell):
    """An exponential moving average of a network's parameters (weights and BatchNorm statistics), kept in a second
    copy of the network (`average`), after each update: average = d * average + (1 - d) * weight, where
    d = min(decay, (1 + n) / (10 + n)) after n updates (TensorFlow's ExponentialMovingAverage warm-up, so the first
    updates are not buried under the random start). The copy's parameters are named `ema.*`, so the train step's
    checkpoint (resume.ckpt) holds them beside the weights."""

    PREFIX = "ema."

    def __init__(self, net, average, decay):
        super().__init__(auto_prefix=False)
        sources, averages = list(net.get_parameters()), list(average.get_parameters())
        if [p.name for p in sources] != [p.name for p in averages]:
            raise ValueError("the average must be a copy of the network")
        for param in averages:
            param.name = self.PREFIX + param.name
            param.requires_grad = False
        self.copy = average  # validated, saved and exported in the network's place
        average.parameter_prefix = self.PREFIX  # export.save_checkpoint saves it under the network's names
        self.sources, self.averages = ms.ParameterTuple(sources), ms.ParameterTuple(averages)
        self.decay = float(decay)
        self.updates = ms.Parameter(ms.Tensor(0, ms.int32), name="ema_updates", requires_grad=False)
        self.hyper_map = ops.HyperMap()

    def construct(self):
        count = self.updates + 1
        ops.assign(self.updates, count)
        count = count.astype(ms.float32)
        decay = ops.minimum(ms.Tensor(self.decay, ms.float32), (1 + count) / (10 + count))
        return self.hyper_map(ops.partial(_average_into, decay), self.averages, self.sources)


class TrainStep(nn.TrainOneStepCell):
    """One optimiser step returning (loss, right predictions), for a running train accuracy at no extra cost.

    The gradient reducer of `TrainOneStepCell` is kept, so data-parallel training averages gradients as usual.
    With a `DynamicLossScale` (mixed precision on GPU/Ascend), gradients are unscaled and a step whose gradients
    are not all finite leaves the weights alone. `clip_grad_norm` scales the (unscaled, averaged) gradients down to
    that global norm. With `accumulate` N, the gradients of N steps are summed (in parameters saved with the resume
    state, as is the count) and every Nth step makes one update with their mean: one all-reduce per update, and an
    overflow in any of the N skips the whole update. A `WeightAverage` is updated after every update.
    """

    def __init__(self, net_with_loss, optimizer, loss_scale=None, clip_grad_norm=0.0, accumulate=1, average=None):
        super().__init__(net_with_loss, optimizer)
        self.loss_scale = loss_scale
        self.clip_grad_norm = float(clip_grad_norm)
        self.accumulate = int(accumulate)
        self.average = average
        self.hyper_map = ops.HyperMap()
        differentiated = net_with_loss if loss_scale is None else ScaledLoss(net_with_loss)
        self.value_and_grad = ops.value_and_grad(differentiated, None, self.weights, has_aux=True)
        if self.accumulate > 1:
            self.accumulated = self.weights.clone(prefix="accumulated", init="zeros")
            self.micro_step = ms.Parameter(ms.Tensor(0, ms.int32), name="accumulated_steps", requires_grad=False)

    def construct(self, images, labels):
        if self.loss_scale is None:
            (loss, correct), grads = self.value_and_grad(images, labels)
        else:
            (_, loss, correct), grads = self.value_and_grad(images, labels, self.loss_scale.value)
        if self.accumulate == 1:
            return ops.depend(loss, self._update(grads)), correct
        loss = ops.depend(loss, self.hyper_map(_add_to, self.accumulated, grads))
        count = self.micro_step + 1
        if count >= self.accumulate:
            mean = self.hyper_map(ops.partial(_times, 1.0 / self.accumulate), self.accumulated)
            loss = ops.depend(loss, self._update(mean))
            loss = ops.depend(loss, self.hyper_map(_clear, self.accumulated))
            count = count * 0
        loss = ops.depend(loss, ops.assign(self.micro_step, count))
        return loss, correct

    def _update(self, grads):
        """All-reduce, unscale, skip when not finite, clip, step, average."""
        grads = self.grad_reducer(grads)
        if self.loss_scale is None:
            if self.clip_grad_norm > 0:
                grads = clip_to_global_norm(grads, self.clip_grad_norm, self.hyper_map)
            done = self.optimizer(grads)
            if self.average is not None:
                done = ops.depend(done, self.average())
            return done
        scale = self.loss_scale.value
        grads = self.hyper_map(ops.partial(_unscale, scale), grads)
        finite = ops.stack(self.hyper_map(_is_finite, grads)).all()
        if self.clip_grad_norm > 0:  # after unscaling, on the gradients the optimiser gets
            grads = clip_to_global_norm(grads, self.clip_grad_norm, self.hyper_map)
        done = self.loss_scale(finite)
        if finite:
            done = ops.depend(done, self.optimizer(grads))
            if self.average is not None:
                done = ops.depend(done, self.average())
        return done


def create_loss(weights=None, label_smoothing=0.0):
    """Mean cross-entropy of logits against class indices or (mixup/cutmix) rows of class probabilities, exact for
    any logits; with per-class `weights`, the weighted mean sum(w[y] * loss) / sum(w[y]); with `label_smoothing` s,
    against targets of 1 - s on the label plus s / C on every class (with weights and soft labels, MindSpore
    divides by the batch size instead: the two agree on average under inverse-frequency weights). Not MindSpore
    2.10's sparse `SoftmaxCrossEntropyWithLogits`: it returns inf on CPU once a wrong class leads by more than about
    88, which would stop a job whose model is confidently wrong on one image as if it had diverged."""
    weight = None if weights is None else ms.Tensor(np.asarray(weights, np.float32))
    return nn.CrossEntropyLoss(weight=weight, reduction="mean", label_smoothing=float(label_smoothing))


def create_metrics(num_classes, preview_count=0):
    """Accuracy, loss, the confusion matrix, top-5 accuracy from 5 classes, and with `preview_count` the classes
    predicted for that many first images ("first_predictions")."""
    metrics = {"accuracy": Accuracy(), "loss": nn.Loss(), "confusion": ConfusionMatrix(num_classes)}
    if num_classes >= 5:
        metrics["top5_accuracy"] = Top5Accuracy()
    if preview_count:
        metrics["first_predictions"] = FirstPredictions(preview_count)
    return metrics


def create_evaluator(net, num_classes, weights=None):
    """A Model that only evaluates `net` (whole, whatever was trained of it), with the trainer's metrics."""
    return Model(net, create_loss(weights), metrics=create_metrics(num_classes))


def create_trainer(net, optimizer, num_classes, plan=TrainingPlan("O0", False, False), weights=None,
                   label_smoothing=0.0, clip_grad_norm=0.0, accumulate=1, average=None, preview_count=0):
    """A Model whose evaluation reports accuracy, loss, the confusion matrix, and top-5 accuracy from 5 classes.
    Per-class `weights` weight the loss, in training and validation alike; label smoothing is for training only,
    so the validation loss is the plain one whatever the recipe. With `average` (a WeightAverage), validation
    runs on the averaged copy of the network. With `preview_count`, it also gives the classes predicted for the
    first images validated (the Aim preview's)."""
    loss_fn = create_loss(weights)
    metrics = create_metrics(num_classes, preview_count)
    evaluated = net
    if plan.amp_level != "O0":  # casts the cells in place (evaluation runs in fp16 too); logits come back fp32
        net = ms.amp.auto_mixed_precision(net, plan.amp_level)
        evaluated = net if average is None else ms.amp.auto_mixed_precision(average.copy, plan.amp_level)
    elif average is not None:
        evaluated = average.copy
    train_step = TrainStep(LossAndCorrect(net, create_loss(weights, label_smoothing)), optimizer,
                           DynamicLossScale() if plan.loss_scale else None, clip_grad_norm, accumulate, average)
    return Model(train_step, eval_network=nn.WithEvalCell(evaluated, loss_fn), eval_indexes=[0, 1, 2],
                 metrics=metrics)
