"""What happens around the training steps: one meter reads each step off the device, and the callbacks after it
record epochs, print progress, stop on a bad loss or a signal, and keep data-parallel workers in step.

`create_callbacks` puts them in the order they depend on; MindSpore calls each hook in list order.
"""
import contextlib
import math
import signal
import sys
import time
from typing import NamedTuple, Optional

import mindspore as ms
import numpy as np
from mindspore.train import Callback

import run_state
import runtime
from errors import Diverged, Interrupted
from export import save_checkpoint, write_json
from train_step import macro_f1


class StepMeasurement(NamedTuple):
    loss: float
    correct: Optional[float]  # right predictions in the batch, when the train step reports them (TrainStep does)
    images: int  # trained since the previous measurement (with dataset sink, one callback covers many steps)
    seconds: float  # from the step's start until its outputs were read


class EpochTotals:
    """The epoch's steps so far: mean loss, accuracy over the images whose predictions were counted, speed."""

    def __init__(self):
        self.losses, self.correct, self.counted, self.images, self.seconds = [], 0.0, 0, 0, 0.0

    def add(self, measured, batch_size):
        self.losses.append(measured.loss)
        if measured.correct is not None:
            self.correct += measured.correct
            self.counted += batch_size
        self.images += measured.images
        self.seconds += measured.seconds

    @property
    def loss(self):
        return float(np.mean(self.losses)) if self.losses else float("nan")

    @property
    def accuracy(self):
        return self.correct / self.counted if self.counted else float("nan")

    @property
    def images_per_second(self):
        return self.images / self.seconds if self.seconds else 0.0


def _first_value(tensor):
    return float(np.asarray(tensor.asnumpy()).reshape(-1)[0])


class StepMeter(Callback):
    """Reads each step's loss and right predictions off the device once (which waits for the step) and times it.

    Callbacks after it read `last` (this step) and `epoch` (the epoch's totals so far)."""

    def __init__(self):
        super().__init__()
        self.last, self.epoch = None, EpochTotals()
        self.epoch_start = self._step_start = time.perf_counter()
        self._counted_to = 0  # the global step up to which images were counted

    def on_train_epoch_begin(self, run_context):
        self.epoch, self.epoch_start = EpochTotals(), time.perf_counter()
        self._counted_to = run_context.original_args().cur_step_num

    def on_train_step_begin(self, run_context):
        self._step_start = time.perf_counter()

    def on_train_step_end(self, run_context):
        cb_params = run_context.original_args()
        outputs = cb_params.net_outputs
        loss, correct = (outputs[0], outputs[1] if len(outputs) == 2 else None) \
            if isinstance(outputs, (tuple, list)) else (outputs, None)
        loss, correct = _first_value(loss), None if correct is None else _first_value(correct)
        element = cb_params.get("train_dataset_element")  # the batch itself; with dataset sink, callbacks get none
        batch_size = len(element[-1]) if element else cb_params.train_dataset.get_batch_size()
        images = (cb_params.cur_step_num - self._counted_to) * batch_size
        self._counted_to = cb_params.cur_step_num
        self.last = StepMeasurement(loss, correct, images, time.perf_counter() - self._step_start)
        self.epoch.add(self.last, batch_size)

    def epoch_seconds(self):
        return time.perf_counter() - self.epoch_start


class StopOnNonFiniteLoss(Callback):
    """Stops training at the first NaN or infinite loss, before that epoch is recorded, naming the step."""

    def __init__(self, meter):
        super().__init__()
        self.meter = meter

    def on_train_step_end(self, run_context):
        cb_params = run_context.original_args()
        loss = self.meter.last.loss
        if not math.isfinite(loss):
            raise Diverged(f"the loss became {loss} at step {cb_params.cur_step_num} (epoch "
                           f"{cb_params.cur_epoch_num}); the outputs of the finished epochs are kept. "
                           f"Lower --lr or add --warmup_epochs")


class Selection(NamedTuple):
    """Which epochs are best: `monitor` (a validation metric; the loss counts lower-is-better), and how many of the
    best epochs' checkpoints are kept; `flags`: the job's flags, of which the resume state keeps some."""
    monitor: str = "val_accuracy"
    keep: int = 1
    flags: object = None


def monitor_score(record, monitor):
    """An epoch's record scored by `monitor`, higher is better."""
    value = float(record.get(monitor, float("nan")))
    return -value if monitor == "val_loss" else value


def best_epoch(history):
    """The epoch of the best checkpoint: the last record marked best (None before any)."""
    marked = [record["epoch"] for record in history if record.get("best")]
    return marked[-1] if marked else None


def epochs_without_improvement(history, monitor, min_delta=0.0):
    """Epochs since `monitor` last improved by more than `min_delta` on its best so far (Keras' EarlyStopping
    rule), from the records alone, so a resumed run counts on where it stopped."""
    best, waited = -math.inf, 0
    for record in history:
        score = monitor_score(record, monitor)
        if score - min_delta > best:  # NaN never is
            best, waited = score, 0
        else:
            waited += 1
    return waited


class EpochRecorder(Callback):
    """After each epoch: the epoch's record in `history` and metrics.json, the last and best checkpoints (best by
    `selection.monitor`, and the `selection.keep` best epochs' own; `before_new_best` is called before the best
    is replaced), and the resume state (when given the train step)."""

    def __init__(self, meter, net, files, train_step=None, run_id="", resumed=run_state.ResumeState(),
                 selection=Selection(), before_new_best=lambda: None):
        super().__init__()
        self.meter, self.net, self.files, self.before_new_best = meter, net, files, before_new_best
        self.train_step, self.run_id, self.selection = train_step, run_id or "", selection
        self.history = list(resumed.history)
        scores = [monitor_score(r, selection.monitor) for r in self.history]
        self.best_score = max((x for x in scores if math.isfinite(x)), default=-math.inf)

    def on_train_epoch_end(self, run_context):
        cb_params = run_context.original_args()
        val, totals = cb_params.get("metrics") or {}, self.meter.epoch
        record = {"epoch": cb_params.cur_epoch_num, "train_loss": totals.loss, "train_accuracy": totals.accuracy,
                  "val_loss": float(val.get("loss", float("nan"))),
                  "val_accuracy": float(val.get("accuracy", float("nan")))}
        if "top5_accuracy" in val:
            record["val_top5_accuracy"] = float(val["top5_accuracy"])
        if "confusion" in val:
            record["val_macro_f1"] = macro_f1(val["confusion"])
        save_checkpoint(self.net, self.files.last_checkpoint)
        score = monitor_score(record, self.selection.monitor)
        record["best"] = score > self.best_score
        if record["best"]:
            self.best_score = score
            self.before_new_best()  # first: a kill in between leaves no export beside weights it is not of
            save_checkpoint(self.net, self.files.best_checkpoint)
        record["seconds"] = self.meter.epoch_seconds()
        record["images_per_second"] = totals.images_per_second
        self.history.append(record)
        self._keep_best_epochs(record["epoch"])
        write_json(self.files.metrics, self.history)
        if self.train_step is not None:
            run_state.save_resume(self.train_step, self.files.resume, record["epoch"], self.selection.flags,
                                  self.run_id)

    def _keep_best_epochs(self, epoch):
        """With `keep` > 1, this epoch's checkpoint when it is among the `keep` best so far (earlier epochs win
        ties). Every other epoch checkpoint in the folder is deleted: one that dropped out, or one an earlier run
        left (after --overwrite, or a resume with a smaller --keep_checkpoints)."""
        ranked = sorted(self.history, key=lambda r: (-_finite(monitor_score(r, self.selection.monitor)), r["epoch"]))
        kept = {r["epoch"] for r in ranked[:self.selection.keep]} if self.selection.keep > 1 else set()
        if epoch in kept:
            save_checkpoint(self.net, self.files.epoch_checkpoint(epoch))
        keep_names = {self.files.epoch_checkpoint(e).name for e in kept}
        for path in self.files.epoch_checkpoints():
            if path.name not in keep_names:
                path.unlink(missing_ok=True)


def _finite(score):
    return score if math.isfinite(score) else -math.inf


class EarlyStop(Callback):
    """Stops training after `patience` epochs without an improvement of `monitor` by more than `min_delta`: says so
    on the console, in metrics.json (`"stopped_early": true` on the last record) and in Aim (`stopped_early`)."""

    def __init__(self, recorder, monitor, patience, min_delta, tracker=None):
        super().__init__()
        self.recorder, self.monitor, self.patience, self.min_delta = recorder, monitor, patience, min_delta
        self.tracker = tracker

    def on_train_epoch_end(self, run_context):
        history = self.recorder.history
        waited = epochs_without_improvement(history, self.monitor, self.min_delta)
        if waited < self.patience:
            return
        record = history[-1]
        record["stopped_early"] = True
        write_json(self.recorder.files.metrics, history)
        print(f"early stop: {self.monitor} has not improved by more than {self.min_delta:g} for {waited} epochs; "
              f"stopping after epoch {record['epoch']} (best: epoch {best_epoch(history)})", flush=True)
        if self.tracker is not None:
            self.tracker.track_scores({"stopped_early": 1.0}, {}, record["epoch"])
        run_context.request_stop()


class ConsoleProgress(Callback):
    """A tqdm bar per epoch on a terminal, plain lines otherwise; one summary line per epoch."""

    def __init__(self, meter, recorder, epochs, steps_per_epoch, lines_per_epoch=4):
        super().__init__()
        self.meter, self.recorder = meter, recorder
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
        step, loss = (cb_params.cur_step_num - 1) % self.steps + 1, self.meter.last.loss
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        elif step % self.every == 0 and step < self.steps:  # the epoch line reports the last step
            print(f"epoch {cb_params.cur_epoch_num}/{self.epochs} step {step}/{self.steps} loss {loss:.4f}",
                  flush=True)

    def on_train_epoch_end(self, run_context):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        r = self.recorder.history[-1]
        print(f"epoch {r['epoch']}/{self.epochs}  train_loss {r['train_loss']:.4f}  "
              f"train_accuracy {r['train_accuracy']:.4f}  val_loss {r['val_loss']:.4f}  "
              f"val_accuracy {r['val_accuracy']:.4f}{' *' if r['best'] else ''}  {r['seconds']:.1f}s  "
              f"{r['images_per_second']:.1f} img/s", flush=True)


class EpochEndHook(Callback):
    """Calls `action()` at the end of every epoch (with `once`, of the first epoch this process trains)."""

    def __init__(self, action, once=False):
        super().__init__()
        self.action, self.once, self.done = action, once, False

    def on_train_epoch_end(self, run_context):
        if not (self.once and self.done):
            self.action()
            self.done = True


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


@contextlib.contextmanager
def signals_restored():
    """SIGINT's and SIGTERM's handlers are put back as they were after the block, however it ends: MindSpore does
    not call `on_train_end` when a callback raises, and a `StopOnSignal` left installed would swallow a stop signal
    during the clean-up (closing the Aim run, uploading outputs)."""
    saved = {s: signal.getsignal(s) for s in StopOnSignal.SIGNALS}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


class SyncBatchNormStatistics(Callback):
    """Data parallel: average BatchNorm's moving statistics over the workers at the end of every epoch, before
    validation, so every worker holds the same weights and reports the same validation numbers.

    Gradients are averaged every step, but each worker's moving statistics follow only its own shard of the data.
    """

    def __init__(self, nets, workers, steps_per_epoch):
        super().__init__()
        self.statistics = [p for net in nets for p in net.get_parameters()
                           if p.name.endswith(("moving_mean", "moving_variance"))]
        self.workers, self.steps_per_epoch = workers, steps_per_epoch

    def on_train_step_end(self, run_context):
        if run_context.original_args().cur_step_num % self.steps_per_epoch:
            return  # validation runs right after the epoch's last step, before on_train_epoch_end
        flat = np.concatenate([p.asnumpy().reshape(-1) for p in self.statistics])
        mean = runtime.sum_over_workers(flat) / np.float32(self.workers)
        offset = 0
        for param in self.statistics:
            size = int(np.prod(param.shape))
            param.set_data(ms.Tensor(mean[offset:offset + size].reshape(param.shape), param.dtype))
            offset += size


def create_callbacks(meter, recorder, tracker, net, workers, epochs, steps_per_epoch, after_epoch,
                     at_first_epoch_end=None, early_stop=None):
    """The job's callbacks in the order they depend on: workers' BatchNorm statistics averaged before validation;
    the meter before everything that reads the step; a bad loss stops before its epoch is recorded;
    `at_first_epoch_end()` (the files inference reads beside the checkpoints) just before the first record; the
    record before the console line, then `early_stop` (an EarlyStop, or None), then Aim; `after_epoch()` (the
    upload) once the epoch's files are written."""
    nets = [net, recorder.net] if recorder.net is not net else [net]  # with --ema, the average's too
    synced = [SyncBatchNormStatistics(nets, workers.size, steps_per_epoch)] if workers.size > 1 else []
    first = [EpochEndHook(at_first_epoch_end, once=True)] if at_first_epoch_end else []
    stop = [early_stop] if early_stop else []
    return synced + [meter, StopOnSignal(), StopOnNonFiniteLoss(meter)] + first + [
        recorder, ConsoleProgress(meter, recorder, epochs, steps_per_epoch)] + stop + [tracker,
                                                                                       EpochEndHook(after_epoch)]
