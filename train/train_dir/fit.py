"""Fitting: device and mode set-up, the optimiser and its schedule, and the epoch bookkeeping callbacks.

Training runs through `mindspore.train.Model.fit` in GRAPH_MODE (the fastest mode on CPU, and the usual one on
GPU/Ascend); per-epoch work (validation numbers, checkpoints, metrics.json, the console line) happens in callbacks.
"""
import math
import os
import platform
import signal
import sys
import time
from typing import NamedTuple

import mindspore as ms
import mindspore.nn as nn
import mindspore.ops as ops
import numpy as np
from mindspore.train import Callback, Model

from errors import Diverged, Interrupted, UserError
from resnet import HEAD_PREFIX
from export import save_checkpoint, write_json

PREFERRED_DEVICES = ("Ascend", "GPU", "CPU")


# ---------------------------------------------------------------- device

def tune_cpu_env(environ=os.environ):
    """oneDNN in MindSpore picks a reference convolution kernel on AVX-512 CPUs (10-30x slower).

    Capping the ISA at AVX2 selects the fast JIT GEMM kernels. It must be set before the first op, and a value
    the user set wins.
    """
    if platform.machine().lower() in ("x86_64", "amd64"):
        environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")


def available_devices():
    """The device targets this MindSpore build can use, best first."""
    try:
        from mindspore import hal  # MindSpore >= 2.2
        return [d for d in PREFERRED_DEVICES if hal.is_available(d)]
    except (ImportError, AttributeError):
        return [ms.get_context("device_target")]


def choose_device(requested, available):
    """`auto` takes the best available target; an explicit one must be available."""
    if requested == "auto":
        for target in PREFERRED_DEVICES:
            if target in available:
                return target
        raise UserError("no usable device found by MindSpore")
    if requested not in available:
        raise UserError(f"--device_target {requested} is not available in this MindSpore installation "
                        f"(available: {', '.join(available) or 'none'})")
    return requested


def setup_device(requested):
    target = choose_device(requested, available_devices())
    ms.set_context(mode=ms.GRAPH_MODE, device_target=target)
    return target


def launched_workers(environ=os.environ):
    """Whether this process is one of several workers: msrun sets MS_ROLE, a ModelArts multi-card job RANK_SIZE."""
    return environ.get("MS_ROLE") == "MS_WORKER" or int(environ.get("RANK_SIZE") or 1) > 1


def join_data_parallel(environ=os.environ):
    """Join the other workers (data parallel, gradients averaged over them); (rank, workers, local rank), or
    (0, 1, 0) for a single process."""
    if not launched_workers(environ):
        return 0, 1, 0
    from mindspore.communication import get_group_size, get_local_rank, get_rank, init
    init()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    return get_rank(), get_group_size(), get_local_rank()


# ---------------------------------------------------------------- optimiser

def cosine_lr(base_lr, epochs, steps_per_epoch, warmup_epochs=0.0):
    """Per-step learning rates: linear warmup to `base_lr`, then cosine decay to zero."""
    total = epochs * steps_per_epoch
    warmup = min(int(round(warmup_epochs * steps_per_epoch)), total)
    step = np.arange(total, dtype=np.float64)
    warm = base_lr * (step + 1) / max(warmup, 1)
    progress = (step - warmup) / max(total - warmup, 1)
    cosine = 0.5 * base_lr * (1 + np.cos(math.pi * progress))
    return np.where(step < warmup, warm, cosine).astype(np.float32)


def create_optimizer(net, lr_schedule, momentum, weight_decay, backbone_lr_scale=1.0):
    """Momentum SGD over the trainable parameters; no weight decay on BatchNorm and biases; the backbone (all but
    `fc`) optionally at a fraction of the learning rate."""
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
    return nn.Momentum(groups, learning_rate=ms.Tensor(lr_schedule), momentum=momentum)


class ConfusionMatrix(nn.ConfusionMatrix):
    """Counts (rows: true class, columns: predicted); quiet about classes absent from a split."""

    def eval(self):
        with np.errstate(invalid="ignore", divide="ignore"):
            return super().eval()


class LossAndCorrect(nn.Cell):
    """The network and its loss; also returns how many of the batch's predictions were right (no gradient)."""

    def __init__(self, net, loss_fn):
        super().__init__(auto_prefix=False)  # parameter names stay the network's own
        self.net, self.loss_fn = net, loss_fn

    def construct(self, images, labels):
        logits = self.net(images)
        correct = ops.stop_gradient((logits.argmax(-1) == labels).astype(ms.float32).sum())
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


@_unscale.register("Tensor", "Tensor")
def _unscale_tensor(scale, grad):
    return grad / scale.astype(grad.dtype)


@_is_finite.register("Tensor")
def _is_finite_tensor(grad):
    return ops.isfinite(grad).all()


class TrainStep(nn.TrainOneStepCell):
    """One optimiser step returning (loss, right predictions), for a running train accuracy at no extra cost.

    The gradient reducer of `TrainOneStepCell` is kept, so data-parallel training averages gradients as usual.
    With a `DynamicLossScale` (mixed precision on GPU/Ascend), gradients are unscaled and a step whose gradients
    are not all finite leaves the weights alone.
    """

    def __init__(self, net_with_loss, optimizer, loss_scale=None):
        super().__init__(net_with_loss, optimizer)
        self.loss_scale = loss_scale
        self.hyper_map = ops.HyperMap()
        differentiated = net_with_loss if loss_scale is None else ScaledLoss(net_with_loss)
        self.value_and_grad = ops.value_and_grad(differentiated, None, self.weights, has_aux=True)

    def construct(self, images, labels):
        if self.loss_scale is None:
            (loss, correct), grads = self.value_and_grad(images, labels)
            grads = self.grad_reducer(grads)
            loss = ops.depend(loss, self.optimizer(grads))
            return loss, correct
        scale = self.loss_scale.value
        (_, loss, correct), grads = self.value_and_grad(images, labels, scale)
        grads = self.hyper_map(ops.partial(_unscale, scale), self.grad_reducer(grads))
        finite = ops.stack(self.hyper_map(_is_finite, grads)).all()
        loss = ops.depend(loss, self.loss_scale(finite))
        if finite:
            loss = ops.depend(loss, self.optimizer(grads))
        return loss, correct


class TrainingPlan(NamedTuple):
    """How the device trains: `amp_level` O0 (fp32) or O2 (fp16, BatchNorm and the loss in fp32), loss scaling,
    and dataset sink (whole epochs run on the device, without Python between steps)."""
    amp_level: str
    loss_scale: bool
    dataset_sink: bool

    def describe(self):
        precision = "fp32 (amp O0)" if self.amp_level == "O0" else f"mixed fp16 (amp {self.amp_level})"
        return (f"{precision}, loss scale {'dynamic' if self.loss_scale else 'off'}, "
                f"dataset sink {'on' if self.dataset_sink else 'off'}")


def plan_training(device, amp_level="auto", dataset_sink="auto"):
    """Mixed precision with dynamic loss scaling on GPU and Ascend, where fp16 is fast; fp32 on CPU, where it is
    slower and some fp16 kernels are missing. Dataset sink on Ascend; the CPU has none."""
    if amp_level == "auto":
        amp_level = "O0" if device == "CPU" else "O2"
    elif amp_level != "O0" and device == "CPU":
        raise UserError(f"--amp_level {amp_level} needs GPU or Ascend: on CPU, fp16 is slower than fp32")
    sink = device == "Ascend" if dataset_sink == "auto" else dataset_sink == "true"
    if sink and device == "CPU":
        raise UserError("--dataset_sink true needs GPU or Ascend: the CPU has no dataset sink")
    return TrainingPlan(amp_level, amp_level != "O0", sink)


def create_trainer(net, optimizer, num_classes, plan=TrainingPlan("O0", False, False)):
    """A Model whose evaluation reports accuracy, loss, the confusion matrix, and top-5 accuracy from 5 classes."""
    loss_fn = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    metrics = {"accuracy": nn.Accuracy(), "loss": nn.Loss(), "confusion": ConfusionMatrix(num_classes)}
    if num_classes >= 5:
        metrics["top5_accuracy"] = nn.Top5CategoricalAccuracy()
    if plan.amp_level != "O0":  # casts the cells in place (evaluation runs in fp16 too); logits come back fp32
        net = ms.amp.auto_mixed_precision(net, plan.amp_level)
    train_step = TrainStep(LossAndCorrect(net, loss_fn), optimizer, DynamicLossScale() if plan.loss_scale else None)
    return Model(train_step, eval_network=nn.WithEvalCell(net, loss_fn), eval_indexes=[0, 1, 2], metrics=metrics)


def fit(trainer, epochs, train_data, val_data, callbacks, initial_epoch=0, dataset_sink=False):
    """Train up to epoch `epochs`, validating after each one, in GRAPH_MODE; with `dataset_sink`, each epoch runs
    on the device in one go (callbacks then see one step per epoch)."""
    trainer.fit(epochs, train_data, valid_dataset=val_data, callbacks=callbacks,
                dataset_sink_mode=dataset_sink, valid_dataset_sink_mode=False, initial_epoch=initial_epoch)


def batch_size(cb_params):
    """Images in one step. Read off the dataset: with dataset sink, callbacks get no batch."""
    return cb_params.train_dataset.get_batch_size()


def images_since(cb_params, step):
    """Images trained on since global step `step` (with dataset sink, one callback covers many steps)."""
    return (cb_params.cur_step_num - step) * batch_size(cb_params)


# ---------------------------------------------------------------- callbacks

def step_loss(cb_params):
    """The scalar loss of the last step (the first output when the step returns a tuple)."""
    outputs = cb_params.net_outputs
    if isinstance(outputs, (tuple, list)):
        outputs = outputs[0]
    return float(np.asarray(outputs.asnumpy()).reshape(-1)[0])


def step_correct(cb_params):
    """How many of the last step's images were predicted right, when the step reports it (`TrainStep` does)."""
    outputs = cb_params.net_outputs
    if isinstance(outputs, (tuple, list)) and len(outputs) == 2:
        return float(np.asarray(outputs[1].asnumpy()).reshape(-1)[0])
    return None


class RunningAccuracy:
    """Train loss and accuracy averaged over an epoch's steps (accuracy over images, as the model trains), and the
    images trained on since global step `start_step`."""

    def __init__(self, start_step=0):
        self.losses, self.correct, self.images = [], 0.0, 0  # images: those whose predictions were counted
        self.trained, self.step = 0, start_step

    def add(self, cb_params):
        """Adds the last step's outputs; returns the images trained on since the previous call."""
        self.losses.append(step_loss(cb_params))  # reading the outputs waits for the step to finish
        correct = step_correct(cb_params)
        if correct is not None:
            self.correct += correct
            self.images += batch_size(cb_params)
        new = images_since(cb_params, self.step)
        self.trained, self.step = self.trained + new, cb_params.cur_step_num
        return new

    @property
    def loss(self):
        return float(np.mean(self.losses)) if self.losses else float("nan")

    @property
    def accuracy(self):
        return self.correct / self.images if self.images else float("nan")


class EpochRecorder(Callback):
    """Times each epoch, saves `<arch>-last.ckpt` and `<arch>-best.ckpt`, and rewrites metrics.json.

    The finished record is put on `cb_params.epoch_record` for callbacks that come after this one.
    """

    RESUME_FILE = "resume.ckpt"

    def __init__(self, net, output_dir, arch, train_step=None, run_id=""):
        super().__init__()
        self.net = net
        self.train_step, self.run_id = train_step, run_id or ""
        self.resume_path = output_dir / self.RESUME_FILE
        self.metrics_path = output_dir / "metrics.json"
        self.last_path = output_dir / f"{arch}-last.ckpt"
        self.best_path = output_dir / f"{arch}-best.ckpt"
        self.history = []
        self.best_accuracy = -1.0

    def on_train_epoch_begin(self, run_context):
        self.epoch_start = time.perf_counter()
        self.step_seconds, self.running = 0.0, RunningAccuracy(run_context.original_args().cur_step_num)

    def on_train_step_begin(self, run_context):
        self.step_start = time.perf_counter()

    def on_train_step_end(self, run_context):
        cb_params = run_context.original_args()
        self.running.add(cb_params)
        self.step_seconds += time.perf_counter() - self.step_start

    def on_train_epoch_end(self, run_context):
        cb_params = run_context.original_args()
        val = cb_params.get("metrics") or {}
        record = {
            "epoch": cb_params.cur_epoch_num,
            "train_loss": self.running.loss,
            "train_accuracy": self.running.accuracy,
            "val_loss": float(val.get("loss", float("nan"))),
            "val_accuracy": float(val.get("accuracy", float("nan"))),
        }
        if "top5_accuracy" in val:
            record["val_top5_accuracy"] = float(val["top5_accuracy"])
        save_checkpoint(self.net, self.last_path)
        record["best"] = record["val_accuracy"] > self.best_accuracy
        if record["best"]:
            self.best_accuracy = record["val_accuracy"]
            save_checkpoint(self.net, self.best_path)
        record["seconds"] = time.perf_counter() - self.epoch_start
        record["images_per_second"] = self.running.trained / self.step_seconds if self.step_seconds else 0.0
        self.history.append(record)
        write_json(self.metrics_path, self.history)
        if self.train_step is not None:  # weights, optimizer moments and step: what --resume continues from
            save_checkpoint(self.train_step, self.resume_path, {"epoch": record["epoch"],
                                                                "best_accuracy": self.best_accuracy,
                                                                "aim_run": self.run_id})
        cb_params.epoch_record = record

    def restore(self, history, best_accuracy):
        """Continue a resumed run's records: the finished epochs, and the best accuracy so far."""
        self.history, self.best_accuracy = list(history), best_accuracy


class ConsoleProgress(Callback):
    """A tqdm bar per epoch on a terminal, plain lines otherwise; one summary line per epoch."""

    def __init__(self, epochs, steps_per_epoch, lines_per_epoch=4):
        super().__init__()
        self.epochs, self.steps = epochs, steps_per_epoch
        self.interactive = sys.stdout.isatty()
        self.every = max(1, steps_per_epoch // lines_per_epoch)
        self.bar = None

    def on_train_epoch_begin(self, run_context):
        epoch = run_context.original_args().cur_epoch_num
        if self.interactive:
            from tqdm import tqdm
            self.bar = tqdm(total=self.steps, desc=f"epoch {epoch}/{self.epochs}", file=sys.stdout,
                            leave=False, dynamic_ncols=True)

    def on_train_step_end(self, run_context):
        cb_params = run_context.original_args()
        step = (cb_params.cur_step_num - 1) % self.steps + 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{step_loss(cb_params):.4f}", refresh=False)
        elif step % self.every == 0 and step < self.steps:  # the epoch line reports the last step
            print(f"epoch {cb_params.cur_epoch_num}/{self.epochs} step {step}/{self.steps} "
                  f"loss {step_loss(cb_params):.4f}", flush=True)

    def on_train_epoch_end(self, run_context):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        r = run_context.original_args().epoch_record
        print(f"epoch {r['epoch']}/{self.epochs}  train_loss {r['train_loss']:.4f}  "
              f"train_accuracy {r['train_accuracy']:.4f}  val_loss {r['val_loss']:.4f}  "
              f"val_accuracy {r['val_accuracy']:.4f}{' *' if r['best'] else ''}  {r['seconds']:.1f}s  "
              f"{r['images_per_second']:.1f} img/s", flush=True)


class EpochEndHook(Callback):
    """Calls `action()` after every epoch, once the epoch's outputs are written (e.g. to upload them)."""

    def __init__(self, action):
        super().__init__()
        self.action = action

    def on_train_epoch_end(self, run_context):
        self.action()


class StopOnNonFiniteLoss(Callback):
    """Stops training at the first NaN or infinite loss, before that epoch is recorded, naming the step."""

    def on_train_step_end(self, run_context):
        cb_params = run_context.original_args()
        loss = step_loss(cb_params)
        if not math.isfinite(loss):
            raise Diverged(f"the loss became {loss} at step {cb_params.cur_step_num} (epoch "
                           f"{cb_params.cur_epoch_num}); the outputs of the finished epochs are kept. "
                           f"Lower --lr or add --warmup_epochs")


class StopOnSignal(Callback):
    """Ctrl-C (SIGINT) and preemption (SIGTERM) stop training at the end of the current step, by raising
    `Interrupted` there, so the job can close its Aim run and upload the finished epochs' outputs.

    While a graph runs, MindSpore swaps in its own SIGINT handler, which turns Ctrl-C into a SIGTERM to the
    process (so a Ctrl-C usually arrives here as SIGTERM); ours is installed again before every step.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        super().__init__()
        self.received = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.received = signum

    def on_train_begin(self, run_context):
        self._previous = {s: signal.getsignal(s) for s in self.SIGNALS}

    def on_train_step_begin(self, run_context):
        for s in self.SIGNALS:
            signal.signal(s, self._handle)

    def on_train_step_end(self, run_context):
        if self.received is not None:
            self.on_train_end(run_context)  # a second Ctrl-C during the clean-up then interrupts at once
            raise Interrupted(self.received)

    def on_train_end(self, run_context):
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


class SyncBatchNormStatistics(Callback):
    """Data parallel: average BatchNorm's moving statistics over the workers at the end of every epoch, before
    validation, so every worker holds the same weights and reports the same validation numbers.

    Gradients are averaged every step, but each worker's moving statistics follow only its own shard of the data.
    """

    def __init__(self, net, workers, steps_per_epoch):
        super().__init__()
        self.statistics = [p for name, p in net.parameters_and_names()
                           if name.endswith(("moving_mean", "moving_variance"))]
        self.workers, self.steps_per_epoch = workers, steps_per_epoch
        self.all_reduce = None

    def on_train_step_end(self, run_context):
        if run_context.original_args().cur_step_num % self.steps_per_epoch:
            return  # validation runs right after the epoch's last step, before on_train_epoch_end
        if self.all_reduce is None:
            self.all_reduce = _AllReduceMean(self.workers)
        flat = np.concatenate([p.asnumpy().reshape(-1) for p in self.statistics])
        mean = self.all_reduce(ms.Tensor(flat)).asnumpy()
        offset = 0
        for param in self.statistics:
            size = int(np.prod(param.shape))
            param.set_data(ms.Tensor(mean[offset:offset + size].reshape(param.shape), param.dtype))
            offset += size


class _AllReduceMean(nn.Cell):
    def __init__(self, workers):
        super().__init__()
        self.all_reduce = ops.AllReduce()
        self.workers = workers

    def construct(self, x):
        return self.all_reduce(x) / self.workers

