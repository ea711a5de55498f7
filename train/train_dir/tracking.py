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
  validation set; `macro_f1` and `class_accuracy` with {"subset": "val", "class": NAME} when the fit's metrics include a
  `confusion` matrix, which is also logged as the image `confusion_matrix`;
- `val_predictions`: captioned validation images ("true: a / predicted: b"), once per epoch, when given a preview
  and the fit's metrics include `first_predictions` (`train_step.FirstPredictions`, as `create_trainer` adds).

In a data-parallel job only rank 0 opens a run; on the other ranks the callback does nothing.

A full, read-only or vanished disk under the Aim repo ends the job with one `errors.OutputError`, never a hang: Aim's
databases are flushed when the callback closes, within a deadline, rather than at exit, where RocksDB waits for free
space for ever (and Ctrl-C cannot stop it).
"""
import contextlib
import errno
import functools
import os
import shutil
import signal
import sys
import threading
import weakref

import numpy as np
from mindspore.train import Callback

import series
from train_step import class_accuracy, macro_f1
from errors import (WRITE_FAULTS, Interrupted, OutputError, UserError, child_stderr_held, folder_fault,
                    write_fault)

TRAIN = {"subset": "train"}
VAL = {"subset": "val"}
CLOSE_TIMEOUT = 60.0  # seconds for Aim to flush its databases when the run closes
_quieted = lambda: None  # noqa: E731  the callback whose disk faults Aim's threads may report (a weak reference)


def current_lr(optimizer, step):
    """The learning rate used at 0-based global `step` (the optimiser's own count of updates, when it keeps one:
    with --accumulate an update comes every N steps), for a fixed or per-step list learning rate."""
    updates = getattr(optimizer, "global_step", None)
    if hasattr(updates, "asnumpy"):
        step = max(int(np.asarray(updates.asnumpy()).reshape(-1)[0]) - 1, 0)
    lr = getattr(optimizer, "learning_rate", None)
    lr = getattr(lr, "learning_rate", lr)  # a per-step list is wrapped in a schedule cell holding the Parameter
    if not hasattr(lr, "asnumpy"):
        return None  # no optimizer, or a computed LearningRateSchedule: nothing cheap to read
    values = np.asarray(lr.asnumpy()).reshape(-1)
    return float(values[min(step, len(values) - 1)])


def aim_available():
    """Whether `aim` can be imported here (aim 3.x has no aarch64 build: the Ascend images have none)."""
    try:
        import aim  # noqa: F401
        return True
    except ImportError:
        return False


def process_rank():
    """This process's rank in a data-parallel job (0 when communication is not initialised)."""
    try:
        from mindspore.communication import get_rank
        return get_rank()
    except (ImportError, RuntimeError, ValueError):
        return 0


def _abandon_aim():
    """Aim flushes a database when its object is freed, and all of them at exit, waiting for the flush without end
    (and for ever if a clean-up fails); after a disk fault that is what happens, so Aim's clean-ups are dropped.
    What was tracked stays in RocksDB's write-ahead logs. Best effort: `AutoClean` is Aim's private machinery."""
    import atexit
    try:
        from aim.ext.cleanup import AutoClean
        finalizers = list(AutoClean._finalizers.values())
    except (ImportError, AttributeError):  # another aim version: exit may wait on the disk, as Aim itself would
        return
    for _, finalizer in finalizers:
        finalizer.detach()
    atexit.unregister(AutoClean.cleanup)


def _close_run(run):
    """Close the run, then flush and close its repo's writable databases (what Aim would do at exit)."""
    repo = run.repo
    run.close()
    for container in list(getattr(repo, "container_pool", {}).values()):
        if not getattr(container, "read_only", True):
            container.close()


def _finish_within(work, timeout):
    """`work()` in a thread, waited for at most `timeout` seconds: True if it finished (re-raising what it raised).
    A stop signal ends the wait at once, as `Interrupted`."""
    outcome = []

    def target():
        try:
            outcome.append(work())
        except BaseException as exc:  # handed to the waiting thread
            outcome.append(exc)

    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, Interrupted.raise_for) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    thread = threading.Thread(target=target, name="aim-close", daemon=True)
    try:
        thread.start()
        thread.join(timeout)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
    if outcome and isinstance(outcome[0], BaseException):
        raise outcome[0]
    return bool(outcome)


def recreate_interrupted_repo(folder):
    """A job killed while Aim created its repo leaves `.aim` without the VERSION file Aim writes last, and Aim then
    refuses it for good as a repo too old to open (a bare RuntimeError). Holding no run yet, it is created again; a
    `.aim` with runs but no VERSION is an Aim 2 repo, which this job cannot write into."""
    repo = os.path.join(folder, ".aim")
    if not os.path.isdir(repo) or os.path.exists(os.path.join(repo, "VERSION")):
        return
    chunks = os.path.join(repo, "meta", "chunks")
    if os.path.isdir(chunks) and os.listdir(chunks):
        raise UserError(f"the Aim repo in {folder} has runs but no VERSION file (an Aim 2 repo?): upgrade it with "
                        f"`aim storage upgrade 2to3 --repo {folder}`, or give --aim_repo another folder")
    shutil.rmtree(repo)
    print(f"warning: the Aim repo in {folder} was left half-created by a job stopped while creating it (it holds no "
          f"run): created again", file=sys.stderr)


def _identity(path):
    with contextlib.suppress(OSError):
        info = os.stat(path)
        return info.st_dev, info.st_ino
    return None


class AimCallback(Callback):
    """Logs hyperparameters, per-step and per-epoch metrics, and pictures to one Aim run, and closes it at the end.

    `repo` is a folder (its `.aim` is created when missing) or an `aim://host:port` tracking server.
    `preview` is (HWC uint8 images, network inputs, labels) of the first validation images: with a validation
    metric "first_predictions" (train_step.FirstPredictions), each epoch logs them captioned with their true and
    predicted class. `run_hash` continues an
    existing run (a resumed job), whose fit starts counting steps after `step_offset`. `meter` is the
    `callbacks.StepMeter` placed before this callback, whose measurements are logged. Closing waits at most
    `close_timeout` seconds for Aim to finish writing. Where aim cannot be imported, the run's series are kept in
    `series_folder` instead (`series.py`), when one is given.
    """

    def __init__(self, repo, experiment, hparams, meter, log_every=1, system_tracking=True, class_names=None,
                 preview=None, close_at_end=True, run_hash=None, step_offset=0,
                 close_timeout=CLOSE_TIMEOUT, series_folder=None):
        super().__init__()
        self.run, self.meter = None, meter
        self.location = str(repo)
        self.folder = None if self.location.startswith("aim://") else self.location  # a local repo's disk can fail
        self.step_offset = step_offset  # a resumed fit counts its steps from 0 again
        self.close_timeout = close_timeout
        self._repo_id = None  # (.aim folder, its inode): a deleted one may be re-created by Aim's own threads
        self.image_type = None
        if process_rank() == 0:
            Run, self.image_type = self._tracker(series_folder)
            if self.folder:
                self._quiet_thread_faults()
                if not self.tracks_series:
                    recreate_interrupted_repo(self.folder)
            with self._writing(), child_stderr_held():
                self.run = Run(run_hash or None, repo=str(repo), experiment=experiment,
                               system_tracking_interval=10 if system_tracking else None)
                if self.run.repo is not None:
                    self._repo_id = self.run.repo.path, _identity(self.run.repo.path)
                if hparams is not None:  # None: a run continued by another job keeps its own
                    self.run["hparams"] = hparams
        self.log_every = max(1, int(log_every))
        self.class_names = list(class_names) if class_names else None
        self.preview = preview
        self.close_at_end = close_at_end
        self.last_predictions = None

    def _tracker(self, series_folder):
        """(run class, image class): Aim's, or where aim cannot be imported and `series_folder` is given, the
        portable series kept there (`series.py`), written to that folder's disk."""
        if aim_available() or series_folder is None:
            from aim import Image, Run
            return Run, Image
        self.folder = self.location = str(series_folder)
        return functools.partial(series.SeriesRun, series_folder), series.Image

    @property
    def tracks_series(self):
        return self.image_type is series.Image

    @property
    def hash(self):
        return self.run.hash if self.run is not None else None

    def _fault(self, exc):
        """The OutputError for `exc` when a full, read-only or vanished disk under the repo caused it, else None."""
        what = "the run's series" if self.tracks_series else "the Aim repo"
        fault = write_fault(exc, self.folder, what) if self.folder else None
        if fault is None and self._repo_id and _identity(self._repo_id[0]) != self._repo_id[1]:
            fault = OutputError(f"cannot write {what} in {self.folder}: {WRITE_FAULTS[errno.ENOENT]}")
        return fault

    @contextlib.contextmanager
    def _writing(self):
        """A write into the Aim repo that fails ends the job, as one OutputError when a disk fault caused it; the
        run is abandoned, as closing it would wait on the same disk (or hang at exit on a failed clean-up)."""
        try:
            yield
        except Exception as exc:
            fault = self._fault(exc)
            if fault is None and self.run is None:
                raise  # the run could not be opened, e.g. a resumed run that is not in the repo
            self.run = None
            _abandon_aim()
            if fault is None:
                raise
            raise fault from None

    def _quiet_thread_faults(self):
        """Aim's background threads (system metrics, terminal log capture, status check-ins) die with a traceback
        when the disk fails under them; the job reports that fault itself, at its next write or at the close."""
        global _quieted
        _quieted = weakref.ref(self)  # the newest callback; the hook outlives it, so no strong reference
        if getattr(threading.excepthook, "quiets_aim", False):
            return
        previous = threading.excepthook

        def hook(args):
            tb, in_aim = args.exc_traceback, False
            while tb is not None and not in_aim:
                in_aim, tb = tb.tb_frame.f_globals.get("__name__", "").startswith("aim."), tb.tb_next
            callback = _quieted()
            try:
                said = in_aim and isinstance(args.exc_value, Exception) and callback is not None \
                    and callback._fault(args.exc_value)
            except Exception:  # the disk changed under the check: let the thread's own report through
                said = False
            if not said:
                previous(args)
        hook.quiets_aim = True
        threading.excepthook = hook

    def _track(self, value, **kwargs):
        with self._writing():
            self.run.track(value, **kwargs)

    def _name(self, label):
        return self.class_names[label] if self.class_names and 0 <= label < len(self.class_names) else str(label)

    def track_image(self, name, image, step=0, caption="", context=None):
        """An image (PIL, HWC uint8 array, or a path to a PNG) under `name`."""
        if self.run is None:
            return
        from PIL import Image as PILImage
        if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
            image = PILImage.open(image).convert("RGB")
        self._track(self.image_type(image, caption=caption), name=name, step=step, context=context or {})

    def track_scores(self, scores, context, step):
        """Summary numbers (e.g. the test split's accuracy, loss, macro_f1) under `context`, at `step`."""
        if self.run is None:
            return
        for name, value in scores.items():
            self._track(float(value), name=name, step=step, epoch=step, context=context)

    def on_train_step_end(self, run_context):
        if self.run is None:
            return
        cb_params = run_context.original_args()
        step, epoch = cb_params.cur_step_num + self.step_offset, cb_params.cur_epoch_num
        if step % self.log_every:
            return
        measured = self.meter.last
        self._track(measured.loss, name="loss", step=step, epoch=epoch, context=TRAIN)
        optimizer = cb_params.get("optimizer") or getattr(cb_params.get("train_network"), "optimizer", None)
        lr = current_lr(optimizer, step - 1)  # a Model built from a train step cell knows no optimizer itself
        if lr is not None:
            self._track(lr, name="lr", step=step, epoch=epoch, context=TRAIN)
        if measured.seconds > 0:
            self._track(measured.images / measured.seconds, name="images_per_second", step=step, epoch=epoch,
                        context=TRAIN)

    def on_train_epoch_end(self, run_context):
        if self.run is None:
            return
        cb_params = run_context.original_args()
        epoch, totals = cb_params.cur_epoch_num, self.meter.epoch
        if totals.losses:
            self._track(totals.loss, name="epoch_loss", step=epoch, epoch=epoch, context=TRAIN)
        if totals.counted:
            self._track(totals.accuracy, name="accuracy", step=epoch, epoch=epoch, context=TRAIN)
        self._track(self.meter.epoch_seconds(), name="epoch_seconds", step=epoch, epoch=epoch, context=TRAIN)
        metrics = cb_params.get("metrics") or {}
        for name in ("loss", "accuracy", "top5_accuracy"):
            if name in metrics:
                self._track(float(metrics[name]), name=name, step=epoch, epoch=epoch, context=VAL)
        if "confusion" in metrics:
            self._track_confusion(metrics["confusion"], epoch)
        if self.preview is not None and "first_predictions" in metrics:
            self._track_predictions(epoch, metrics["first_predictions"])

    def _track_confusion(self, confusion, epoch):
        import tempfile
        from export import plot_confusion
        self._track(macro_f1(confusion), name="macro_f1", step=epoch, epoch=epoch, context=VAL)
        for label, accuracy in enumerate(class_accuracy(confusion)):
            if np.isfinite(accuracy):
                self._track(float(accuracy), name="class_accuracy", step=epoch, epoch=epoch,
                            context={**VAL, "class": self._name(label)})
        names = [self._name(i) for i in range(len(confusion))]
        with tempfile.TemporaryDirectory() as folder:
            path = plot_confusion(confusion, names, f"{folder}/confusion.png")
            self.track_image("confusion_matrix", path, step=epoch, caption=f"epoch {epoch}", context=VAL)

    def _track_predictions(self, epoch, predicted):
        images, _, labels = self.preview
        captioned = [self.image_type(image, caption=f"true: {self._name(int(t))} / predicted: {self._name(int(p))}")
                     for image, t, p in zip(images, labels, predicted)]
        self._track(captioned, name="val_predictions", step=epoch, epoch=epoch, context=VAL)
        self.last_predictions = predicted

    def on_train_end(self, run_context):
        if self.close_at_end:
            self.close()

    def close(self, timeout=None, failing=False):
        """Idempotent; also called when training fails (`failing`), so no run is left open or locked. Waits at most
        `timeout` seconds (default: `close_timeout`) for Aim to finish writing; past that the run is abandoned, with
        a warning, or on a disk fault with OutputError, unless `failing`: that failure is the one to report. A stop
        signal ends the wait (`Interrupted`)."""
        run, self.run = self.run, None
        if run is None:
            return
        timeout = self.close_timeout if timeout is None else timeout
        if failing and self.folder and folder_fault(self.folder):
            return _abandon_aim()  # full, read-only or gone: closing could only wait
        try:
            if _finish_within(lambda: _close_run(run), timeout):
                return
            code = folder_fault(self.folder) if self.folder else None
            if code is None:  # slow but healthy (an index lock, a tracking server's queue): not worth a failed job
                _abandon_aim()
                print(f"warning: Aim had not finished writing the run to {self.location} after {timeout:g} s; "
                      f"left as it is, its last values may be missing", file=sys.stderr, flush=True)
                return
            error = OutputError(f"Aim did not finish writing its repo in {self.location} within {timeout:g} s: "
                                f"{WRITE_FAULTS[code]}")
        except Interrupted:
            _abandon_aim()
            raise
        except Exception as exc:
            error = self._fault(exc)
            if error is None and not failing:
                _abandon_aim()
                raise
        _abandon_aim()
        if not failing:
            raise error
