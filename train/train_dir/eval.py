"""Evaluate a model that train.py produced: how good it is per class, on a split it was not trained on.

    python eval.py --model_url OUT/resnet50-best.ckpt --data_url DATA --output_url EVAL [--split OUT/split.json]

Writes `eval.json` (top-1 and top-5 accuracy; per-class precision, recall, F1 and support; their macro and
weighted averages; the confusion matrix), `confusion_matrix.png` and `worst_mistakes.png` (the most confident wrong
predictions), and logs the scores to Aim when given `--aim_repo` (attached to the training run with `--aim_run`).
It takes the platform's flags like train.py, so it runs as a Xihe job from the same code_dir.
"""
import heapq
import os
import sys

os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import datasets  # noqa: E402
import export  # noqa: E402
import run_state  # noqa: E402
import runtime  # noqa: E402
import staging  # noqa: E402
import storage  # noqa: E402
import trained_model  # noqa: E402
from args import get_eval_args_parser, parse_args  # noqa: E402
from errors import UserError, run_main  # noqa: E402

WORST = 16  # mistakes shown
REPORT, CONFUSION_PNG, MISTAKES_PNG = "eval.json", "confusion_matrix.png", "worst_mistakes.png"


def load_split(args, labels):
    """The split to evaluate, from the data (as train.py finds it) and the training run's split.json."""
    data_dir = staging.stage_in(args.data_url, "data_url", args.cache_dir, io_timeout=args.io_timeout)
    saved = args.split and staging.stage_in(args.split, "split", args.cache_dir, io_timeout=args.io_timeout)
    source = datasets.find_data(data_dir, split=datasets.SplitPlan(saved=datasets.read_split(saved) if saved
                                                                   else None))
    if source.class_names != labels["class_names"]:
        raise UserError(f"the data's classes {source.class_names} are not the model's {labels['class_names']}")
    subset = args.subset if args.subset != "auto" else ("test" if source.test else "val")
    if subset == "test" and not source.test:
        raise UserError(f"{source.root} has no test/ split beside val/ (--subset val evaluates the validation split)")
    if source.split and not saved and subset != "train":
        print(f"warning: {source.root} has no split of its own and no --split was given: the split made now may "
              f"hold images the model was trained on", file=sys.stderr)
    return source, subset


def predict(forward, source, subset, image_size, batch_size, num_classes, graph_per_shape=False):
    """(true labels, logits, the most confident mistakes as (confidence, HWC image, true, predicted)), streamed.
    `graph_per_shape`: the forward compiles a graph for each batch shape (a checkpoint's network in GRAPH_MODE), so
    the last short batch is filled up rather than compiled for."""
    data = datasets.create_dataset(source, subset, image_size, batch_size, shuffle=False, augment=False,
                                   drop_remainder=False, pad_last_batch=graph_per_shape)
    truth, logits, worst = [], [], []
    for inputs, labels in data.create_tuple_iterator(output_numpy=True):
        labels, batch, inputs = datasets.without_padding(labels, forward(inputs), inputs)
        batch = batch[:, :num_classes]
        probabilities = trained_model.softmax(batch)
        for i in np.flatnonzero(batch.argmax(1) != labels):
            item = (float(probabilities[i].max()), len(truth) + int(i))
            image = np.clip((inputs[i].transpose(1, 2, 0) * datasets.IMAGENET_STD + datasets.IMAGENET_MEAN).round(),
                            0, 255).astype(np.uint8)
            entry = (item, image, int(labels[i]), int(batch[i].argmax()))
            (heapq.heappush if len(worst) < WORST else heapq.heappushpop)(worst, entry)
        truth.append(labels)
        logits.append(batch)
    return np.concatenate(truth), np.concatenate(logits), sorted(worst, key=lambda e: -e[0][0])


def scores(truth, logits, class_names):
    """Top-1, top-5, and per-class precision, recall, F1 and support, with macro and weighted averages."""
    count = len(class_names)
    predicted = logits.argmax(1)
    confusion = np.zeros((count, count), np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    right, support, called = np.diag(confusion), confusion.sum(1), confusion.sum(0)
    precision = np.divide(right, called, out=np.zeros(count), where=called > 0)
    recall = np.divide(right, support, out=np.zeros(count), where=support > 0)
    f1 = np.divide(2 * right, support + called, out=np.zeros(count), where=(support + called) > 0)
    present = (support + called) > 0
    report = {"images": int(len(truth)), "accuracy": float((predicted == truth).mean()),
              "classes": {name: {"precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
                                 "support": int(support[k])} for k, name in enumerate(class_names)},
              "macro": {name: float(values[present].mean()) for name, values in
                        (("precision", precision), ("recall", recall), ("f1", f1))},
              "weighted": {name: float((values * support).sum() / support.sum()) for name, values in
                           (("precision", precision), ("recall", recall), ("f1", f1))},
              "confusion": confusion.tolist()}
    if count >= 5:
        top5 = np.argsort(-logits, axis=1)[:, :5]
        report["top5_accuracy"] = float((top5 == truth[:, None]).any(1).mean())
    return report


def track(args, report, subset, folder, files, class_names):
    """The scores in Aim: attached to the training run (--aim_run), or in a new run of --experiment."""
    from tracking import AimCallback
    hparams = None if args.aim_run else {"model_url": storage.redact(args.model_url),
                                         "data_url": storage.redact(args.data_url), "subset": subset}
    tracker = AimCallback(args.aim_repo, args.experiment, hparams, meter=None, system_tracking=False,
                          class_names=class_names, run_hash=args.aim_run, close_timeout=args.io_timeout,
                          series_folder=folder / run_state.AIM_SERIES)
    try:
        context = {"subset": subset, "job": "eval"}
        tracker.track_scores({"accuracy": report["accuracy"], "macro_f1": report["macro"]["f1"],
                              **({"top5_accuracy": report["top5_accuracy"]} if "top5_accuracy" in report else {})},
                             context, 0)
        for name, path in files.items():
            tracker.track_image(name, path, caption=f"{subset} split", context=context)
    finally:
        tracker.close()
    return tracker.hash


def main(args):
    runtime.tune_cpu_env()
    device = runtime.setup_device(args.device_target)
    model, labels_path = trained_model.stage(args, device)
    labels, forward = trained_model.load(model, labels_path)
    source, subset = load_split(args, labels)
    mirror = staging.OutputMirror(args.output_url, "output_url", args.cache_dir, io_timeout=args.io_timeout)
    names = labels["class_names"]
    truth, logits, worst = predict(forward, source, subset, int(labels["image_size"]), args.batch_size, len(names),
                                   graph_per_shape=model.suffix.lower() == ".ckpt")
    report = {"model": storage.redact(args.model_url), "model_file": model.name, "subset": subset,
              **scores(truth, logits, names)}
    folder = mirror.local
    export.write_json(folder / REPORT, report)
    pictures = {"confusion_matrix": export.plot_confusion(report["confusion"], names, folder / CONFUSION_PNG)}
    if worst:
        pictures["worst_mistakes"] = export.plot_image_grid(
            [image for _, image, _, _ in worst],
            [f"{names[p]} {c:.0%}\n(true: {names[t]})" for (c, _), _, t, p in worst], folder / MISTAKES_PNG,
            ["red"] * len(worst))
    if args.aim_repo:
        run_hash = track(args, report, subset, folder, pictures, names)
        print(f"aim: scores in run {run_hash} of {storage.redact(args.aim_repo)}")
    mirror.push()
    print(f"eval: {model.name} on the {subset} split of {source.root}, {report['images']} images: "
          f"accuracy {report['accuracy']:.4f}, "
          f"macro F1 {report['macro']['f1']:.4f}; report in {storage.redact(mirror.url)}")


if __name__ == "__main__":
    sys.exit(run_main(main, lambda: parse_args(parser=get_eval_args_parser())))
