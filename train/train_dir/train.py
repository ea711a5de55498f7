"""Train a ResNet image classifier with MindSpore: locally, or as the boot file of a Xihe/ModelArts training job.

    python train.py --data_url DATA --output_url OUT --epochs 10 [--pretrain_url resnet50.ckpt]

The job, top to bottom: parse flags -> pick the device -> stage inputs -> find the data -> build the network
(optionally from pretrained weights) -> fit with validation every epoch -> export -> report.
"""
import os
import sys
from typing import NamedTuple

os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only, so the job's own lines stay readable
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling modules, from any working directory

import onednn_conv  # noqa: E402

onednn_conv.quiet_openmp()  # before MindSpore loads OpenMP

import numpy as np  # noqa: E402

import callbacks  # noqa: E402
import datasets  # noqa: E402
import export  # noqa: E402
import features  # noqa: E402
import run_state  # noqa: E402
import runtime  # noqa: E402
import series  # noqa: E402
import staging  # noqa: E402
import storage  # noqa: E402
import tracking  # noqa: E402
import train_step  # noqa: E402
import trained_model  # noqa: E402
from args import parse_args  # noqa: E402
from checkpoints import load_pretrained, read_pretrained  # noqa: E402
from errors import UserError, one_line, run_main  # noqa: E402
from resnet import create_model, use_onednn_convolutions  # noqa: E402
from tracking import AimCallback  # noqa: E402

URL_ARGS = ("data_url", "pretrain_url", "output_url", "aim_repo", "resume", "split")
PREVIEW_IMAGES = 16  # validation images shown in Aim each epoch, and in the picture files
MAX_SCHEDULE_STEPS = 10_000_000  # per-step learning rates, 40 MB of float32


class Training(NamedTuple):
    """What the optimiser steps, the pipelines it trains and validates on, and the preview of the first validation
    images (HWC images, network inputs, labels)."""
    cell: object
    train_data: object
    val_data: object
    preview: tuple


def stage_inputs(args, workers):
    """Local paths of the data and the pretrained weights (fetched once per machine when remote)."""
    data_dir = staging.stage_in(args.data_url, "data_url", args.cache_dir, workers.leader, io_timeout=args.io_timeout)
    pretrained = staging.stage_in(args.pretrain_url, "pretrain_url", args.cache_dir, workers.leader,
                                  io_timeout=args.io_timeout) if args.pretrain_url else None
    return data_dir, pretrained


def load_data(args, data_dir, outputs, workers):
    """The dataset found under `data_dir` (never the job's own outputs), and its class count (--num_classes may
    leave room for more). Class folders are split as a saved split says (--split, or the run resumed), which rank 0
    reads and every other worker receives: all train and validate on the same files."""
    def split_to_keep():
        saved = args.split and staging.stage_in(args.split, "split", args.cache_dir, io_timeout=args.io_timeout)
        if not saved and args.resume == "auto":
            saved = outputs.saved_split()
        elif not saved and args.resume and storage.is_local(args.resume):  # the split beside the state resumed
            beside = storage.local_path(args.resume).parent / run_state.SPLIT
            saved = beside if beside.is_file() else None
        return (str(saved), datasets.read_split(saved)) if saved else None
    saved, split = runtime.share_from_rank0(workers, split_to_keep) or (None, None)
    plan = datasets.SplitPlan(args.val_split, args.seed, split)
    source = datasets.find_data(data_dir, exclude=[outputs.files.folder, outputs.aim_repo], split=plan)
    if args.split and not source.split:
        print(f"warning: --split is for class folders and labelled images; {source.root} has splits of its own, "
              f"which are used", file=sys.stderr)
    how = "" if not source.split else f" (class folders split {'as ' + str(saved) if saved else 'now'})"
    how += f" (validating on {source.val_name}/: there is no val/)" if source.val_name == datasets.TEST_DIR else ""
    how += f", {source.sizes['test']} test images kept for the end" if source.test else ""
    print(f"data: {source.kind} at {source.root}: {source.sizes['train']} train / {source.sizes['val']} val "
          f"images{how}, {len(source.class_names)} classes")
    counts = source.class_counts()
    print("classes: " + ", ".join(f"{name} {count}" for name, count in zip(source.class_names[:10], counts))
          + (f" and {len(counts) - 10} more" if len(counts) > 10 else ""))
    if min(counts) * 10 < max(counts):
        print(f"warning: the classes are imbalanced: {max(counts)} images in the largest, {min(counts)} in the "
              f"smallest", file=sys.stderr)
    num_classes = args.num_classes or len(source.class_names)
    if num_classes < len(source.class_names):
        raise UserError(f"--num_classes {num_classes} is smaller than the {len(source.class_names)} classes "
                        f"in the data")
    return source, num_classes


def build_network(args, num_classes, pretrained):
    """The ResNet, padded as the pretrained weights were trained (so their features are reproduced), and loaded."""
    if args.freeze and args.trainable:
        raise UserError("--freeze trains only fc; for partial fine-tuning use --trainable alone")
    if args.freeze and args.feature_cache != "off":  # the backbone's features are computed once
        if datasets.Regularisers.from_args(args, 0) != datasets.Regularisers():
            raise UserError(f"--auto_augment, --random_erasing, --mixup and --cutmix"
                            f"{f' (set by --recipe {args.recipe})' if args.recipe else ''} change the images every "
                            f"epoch, but --freeze computes the backbone's features once: add --feature_cache off, "
                            f"or use --feature_views N for augmented views")
        if args.ema:
            raise UserError("--ema averages the whole network, but --freeze with a feature cache trains the head "
                            "alone: add --feature_cache off, or leave --ema out")
    weights = read_pretrained(pretrained) if pretrained else None  # read once: its padding shapes the network
    net = create_model(args.arch, num_classes, weights.padding if weights else "same")
    convolutions = use_onednn_convolutions(net)
    if convolutions:
        print(convolutions)
    if weights:
        load_pretrained(net, weights)
        warn_if_normalised_otherwise(weights)
    elif args.freeze:
        print("warning: --freeze without --pretrain_url trains a head on a randomly initialised backbone",
              file=sys.stderr)
    if args.freeze:
        net.freeze_backbone()
    elif args.trainable:
        net.train_only(args.trainable)
    return net


def warn_if_normalised_otherwise(weights):
    """timm's config.json says how its weights saw images; this job normalises with ImageNet's mean and std."""
    ours = (np.array(datasets.IMAGENET_MEAN) / 255, np.array(datasets.IMAGENET_STD) / 255)
    for what, own in (("mean", ours[0]), ("std", ours[1])):
        theirs = weights.config.get(what)
        if theirs is not None and not np.allclose(np.asarray(theirs, dtype=float), own, atol=1e-3):
            print(f"warning: {weights.path} was trained on images normalised with {what} {list(theirs)}, this job "
                  f"uses ImageNet's {[round(v, 3) for v in own]}: fine-tuning adapts, but the features start off",
                  file=sys.stderr)


def prepare_training(args, net, source, pretrained, workers, num_classes):
    """The whole network on images; in fixed-feature mode the head alone, on features the frozen backbone computes
    once. With several workers each trains on its own shard; all validate on the whole split."""
    preview = datasets.preview_batch(source, "val", args.image_size, PREVIEW_IMAGES)
    regularisers = datasets.Regularisers.from_args(args, num_classes)
    if args.freeze and args.feature_cache != "off":
        cache_dir = args.cache_dir or staging.default_cache_dir()
        head, train_data, val_data = features.head_training(net, source, args, pretrained, cache_dir, workers.shard)
        return Training(head, train_data, val_data, preview)
    train_data = datasets.create_dataset(source, "train", args.image_size, args.batch_size, args.num_workers,
                                         shard=workers.shard, regularisers=regularisers)
    val_data = datasets.create_dataset(source, "val", args.image_size, args.batch_size, args.num_workers,
                                       pad_last_batch=True)
    return Training(net, train_data, val_data, preview)


def weight_average(args, net):
    """With --ema: the average, kept in a copy of the network that starts from its weights (copied: loading a
    Parameter shares its memory)."""
    import mindspore as ms
    if not args.ema:
        return None
    copy = create_model(args.arch, net.fc.out_channels, net.padding)
    ms.load_param_into_net(copy, {p.name: ms.Parameter(ms.Tensor(p.asnumpy()), name=p.name)
                                  for p in net.get_parameters()})
    return train_step.WeightAverage(net, copy, args.ema)


def learning_rates(args, workers, steps_per_epoch):
    """The peak learning rate (scaled linearly with the workers) and the per-update schedule, held in memory."""
    if steps_per_epoch == 0:  # e.g. a worker's shard smaller than a batch that drops its remainder
        raise UserError(f"the training split gives this worker no batch of --batch_size {args.batch_size}: "
                        f"lower --batch_size")
    if args.epochs * steps_per_epoch > MAX_SCHEDULE_STEPS:
        raise UserError(f"--epochs {args.epochs} x {steps_per_epoch} steps per epoch is a schedule of more than "
                        f"{MAX_SCHEDULE_STEPS:,} steps, too long to hold in memory")
    if args.epochs * steps_per_epoch < args.accumulate:
        raise UserError(f"--accumulate {args.accumulate} is more than the {args.epochs * steps_per_epoch} steps of "
                        f"the whole run: no update would be made")
    if steps_per_epoch % args.accumulate:
        print(f"note: {steps_per_epoch} steps an epoch are not a multiple of --accumulate {args.accumulate}: updates "
              f"span epochs, and the last {args.epochs * steps_per_epoch % args.accumulate} steps of the run add to "
              f"no update")
    lr = args.lr * workers.lr_scale
    updates_per_epoch = steps_per_epoch / args.accumulate  # the schedule counts updates
    return lr, train_step.learning_rates(lr, args.epochs, updates_per_epoch, args.warmup_epochs, args.lr_schedule,
                                         args.lr_step_epochs, args.lr_gamma)


def write_first_outputs(files, args, source, net, preview, tracker):
    """labels.json, split.json (class folders), examples/ and train_samples.png: written once the first epoch has
    finished (just before its checkpoints), so a run that fails earlier leaves the last good run's files alone."""
    export.write_labels(files.labels, source.class_names, args.image_size, datasets.IMAGENET_MEAN,
                        datasets.IMAGENET_STD, args.arch, source.name, source.kind, net.padding)
    if source.split:
        export.write_json(files.split, source.split)
    export.save_examples(preview[0], preview[2], source.class_names, files.examples)
    images, _, labels = datasets.preview_batch(source, "train", args.image_size, PREVIEW_IMAGES)
    path = export.plot_image_grid(images, [source.class_names[i] for i in labels], files.train_samples)
    tracker.track_image("train_samples", path, caption="training images with their labels")


def evaluate_test(net, source, args, num_classes, weights, files, tracker, epoch):
    """The held-out test/ split, once, with the best epoch's weights: test.json, Aim's {"subset": "test"} metrics
    and a line. It took no part in choosing them."""
    import mindspore as ms
    if not files.best_checkpoint.is_file():  # e.g. every epoch's validation loss was NaN
        raise UserError(f"{files.best_checkpoint} is missing: no epoch was best, so {datasets.TEST_DIR}/ is not "
                        f"evaluated")
    ms.load_param_into_net(net, ms.load_checkpoint(str(files.best_checkpoint)))
    data = datasets.create_dataset(source, "test", args.image_size, args.batch_size, pad_last_batch=True)
    scores = train_step.create_evaluator(net, num_classes, weights).eval(data, dataset_sink_mode=False)
    confusion = scores.pop("confusion")
    scores = {name: float(value) for name, value in scores.items()}
    scores["macro_f1"] = train_step.macro_f1(confusion)
    export.write_json(files.test, {"images": source.sizes["test"], "best_epoch": epoch, **scores,
                                   "confusion": np.asarray(confusion).astype(int).tolist()})
    if tracker is not None:  # None: a resumed job that had finished training before the test
        tracker.track_scores(scores, {"subset": "test"}, epoch)
    print(f"test: accuracy {scores['accuracy']:.4f}  macro_f1 {scores['macro_f1']:.4f}  loss {scores['loss']:.4f} on "
          f"{source.sizes['test']} images of {datasets.TEST_DIR}/, with the weights of epoch {epoch}")


def show_predictions(preview, predicted, class_names, files, tracker):
    """The tutorial's second picture: validation predictions, green when right and red when wrong."""
    images, _, labels = preview
    titles = [class_names[p] + ("" if p == t else f"\n(true: {class_names[t]})") for p, t in zip(predicted, labels)]
    colours = ["green" if p == t else "red" for p, t in zip(predicted, labels)]
    path = export.plot_image_grid(images, titles, files.val_predictions, colours)
    tracker.track_image("val_predictions_grid", path, caption="last epoch: green right, red wrong")


def git_commit():
    """The commit of the code being run, when it runs from a git checkout (locally; the cloud job has no .git)."""
    import subprocess
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def hyperparameters(args, source, device, num_classes, workers, plan):
    """Everything that defines the run, for Aim's hparams (locations without credentials)."""
    import mindspore as ms
    locations = {k: storage.redact(getattr(args, k)) for k in URL_ARGS if getattr(args, k)}
    return {**vars(args), **locations, "num_classes": num_classes, "git_commit": git_commit(), "device": device,
            "mindspore": ms.__version__, "workers": workers.size,
            "global_batch_size": args.batch_size * workers.size * args.accumulate,  # images per update
            "dataset": source.name, "data_format": source.kind, "class_names": source.class_names,
            "train_size": source.sizes["train"], "val_size": source.sizes["val"], **plan._asdict()}


def start_tracking(args, outputs, source, hparams, meter, training, resumed, steps_per_epoch):
    """The Aim run: the resumed one when the Aim repo still holds it, else a new one (a state from another
    folder, or an Aim repo that was lost)."""
    series_folder = outputs.files.folder / series.FOLDER
    if not outputs.scratch and not tracking.aim_available():
        print(f"warning: aim cannot be imported here, so the run is kept in {series_folder.name}/ of the outputs; "
              f"replay it into an Aim repo with: python train/train_dir/series.py OUTPUT_FOLDER --repo runs",
              file=sys.stderr, flush=True)

    def aim_run(run_hash):
        return AimCallback(outputs.aim_repo, args.experiment or source.name, hparams, meter,
                           log_every=args.aim_log_every, system_tracking=args.aim_system_metrics,
                           class_names=source.class_names, preview=training.preview,
                           close_at_end=False, run_hash=run_hash, step_offset=resumed.epochs_done * steps_per_epoch,
                           close_timeout=args.io_timeout, series_folder=series_folder)
    try:
        return aim_run(resumed.aim_run)
    except Exception as exc:  # aim's (or series.py's) MissingRunError; aim is imported lazily, so matched by name
        if type(exc).__name__ != "MissingRunError":
            raise
    print(f"resume: Aim run {resumed.aim_run} is not in {storage.redact(outputs.aim_repo)}; the resumed epochs are "
          f"tracked in a new Aim run")
    return aim_run(None)


def export_extra(net, args, path, what):
    """Writes a graph beside the MindIR; True if written. A failure is one warning (and no file): the training and
    the MindIR stand. A full or lost disk still ends the job."""
    from errors import OutputError
    try:
        export.export_graph(net, args.image_size, path)
        return True
    except OutputError:
        raise
    except Exception as exc:  # MindSpore raises RuntimeError, ValueError, TypeError for an op without ONNX
        print(f"warning: the {what} export failed ({one_line(exc)}); the checkpoint and MindIR "
              f"are unaffected", file=sys.stderr)
        return False


def check_onnx(net, path, inputs):
    """Keeps the ONNX file only if onnxruntime reproduces MindSpore's logits on `inputs` (the validation preview),
    when onnxruntime is installed; otherwise one warning, and the file is removed."""
    try:
        import onnxruntime  # noqa: F401
    except Exception as exc:  # not installed, or installed but broken: the file stays, unchecked
        print(f"export: {path.name} written, not checked (onnxruntime cannot be imported: {exc})")
        return
    try:
        worst = export.onnx_difference(path, net, inputs)
        why = f"its logits differ from MindSpore's by up to {worst:.2g} (tolerance {export.ONNX_TOLERANCE:g})"
    except export.OnnxRuntimeFailed as exc:
        worst, why = float("inf"), f"onnxruntime cannot run it: {exc}"
    except Exception as exc:  # the reference side: the file itself may be fine
        worst, why = float("inf"), f"MindSpore could not compute the logits to compare it with: {one_line(exc)}"
    if worst <= export.ONNX_TOLERANCE:
        print(f"export: {path.name} agrees with the model on {len(inputs)} validation images (largest difference "
              f"{worst:.1e}, tolerance {export.ONNX_TOLERANCE:g})")
        return
    path.unlink(missing_ok=True)
    print(f"warning: {path.name} was not kept: {why}; the checkpoint and MindIR are unaffected", file=sys.stderr)


def finish(history, args, outputs, check_inputs, only_missing=False):
    """The best epoch's weights as the servable MindIR (and ONNX, checked on `check_inputs`, and AIR), and the
    learning curves (with `only_missing`, just those a finished job is missing, e.g. after a kill during the
    export, or that are older than metrics.json); then the final upload."""
    files = outputs.files
    # Exports are deleted whenever new best weights are saved (EpochRecorder), so one that exists is of these.
    # AIR is left out: one that fails on an Ascend would otherwise redo every export at each resume.
    exported = files.best_mindir.exists() and (files.best_onnx.exists() or not args.export_onnx)
    if not (only_missing and exported) and not outputs.scratch:  # ranks > 0: nothing of theirs is kept
        if not files.best_checkpoint.is_file():
            raise UserError(f"{files.best_checkpoint} is missing: the best weights cannot be exported")
        # A fresh fp32 network, as inference loads it: the trained one may have been cast to fp16 in place (amp O2)
        net = trained_model.checkpoint_network(files.best_checkpoint, args.arch)
        export.export_graph(net, args.image_size, files.best_mindir)
        if args.export_onnx and export_extra(net, args, files.best_onnx, "ONNX"):
            check_onnx(net, files.best_onnx, check_inputs)
        if args.export_air:
            export_extra(net, args, files.best_air, "AIR")
    curves_current = files.curves.exists() and files.metrics.exists() and \
        files.curves.stat().st_mtime_ns >= files.metrics.stat().st_mtime_ns
    if history and not (only_missing and curves_current):
        export.plot_curves(history, files.curves)
    outputs.push()
    best = next((r for r in history if r["epoch"] == callbacks.best_epoch(history)), None)
    print((f"done: best val_accuracy {best['val_accuracy']:.4f} at epoch {best['epoch']}"
           f"{'' if args.monitor == 'val_accuracy' else f' ({args.monitor} {best[args.monitor]:.4f})'}; "
           if best else "done: ")
          + f"outputs in {storage.redact(outputs.location)}")
    if (files.folder / series.FOLDER).is_dir() and not tracking.aim_available():  # kept without aim
        print(f"see the run in Aim: python train/train_dir/series.py {storage.redact(outputs.location)} --repo runs, "
              f"then aim up --repo runs")
    elif outputs.aim_repo and storage.scheme_of(outputs.aim_repo) != "aim":
        print(f"see the run in Aim: aim up --repo {outputs.aim_repo}")


def main(args):
    import mindspore as ms

    runtime.tune_cpu_env()
    device = runtime.setup_device(args.device_target)
    args.export_air = runtime.exports_air(args.export_air, device)
    plan = runtime.plan_training(device, args.amp_level, args.dataset_sink)
    workers = runtime.join_data_parallel(device)
    data_dir, pretrained = stage_inputs(args, workers)  # inputs first: no output folder on a typo
    outputs = run_state.Outputs(args, workers)
    files = outputs.files
    ms.set_seed(args.seed)  # before the network is built: same initial weights on every run (and rank)

    source, num_classes = load_data(args, data_dir, outputs, workers)
    net = build_network(args, num_classes, pretrained)
    training = prepare_training(args, net, source, pretrained, workers, num_classes)
    steps_per_epoch = training.train_data.get_dataset_size()
    lr, lr_schedule = learning_rates(args, workers, steps_per_epoch)
    optimizer = train_step.create_optimizer(training.cell, lr_schedule, args.momentum, args.weight_decay,
                                            args.backbone_lr_scale, args.optimizer)
    weights = None
    if args.class_weights == "auto":
        weights = train_step.class_weights(source.class_counts(["train"]), num_classes)
        print("class weights: " + ", ".join(f"{name} {w:.3f}" for name, w in zip(source.class_names, weights)))
    average = weight_average(args, net)
    kept = average.copy if average else net  # what is validated, saved and exported
    trainer = train_step.create_trainer(training.cell, optimizer, num_classes, plan, weights, args.label_smoothing,
                                        args.clip_grad_norm, args.accumulate, average, len(training.preview[2]))
    resumed = run_state.load_resume(args, outputs, trainer.train_network, workers)
    outputs.claim(args, resumed)  # every input is checked: from here on the job writes
    outputs.adopt_best(resumed)
    stopped = args.early_stop and callbacks.epochs_without_improvement(resumed.history, args.monitor,
                                                                        args.min_delta) >= args.early_stop
    if resumed.epochs_done >= args.epochs or stopped:
        print(f"resume: {'the run stopped early' if stopped else f'all {args.epochs} epochs are done'}; "
              f"nothing left to train")
        if source.test and workers.writes_outputs and not files.test.exists():  # stopped before the test
            evaluate_test(net, source, args, num_classes, weights, files, None, callbacks.best_epoch(resumed.history))
        return finish(resumed.history, args, outputs, training.preview[1], only_missing=True)
    datasets.skip_finished_epochs(training.train_data, resumed.epochs_done, args.resume_exact)

    meter = callbacks.StepMeter()
    hparams = hyperparameters(args, source, device, num_classes, workers, plan)
    tracker = start_tracking(args, outputs, source, hparams, meter, training, resumed, steps_per_epoch)
    recorder = callbacks.EpochRecorder(meter, kept, files, trainer.train_network, tracker.hash, resumed,
                                       callbacks.Selection(args.monitor, args.keep_checkpoints, args),
                                       outputs.discard_exports)
    early_stop = callbacks.EarlyStop(recorder, args.monitor, args.early_stop, args.min_delta, tracker) \
        if args.early_stop else None
    where = f"outputs only on rank 0 (this worker's scratch: {files.folder})" if not workers.writes_outputs else \
        f"series {tracker.hash} in {tracker.location}" if tracker.tracks_series else \
        f"Aim run {tracker.hash} in {storage.redact(outputs.aim_repo)}"
    print(f"train: {args.arch} on {device} ({plan.describe()}){workers.describe(args.batch_size, lr)}, "
          f"{args.epochs} epochs x {steps_per_epoch} steps of {args.batch_size}"
          f"{f', an update every {args.accumulate} steps' if args.accumulate > 1 else ''}"
          f"{f', weights averaged (EMA {args.ema})' if average else ''}, {where}")
    try:
        with callbacks.signals_restored():
            trainer.fit(args.epochs, training.train_data, valid_dataset=training.val_data,
                        callbacks=callbacks.create_callbacks(
                            meter, recorder, tracker, net, workers, args.epochs, steps_per_epoch, outputs.push,
                            at_first_epoch_end=lambda: write_first_outputs(files, args, source, net,
                                                                           training.preview, tracker),
                            early_stop=early_stop),
                        dataset_sink_mode=plan.dataset_sink, valid_dataset_sink_mode=False,
                        initial_epoch=resumed.epochs_done)
        if workers.writes_outputs:
            show_predictions(training.preview, tracker.last_predictions, source.class_names, files, tracker)
            if source.test:
                evaluate_test(net, source, args, num_classes, weights, files, tracker,
                              callbacks.best_epoch(recorder.history))
    finally:
        try:
            tracker.close(failing=sys.exc_info()[0] is not None)  # a failure in flight is the one to report
        finally:
            outputs.push()  # also after a failure: keep what the finished epochs made
    finish(recorder.history, args, outputs, training.preview[1])


def run(argv=None):
    """Entry point: one `error:` line and a non-zero exit, never a traceback, for user mistakes (2), a diverged
    loss (3) and a stopping signal (128 + its number)."""
    return run_main(main, lambda: parse_args(argv))


if __name__ == "__main__":
    sys.exit(run())
