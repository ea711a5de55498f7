"""Train a ResNet image classifier with MindSpore: locally, or as the boot file of a Xihe/ModelArts training job.

    python train.py --data_url DATA --output_url OUT --epochs 10 [--pretrain_url resnet50.ckpt]

The job, top to bottom: parse flags -> pick the device -> stage inputs -> find the data -> build the network
(optionally from pretrained weights) -> fit with validation every epoch -> export -> report.
"""
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only, so the job's own lines stay readable
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling modules, from any working directory

import datasets  # noqa: E402
import export  # noqa: E402
import features  # noqa: E402
import fit  # noqa: E402
import storage  # noqa: E402
from args import parse_args  # noqa: E402
from errors import Diverged, Interrupted, UserError  # noqa: E402
from resnet import create_model, load_pretrained, read_checkpoint, read_pretrained  # noqa: E402
from tracking import AimCallback  # noqa: E402

URL_ARGS = ("data_url", "pretrain_url", "output_url", "aim_repo")
PREVIEW_IMAGES = 16  # validation images shown in Aim each epoch, and in the picture files


def stage_outputs(args, rank=0):
    """Local folders for the outputs and the Aim repo, mirrored to remote locations when they are remote.

    Only rank 0 writes the job's outputs; other workers keep theirs in a scratch folder of the cache."""
    if rank != 0:
        scratch = Path(args.cache_dir or storage.default_cache_dir()) / f"rank-{rank}"
        return storage.OutputMirror(str(scratch), "scratch folder", args.cache_dir), None, None
    outputs = storage.OutputMirror(args.output_url, "output_url", args.cache_dir)
    if not args.aim_repo:  # the Aim repo lives in the output folder, and travels with it
        return outputs, None, outputs.local
    if storage.scheme_of(args.aim_repo) == "aim":  # an Aim tracking server: nothing to stage
        return outputs, None, args.aim_repo
    aim_store = storage.OutputMirror(args.aim_repo, "aim_repo", args.cache_dir)
    return outputs, aim_store, aim_store.local


def push(*mirrors):
    for mirror in filter(None, mirrors):
        copied = mirror.push()
        if copied:
            print(f"synced {copied} file(s) to {storage.redact(mirror.remote)}", flush=True)


def resume_state(args, outputs, aim_store, train_step):
    """With --resume, restore the weights, optimizer moments and schedule position saved after the last finished
    epoch; returns (epochs done, best accuracy so far, Aim run to continue, metrics of the finished epochs)."""
    import mindspore as ms
    if not args.resume:
        return 0, -1.0, None, []
    if args.resume == "auto":
        # A restarted cloud job has a fresh disk: fetch the state, the records and the best weights so far.
        outputs.pull(fit.EpochRecorder.RESUME_FILE, "metrics.json", f"{args.arch}-best.ckpt")
        if aim_store is not None:
            aim_store.pull()  # the Aim repo, so that the run continues in it
        path = outputs.local / fit.EpochRecorder.RESUME_FILE
        if not path.is_file():
            print("resume: nothing to resume in the output folder; starting fresh")
            return 0, -1.0, None, []
    else:
        path = storage.stage_in(args.resume, "resume", args.cache_dir)
    state = read_checkpoint(path)
    if "epoch" not in state:
        raise UserError(f"{path} is not a resume state written by this job (no epoch recorded)")
    done, best, run_hash = int(state.pop("epoch")), float(state.pop("best_accuracy")), str(state.pop("aim_run"))
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
                        f"missing, e.g. {not_loaded[0]} (same --arch, --freeze and --trainable?)")
    metrics = path.parent / "metrics.json"
    history = [r for r in json.loads(metrics.read_text()) if r["epoch"] <= done] if metrics.is_file() else []
    print(f"resume: continuing after epoch {done} of {args.epochs} from {path} (best val_accuracy {best:.4f})")
    return done, best, run_hash or None, history


def load_data(args, data_dir, shard=None):
    """The data; with several workers each trains on its own shard (all of them validate on the whole split, so
    every worker reports the same validation numbers)."""
    source = datasets.find_data(data_dir)
    print(f"data: {source.kind} at {source.root}: {source.sizes['train']} train / {source.sizes['val']} val images, "
          f"{len(source.class_names)} classes")
    train_data = datasets.create_dataset(source, "train", args.image_size, args.batch_size, args.num_workers,
                                         shard=shard)
    val_data = datasets.create_dataset(source, "val", args.image_size, args.batch_size, args.num_workers)
    return source, train_data, val_data


def build_network(args, num_classes, pretrained):
    """The ResNet, padded as the pretrained weights were trained (so their features are reproduced), and loaded."""
    if args.freeze and args.trainable:
        raise UserError("--freeze trains only fc; for partial fine-tuning use --trainable alone")
    weights = read_pretrained(pretrained) if pretrained else None  # read once: its padding shapes the network
    net = create_model(args.arch, num_classes, weights.padding if weights else "same")
    if weights:
        load_pretrained(net, weights)
    elif args.freeze:
        print("warning: --freeze without --pretrain_url trains a head on a randomly initialised backbone",
              file=sys.stderr)
    if args.freeze:
        net.freeze_backbone()
    elif args.trainable:
        net.train_only(args.trainable)
    return net


def predictor(net):
    """Logits for a batch of network inputs, with BatchNorm in inference mode."""
    import mindspore as ms

    def predict(inputs):
        net.set_train(False)
        return net(ms.Tensor(inputs)).asnumpy()
    return predict


def show_training_samples(source, image_size, output_dir, tracker):
    """The tutorial's first picture: training images with their labels (train_samples.png and in Aim)."""
    images, _, labels = datasets.preview_batch(source, "train", image_size, PREVIEW_IMAGES)
    path = export.plot_image_grid(images, [source.class_names[i] for i in labels], output_dir / "train_samples.png")
    tracker.track_image("train_samples", path, caption="training images with their labels")


def show_predictions(preview, predicted, class_names, output_dir, tracker):
    """The tutorial's second picture: validation predictions, green when right and red when wrong."""
    images, _, labels = preview
    titles = [class_names[p] + ("" if p == t else f"\n(true: {class_names[t]})") for p, t in zip(predicted, labels)]
    colours = ["green" if p == t else "red" for p, t in zip(predicted, labels)]
    path = export.plot_image_grid(images, titles, output_dir / "val_predictions.png", colours)
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


def hyperparameters(args, source, device, num_classes, workers=1):
    """Everything that defines the run, for Aim's hparams (locations without credentials)."""
    import mindspore as ms
    locations = {k: storage.redact(getattr(args, k)) for k in URL_ARGS if getattr(args, k)}
    return {**vars(args), **locations, "num_classes": num_classes, "git_commit": git_commit(), "device": device,
            "mindspore": ms.__version__, "workers": workers, "global_batch_size": args.batch_size * workers,
            "dataset": source.name, "data_format": source.kind, "class_names": source.class_names,
            "train_size": source.sizes["train"], "val_size": source.sizes["val"]}


def main(args):
    import mindspore as ms

    fit.tune_cpu_env()
    device = fit.setup_device(args.device_target)
    plan = fit.plan_training(device, args.amp_level, args.dataset_sink)
    rank, workers, local_rank = fit.join_data_parallel()
    leader = local_rank == 0  # one download per machine; the other workers wait for it
    data_dir = storage.stage_in(args.data_url, "data_url", args.cache_dir, leader)  # inputs first: no output on a typo
    pretrained = storage.stage_in(args.pretrain_url, "pretrain_url", args.cache_dir, leader) \
        if args.pretrain_url else None
    outputs, aim_store, aim_repo = stage_outputs(args, rank)
    output_dir = outputs.local
    ms.set_seed(args.seed)  # before the network is built: same initial weights on every run (and rank)

    shard = (workers, rank) if workers > 1 else None  # each worker trains on its own part of the data
    source, train_data, val_data = load_data(args, data_dir, shard)
    num_classes = args.num_classes or len(source.class_names)
    if num_classes < len(source.class_names):
        raise UserError(f"--num_classes {num_classes} is smaller than the {len(source.class_names)} classes "
                        f"in the data")
    net = build_network(args, num_classes, pretrained)

    val_preview = datasets.preview_batch(source, "val", args.image_size, PREVIEW_IMAGES)
    trained, predict = net, predictor(net)  # what the optimiser steps, and what labels the Aim preview
    if args.freeze and args.feature_cache != "off":  # the head alone, on features the backbone computes once
        cache_dir = args.cache_dir or storage.default_cache_dir()
        train_features, val_features = features.cached_features(net, source, args, pretrained, cache_dir)
        train_data, val_data = features.feature_datasets(train_features, val_features, args.batch_size, args.seed,
                                                         shard)
        trained, predict = net.fc, features.head_predictor(net.fc, val_features[0], len(val_preview[2]))

    steps_per_epoch = train_data.get_dataset_size()
    lr = args.lr * workers  # linear scaling: --lr is for one device's batch; N workers take N times the batch
    lr_schedule = fit.cosine_lr(lr, args.epochs, steps_per_epoch, args.warmup_epochs)
    optimizer = fit.create_optimizer(trained, lr_schedule, args.momentum, args.weight_decay, args.backbone_lr_scale)
    trainer = fit.create_trainer(trained, optimizer, num_classes, plan)
    done, best_so_far, run_hash, history = resume_state(args, outputs, aim_store, trainer.train_network)
    # The first outputs, once every input has been checked:
    export.write_labels(output_dir / "labels.json", source.class_names, args.image_size, datasets.IMAGENET_MEAN,
                        datasets.IMAGENET_STD, args.arch, source.name, source.kind, net.padding)
    export.save_examples(val_preview[0], val_preview[2], source.class_names, output_dir / "examples")
    tracker = AimCallback(aim_repo, args.experiment or source.name,
                          {**hyperparameters(args, source, device, num_classes, workers), **plan._asdict()},
                          log_every=args.aim_log_every, system_tracking=args.aim_system_metrics,
                          class_names=source.class_names, preview=val_preview, predict=predict,
                          close_at_end=False, run_hash=run_hash, step_offset=done * steps_per_epoch)
    recorder = fit.EpochRecorder(net, output_dir, args.arch, trainer.train_network, tracker.hash)
    recorder.restore(history, best_so_far)
    parallel = f" x {workers} workers (rank {rank}), global batch {args.batch_size * workers}, lr {lr:g}" \
        if workers > 1 else ""
    where = f"Aim run {tracker.hash} in {storage.redact(aim_repo)}" if rank == 0 else \
        f"outputs only on rank 0 (this worker's scratch: {output_dir})"
    print(f"train: {args.arch} on {device} ({plan.describe()}){parallel}, {args.epochs} epochs x "
          f"{steps_per_epoch} steps of {args.batch_size}, {where}")
    callbacks = [fit.StopOnSignal(), fit.StopOnNonFiniteLoss(), recorder,
                 fit.ConsoleProgress(args.epochs, steps_per_epoch), tracker,
                 fit.EpochEndHook(lambda: push(outputs, aim_store))]
    if workers > 1:
        callbacks.insert(0, fit.SyncBatchNormStatistics(net, workers, steps_per_epoch))
    try:
        show_training_samples(source, args.image_size, output_dir, tracker)
        fit.fit(trainer, args.epochs, train_data, val_data, callbacks, initial_epoch=done,
                dataset_sink=plan.dataset_sink)
        if rank == 0:
            show_predictions(val_preview, tracker.last_predictions, source.class_names, output_dir, tracker)
    finally:
        tracker.close()
        push(outputs, aim_store)  # also after a failure: keep what the finished epochs made

    best = max(recorder.history, key=lambda r: r["val_accuracy"])
    ms.load_param_into_net(net, ms.load_checkpoint(str(recorder.best_path)))
    export.export_mindir(net, args.image_size, output_dir / f"{args.arch}-best.mindir")
    export.plot_curves(recorder.history, output_dir / "curves.png")
    push(outputs, aim_store)
    print(f"done: best val_accuracy {best['val_accuracy']:.4f} at epoch {best['epoch']}; "
          f"outputs in {storage.redact(outputs.remote or output_dir)}")
    if aim_repo and storage.scheme_of(aim_repo) != "aim":
        print(f"see the run in Aim: aim up --repo {aim_repo}")


def run(argv=None):
    """Entry point: one `error:` line and a non-zero exit, never a traceback, for user mistakes (2), a diverged
    loss (3) and a stopping signal (128 + its number)."""
    try:
        main(parse_args(argv))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Diverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except Interrupted as exc:  # 128 + the signal's number, as a shell reports a process the signal killed
        print(f"error: stopped by {exc} during training; the finished epochs' outputs are saved", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(run())
