"""A run's output folder: the name of every file written there, where it is staged, and the resume state that lets
`--resume` continue the run after its last finished epoch. Training, inference and the tests take names from here."""
import json
import os
from pathlib import Path
from typing import NamedTuple

import staging
import storage
from errors import UserError

LABELS = "labels.json"  # class names and preprocessing, for inference
METRICS = "metrics.json"  # one record per finished epoch
RESUME = "resume.ckpt"  # weights, optimiser moments, schedule position, best accuracy and the Aim run
CURVES = "curves.png"
TRAIN_SAMPLES = "train_samples.png"
VAL_PREDICTIONS = "val_predictions.png"
EXAMPLES = "examples"  # one validation image per class, for the inference app
SPLIT = "split.json"  # which images of class folders were trained on and which validated on
TEST = "test.json"  # the held-out test/ split, evaluated once at the end with the best weights
AIM_FOLDER = ".aim"  # the Aim repo, when it lives in the output folder
AIM_SERIES = "aim-series"  # what Aim would have tracked, where aim cannot be imported (series.py)


def model_file(arch, which="best", suffix=".ckpt"):
    """`resnet50-best.ckpt`, `resnet50-last.ckpt`, `resnet50-best.mindir`."""
    return f"{arch}-{which}{suffix}"


class RunFiles:
    """The files of one run's (local) output folder, by what they hold."""

    def __init__(self, folder, arch):
        self.folder = Path(folder)
        self.labels, self.metrics, self.resume = (self.folder / name for name in (LABELS, METRICS, RESUME))
        self.curves, self.examples, self.split = self.folder / CURVES, self.folder / EXAMPLES, self.folder / SPLIT
        self.test = self.folder / TEST
        self.train_samples, self.val_predictions = self.folder / TRAIN_SAMPLES, self.folder / VAL_PREDICTIONS
        self.best_checkpoint = self.folder / model_file(arch, "best")
        self.last_checkpoint = self.folder / model_file(arch, "last")
        self.best_mindir = self.folder / model_file(arch, "best", ".mindir")
        self.best_onnx = self.folder / model_file(arch, "best", ".onnx")
        self.best_air = self.folder / model_file(arch, "best", ".air")
        self.arch = arch

    def epoch_checkpoint(self, epoch):
        """One of the best epochs' own checkpoints (--keep_checkpoints): `resnet50-epoch7.ckpt`."""
        return self.folder / model_file(self.arch, f"epoch{epoch}")

    def epoch_checkpoints(self):
        """Every epoch checkpoint in the folder."""
        return [p for p in self.folder.glob(model_file(self.arch, "epoch*")) if p.name[len(self.arch) + 6:-5].isdigit()]


class Outputs:
    """Where the job writes: its output folder and its Aim repo, local while it runs and copied to their remote
    locations by `push()`. Only the worker that `writes_outputs` has them; the others write into a scratch folder."""

    def __init__(self, args, workers):
        def mirror(url, what, deletes=True):
            return staging.OutputMirror(str(url), what, args.cache_dir, io_timeout=args.io_timeout, deletes=deletes)

        self.aim_mirror, self.aim_repo, self.scratch = None, None, not workers.writes_outputs
        if self.scratch:
            self.mirror = mirror(Path(args.cache_dir or staging.default_cache_dir()) / f"rank-{workers.rank}",
                                 "scratch folder")
        else:
            self.mirror = mirror(args.output_url, "output_url")
            if not args.aim_repo:  # the Aim repo lives in the output folder, and travels with it
                self.aim_repo = self.mirror.local
            elif storage.scheme_of(args.aim_repo) == "aim":  # an Aim tracking server: nothing to stage
                self.aim_repo = args.aim_repo
            else:
                self.aim_mirror = mirror(args.aim_repo, "aim_repo", deletes=False)  # may be other jobs' too
                self.aim_repo = self.aim_mirror.local
        self.files = RunFiles(self.mirror.local, args.arch)
        self.location = self.mirror.remote or self.mirror.local
        self._lock = _lock_folder(self.files.folder, self.location)
        self._exports_may_exist = True  # an earlier run's, here or at the remote location

    def previous_run(self):
        """The names of another run's outputs already in the output folder (locally, or at its remote location)."""
        files = self.files
        names = [path.name for path in (files.labels, files.metrics, files.resume, files.best_checkpoint,
                                        files.last_checkpoint, files.best_mindir, files.best_onnx,
                                        files.best_air)]
        found = [name for name in names if (files.folder / name).exists()]
        found += [path.name for path in files.epoch_checkpoints()]
        if self.mirror.remote is not None:
            found += [name for name in names if name not in found and self.mirror.remote_has(name)]
        return found

    def adopt_best(self, resumed):
        """A state resumed from another folder brings its best weights so far along: the export at the end needs
        them when no later epoch beats them."""
        import shutil
        source = resumed.source and resumed.source.parent / self.files.best_checkpoint.name
        if source and source.is_file() and source.parent.resolve() != self.files.folder.resolve() \
                and not self.files.best_checkpoint.exists():
            from export import atomic_write
            with atomic_write(self.files.best_checkpoint) as part:
                shutil.copyfile(source, part)

    def claim(self, args, resumed):
        """Before the first write: an output folder belongs to one run. One that holds another run's outputs is
        refused unless this run continues it (--resume) or replaces it (--overwrite)."""
        continues = args.resume == "auto" or (resumed.source is not None
                                              and resumed.source.parent == self.files.folder)
        found = [] if self.scratch or continues or args.overwrite else self.previous_run()
        if found:
            raise UserError(f"{storage.redact(self.location)} holds another run's outputs ({', '.join(found)}): "
                            f"continue that run with --resume auto, replace it with --overwrite, or choose another "
                            f"--output_url")

    def discard_exports(self):
        """Before new best weights are saved: the exported models (MindIR, ONNX, AIR) are of the weights they
        replace, or of a run that --overwrite replaces, so they go, here and at the remote location at the next
        push; finish() exports the best weights again. Once is enough until then."""
        if self._exports_may_exist:
            files = self.files
            self.mirror.discard(*(path.name for path in (files.best_mindir, files.best_onnx, files.best_air)))
            self._exports_may_exist = False

    def push(self):
        """Copy what is new or changed to the remote locations (after every epoch, at the end, after a failure)."""
        for mirror in filter(None, (self.mirror, self.aim_mirror)):
            copied = mirror.push()
            if copied:
                print(f"synced {copied} file(s) to {storage.redact(mirror.remote)}", flush=True)

    def saved_split(self):
        """The split.json of the run that --resume auto continues (fetched first on a fresh disk), or None."""
        self.mirror.pull(SPLIT)
        return self.files.split if self.files.split.is_file() else None

    def pull_for_resume(self):
        """A restarted cloud job has a fresh disk: fetch the resume state, the records, the best weights so far
        (the final export needs them) and the Aim repo (or the series kept without Aim), so that the run continues
        in it."""
        names = [self.files.resume.name, self.files.metrics.name, self.files.best_checkpoint.name, AIM_SERIES]
        if self.aim_repo == self.mirror.local:
            names.append(AIM_FOLDER)
        self.mirror.pull(*names)
        self.mirror.pull_matching(model_file(self.files.arch, "epoch*"))  # the K best so far, pruned from here on
        if self.aim_mirror is not None:
            self.aim_mirror.pull()


def _lock_folder(folder, shown_as):
    """Hold an exclusive lock on the folder while the job runs: a second run into it at once is refused rather than
    mixing its files with ours. (flock on the folder itself leaves no file behind; it is released at exit.)"""
    try:
        import fcntl
    except ImportError:  # Windows: no flock
        return None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UserError(f"{storage.redact(shown_as)} is in use by another run of this job; wait for it to end or "
                        f"choose another --output_url") from None
    return fd


class ResumeState(NamedTuple):
    """Where a resumed run continues: epochs done, the Aim run, finished epochs' records (which epoch was best, and
    whether the run stopped early, are read from them), and the resume state's file (None for a fresh start)."""
    epochs_done: int = 0
    aim_run: str = None
    history: list = []
    source: Path = None

    flags: dict = {}  # KEPT_FLAGS as the run was started


# Flags a run must keep when it resumes: what chose its best epochs, how its schedule counts, what it averages.
KEPT_FLAGS = ("monitor", "accumulate", "ema")


def save_resume(train_step, path, epoch, args, aim_run):
    """The train step's parameters (weights, optimiser moments, global step, loss scale, weight average, gradient
    sums) and where the run is: its epoch, the flags it must keep, its Aim run."""
    from export import save_checkpoint
    kept = {f"flag_{name}": getattr(args, name) for name in KEPT_FLAGS if hasattr(args, name)}
    padding = network_padding(train_step)
    save_checkpoint(train_step, path, {"epoch": epoch, "aim_run": aim_run or "", **kept,
                                       **({"resnet_padding": padding} if padding else {})})


def network_padding(train_step):
    """The padding of the ResNet a train step trains (set by its pretrained weights), or None (a head alone)."""
    from resnet import ResNet
    return next((cell.padding for _, cell in train_step.cells_and_names() if isinstance(cell, ResNet)), None)


def load_resume(args, outputs, train_step, workers=None):
    """With `--resume` ('auto' or the path of a resume.ckpt), load the saved state into `train_step` and return
    where the run continues; a fresh start without it, or when 'auto' finds nothing to resume.

    With several workers only rank 0 reads the state (from the output folder, which only it has, fetched once from
    a bucket); every other worker receives it from rank 0 through the collective, on whatever node it runs, so all
    continue from the same epoch with the same weights."""
    if not args.resume:
        return ResumeState()
    if workers is None or workers.size == 1:
        return _load_resume(args, outputs, train_step)
    from runtime import share_from_rank0, share_parameters_from_rank0
    loaded = []  # rank 0's state; every worker gets what it says and, when it continues a run, its parameters

    def on_rank_0():
        loaded.append(_load_resume(args, outputs, train_step))
        return {"epochs_done": loaded[0].epochs_done, "history": loaded[0].history, "flags": loaded[0].flags}
    shared = share_from_rank0(workers, on_rank_0)
    if shared["epochs_done"]:
        share_parameters_from_rank0(workers, [param for _, param in train_step.parameters_and_names()])
        if workers.rank:
            print(f"resume: continuing after epoch {shared['epochs_done']} with rank 0's state")
    return loaded[0] if loaded else ResumeState(shared["epochs_done"], None, shared["history"], None,
                                                shared["flags"])


def _load_resume(args, outputs, train_step):
    if args.resume == "auto":
        outputs.pull_for_resume()
        path = outputs.files.resume
        if not path.is_file():
            print("resume: nothing to resume in the output folder; starting fresh")
            return ResumeState()
    else:
        path = staging.stage_in(args.resume, "resume", args.cache_dir, io_timeout=args.io_timeout)
    state = _read_resume(path, train_step, args)
    state = state._replace(history=_read_history(path.parent / METRICS, state.epochs_done), source=Path(path))
    best = [r for r in state.history if r.get("best")]
    print(f"resume: continuing after epoch {state.epochs_done} of {args.epochs} from {path}"
          + (f" (best val_accuracy {best[-1]['val_accuracy']:.4f} at epoch {best[-1]['epoch']})" if best else ""))
    return state


def _read_history(path, epochs_done):
    """The records of the finished epochs, from the metrics.json beside the resume state."""
    if not path.is_file():
        return []
    try:
        return [r for r in json.loads(path.read_text()) if int(r["epoch"]) <= epochs_done]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is damaged ({exc}); delete it to resume without the finished epochs' records")\
            from None


def _flag_value(saved):
    """A flag's value as the checkpoint gives it back: a string, or a one-number Parameter (float32)."""
    if isinstance(saved, str):
        return saved
    value = saved.asnumpy().item() if hasattr(saved, "asnumpy") else saved
    return int(value) if float(value).is_integer() else float(f"{value:.6g}")


def _same_flag(saved, given):
    if isinstance(saved, str) or isinstance(given, str):
        return str(saved) == str(given)
    import numpy as np
    return np.float32(saved) == np.float32(given)


def _read_resume(path, train_step, args):
    import mindspore as ms
    from checkpoints import read_checkpoint
    state = read_checkpoint(path)
    if "epoch" not in state:
        raise UserError(f"{path} is not a resume state written by this job (no epoch recorded)")
    done, run_hash = int(state.pop("epoch")), str(state.pop("aim_run"))
    state.pop("best_accuracy", None)  # written by earlier versions
    state.pop("monitor", None)
    flags = {name: _flag_value(state.pop(f"flag_{name}")) for name in KEPT_FLAGS if f"flag_{name}" in state}
    saved_padding, padding = state.pop("resnet_padding", None), network_padding(train_step)
    if saved_padding is not None and padding is not None and str(saved_padding) != padding:
        raise UserError(f"{path} is of a network padded '{saved_padding}' (as the weights it started from were "
                        f"trained), this job's is padded '{padding}': resume it with the same --pretrain_url")
    for name, value in flags.items():  # before the parameters: a changed flag explains missing ones best
        if not _same_flag(value, getattr(args, name)):
            raise UserError(f"{path} is of a run with --{name} {value} (its best epoch, schedule and state depend "
                            f"on it): resume it with --{name} {value}")
    # The schedule itself comes from this run's flags (--epochs may have grown); its position is global_step.
    state = {name: value for name, value in state.items() if not name.startswith("learning_rate")}
    try:
        not_loaded, _ = ms.load_param_into_net(train_step, state)
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"{path} does not fit this job ({str(exc).splitlines()[0][:200]})") from None
    # The loss scale restarts when a run moves between devices with and without mixed precision
    not_loaded = [name for name in not_loaded if not name.startswith(("learning_rate", "loss_scale"))]
    if not_loaded:
        raise UserError(f"{path} does not fit this job's network and optimizer: {len(not_loaded)} parameters "
                        f"missing, e.g. {not_loaded[0]} (same --arch, --freeze, --trainable, --optimizer, --ema and "
                        f"--accumulate?)")
    return ResumeState(done, run_hash or None, flags=flags)
