"""Experiment tracking with Aim: a MindSpore callback that works with any `Model.train` / `Model.fit`.

Metric names and contexts (what the Xihe Aim sample and our tests use):
- `loss` and `lr` with {"subset": "train"}, every `log_every` training steps (step = global step, from 1);
- `epoch_loss` with {"subset": "train"}, the epoch's mean step loss, once per epoch (step = epoch);
- `loss` and `accuracy` with {"subset": "val"}, once per epoch, when the fit has a validation set.
"""
import numpy as np
from mindspore.train import Callback

from fit import step_loss

TRAIN = {"subset": "train"}
VAL = {"subset": "val"}


def current_lr(optimizer, step):
    """The learning rate used at 0-based global `step`, for a fixed or per-step list learning rate."""
    lr = getattr(optimizer, "learning_rate", None)
    lr = getattr(lr, "learning_rate", lr)  # a per-step list is wrapped in a schedule cell holding the Parameter
    if not hasattr(lr, "asnumpy"):
        return None  # no optimizer, or a computed LearningRateSchedule: nothing cheap to read
    values = np.asarray(lr.asnumpy()).reshape(-1)
    return float(values[min(step, len(values) - 1)])


class AimCallback(Callback):
    """Logs hyperparameters, per-step and per-epoch metrics to one Aim run, and closes it at the end.

    `repo` is a folder (its `.aim` is created when missing) or an `aim://host:port` tracking server.
    """

    def __init__(self, repo, experiment, hparams, log_every=1, system_tracking=True):
        super().__init__()
        from aim import Run
        self.run = Run(repo=str(repo), experiment=experiment,
                       system_tracking_interval=10 if system_tracking else None)
        self.run["hparams"] = hparams
        self.log_every = max(1, int(log_every))
        self._epoch_losses = []

    @property
    def hash(self):
        return self.run.hash

    def on_train_epoch_begin(self, run_context):
        self._epoch_losses = []

    def on_train_step_end(self, run_context):
        cb_params = run_context.original_args()
        loss = step_loss(cb_params)
        self._epoch_losses.append(loss)
        step, epoch = cb_params.cur_step_num, cb_params.cur_epoch_num
        if step % self.log_every:
            return
        self.run.track(loss, name="loss", step=step, epoch=epoch, context=TRAIN)
        lr = current_lr(cb_params.get("optimizer"), step - 1)
        if lr is not None:
            self.run.track(lr, name="lr", step=step, epoch=epoch, context=TRAIN)

    def on_train_epoch_end(self, run_context):
        cb_params = run_context.original_args()
        epoch = cb_params.cur_epoch_num
        if self._epoch_losses:
            self.run.track(float(np.mean(self._epoch_losses)), name="epoch_loss", step=epoch, epoch=epoch,
                           context=TRAIN)
        for name, value in (cb_params.get("metrics") or {}).items():
            if name in ("loss", "accuracy"):
                self.run.track(float(value), name=name, step=epoch, epoch=epoch, context=VAL)

    def on_train_end(self, run_context):
        self.close()

    def close(self):
        """Idempotent; also called when training fails, so no run is left open or locked."""
        if self.run is not None:
            self.run.close()
            self.run = None
