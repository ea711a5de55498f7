"""Experiment tracking with Aim: a MindSpore callback that works with any `Model.train` / `Model.fit`.

    from callbacks import StepMeter
    from tracking import AimCallback
    meter = StepMeter()                                   # reads each step once; Aim logs what it measured
    aim_cb = AimCallback("runs", experiment="my-exp", hparams={"lr": 0.01}, meter=meter)
    model.fit(10, train_ds, valid_dataset=val_ds, callbacks=[meter, aim_cb])   # closes the run when training ends

Metric names and contexts:
- `loss`, `lr` and `images_per_second` with {"subset": "train"}, every `log_every` steps (step = global step, from 1);
- `epoch_loss`, `accuracy` and `epoch_seconds` with {"subset": "train"}, once per epoch (step = epoch); the train
  accuracy is the running one over the epoch's steps, when the train step reports right predictions
  (`train_step.TrainStep` does);
- `loss`, `accuracy` and (5 classes or more) `top5_accuracy` with {"subset": "val"}, once per epoch, with a
  validation set; `class_accuracy` with {"subset": "val", "class": NAME} when the fit's metrics include a
  `confusion` matrix, which is also logged as the image `confusion_matrix`;
- `val_predictions`: captioned validation images ("true: a / predicted: b"), once per epoch, when given a preview.

In a data-parallel job only rank 0 opens a run; on the other ranks the callback does nothing.
"""
import numpy as np
from mindspore.train import Callback

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


def process_rank():
    """This process's rank in a data-parallel job (0 when communication is not initialised)."""
    try:
        from mindspore.communication import get_rank
        return get_rank()
    except (ImportError, RuntimeError, ValueError):
        return 0


def class_accuracy(confusion):
    """Per-class recall from a confusion matrix (rows: true class); NaN for a class with no images."""
    confusion = np.asarray(confusion, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.diag(confusion) / confusion.sum(axis=1)


class AimCallback(Callback):
    """Logs hyperparameters, per-step and per-epoch metrics, and pictures to one Aim run, and closes it at the end.

    `repo` is a folder (its `.aim` is created when missing) or an `aim://host:port` tracking server.
    `preview` is (HWC uint8 images, network inputs, labels) and `predict` maps network inputs to logits: with both,
    each epoch logs the preview images captioned with their true and predicted class. `run_hash` continues an
    existing run (a resumed job), whose fit starts counting steps after `step_offset`. `meter` is the
    `callbacks.StepMeter` placed before this callback, whose measurements are logged.
    """

    def __init__(self, repo, experiment, hparams, meter, log_every=1, system_tracking=True, class_names=None,
                 preview=None, predict=None, close_at_end=True, run_hash=None, step_offset=0):
        super().__init__()
        self.run, self.meter = None, meter
        self.step_offset = step_offset  # a resumed fit counts its steps from 0 again
        if process_rank() == 0:
            from aim import Run
            self.run = Run(run_hash or None, repo=str(repo), experiment=experiment,
                           system_tracking_interval=10 if system_tracking else None)
            self.run["hparams"] = hparams
        self.log_every = max(1, int(log_every))
        self.class_names = list(class_names) if class_names else None
        self.preview, self.predict = preview, predict
        self.close_at_end = close_at_end
        self.last_predictions = None

    @property
    def hash(self):
        return self.run.hash if self.run is not None else None

    def _name(self, label):
        return self.class_names[label] if self.class_names and 0 <= label < len(self.class_names) else str(label)

    def track_image(self, name, image, step=0, caption="", context=None):
        """An image (PIL, HWC uint8 array, or a path to a PNG) under `name`."""
        if self.run is None:
            return
        from aim import Image
        from PIL import Image as PILImage
        if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
            image = PILImage.open(image).convert("RGB")
        self.run.track(Image(image, caption=caption), name=name, step=step, context=context or {})

    def on_train_step_end(self, run_context):
        if self.run is None:
            return
        cb_params = run_context.original_args()
        step, epoch = cb_params.cur_step_num + self.step_offset, cb_params.cur_epoch_num
        if step % self.log_every:
            return
        measured = self.meter.last
        self.run.track(measured.loss, name="loss", step=step, epoch=epoch, context=TRAIN)
        optimizer = cb_params.get("optimizer") or getattr(cb_params.get("train_network"), "optimizer", None)
        lr = current_lr(optimizer, step - 1)  # a Model built from a train step cell knows no optimizer itself
        if lr is not None:
            self.run.track(lr, name="lr", step=step, epoch=epoch, context=TRAIN)
        if measured.seconds > 0:
            self.run.track(measured.images / measured.seconds, name="images_per_second", step=step, epoch=epoch,
                           context=TRAIN)

    def on_train_epoch_end(self, run_context):
        if self.run is None:
            return
        cb_params = run_context.original_args()
        epoch, totals = cb_params.cur_epoch_num, self.meter.epoch
        if totals.losses:
            self.run.track(totals.loss, name="epoch_loss", step=epoch, epoch=epoch, context=TRAIN)
        if totals.counted:
            self.run.track(totals.accuracy, name="accuracy", step=epoch, epoch=epoch, context=TRAIN)
        self.run.track(self.meter.epoch_seconds(), name="epoch_seconds", step=epoch, epoch=epoch, context=TRAIN)
        metrics = cb_params.get("metrics") or {}
        for name in ("loss", "accuracy", "top5_accuracy"):
            if name in metrics:
                self.run.track(float(metrics[name]), name=name, step=epoch, epoch=epoch, context=VAL)
        if "confusion" in metrics:
            self._track_confusion(metrics["confusion"], epoch)
        if self.preview is not None and self.predict is not None:
            self._track_predictions(epoch)

    def _track_confusion(self, confusion, epoch):
        import tempfile
        from export import plot_confusion
        for label, accuracy in enumerate(class_accuracy(confusion)):
            if np.isfinite(accuracy):
                self.run.track(float(accuracy), name="class_accuracy", step=epoch, epoch=epoch,
                               context={**VAL, "class": self._name(label)})
        names = [self._name(i) for i in range(len(confusion))]
        with tempfile.TemporaryDirectory() as folder:
            path = plot_confusion(confusion, names, f"{folder}/confusion.png")
            self.track_image("confusion_matrix", path, step=epoch, caption=f"epoch {epoch}", context=VAL)

    def _track_predictions(self, epoch):
        from aim import Image
        images, inputs, labels = self.preview
        predicted = np.asarray(self.predict(inputs)).argmax(axis=1)
        captioned = [Image(image, caption=f"true: {self._name(int(t))} / predicted: {self._name(int(p))}")
                     for image, t, p in zip(images, labels, predicted)]
        self.run.track(captioned, name="val_predictions", step=epoch, epoch=epoch, context=VAL)
        self.last_predictions = predicted

    def on_train_end(self, run_context):
        if self.close_at_end:
            self.close()

    def close(self):
        """Idempotent; also called when training fails, so no run is left open or locked."""
        if self.run is not None:
            self.run.close()
            self.run = None
