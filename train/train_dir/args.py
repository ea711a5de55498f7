"""Command-line flags, tolerant of how ModelArts/Xihe call the boot file.

The platform passes every value as a string (`--epochs=30`, `--freeze=true`), names outputs `output_path` /
`train_url` as well as `output_url`, and may add flags of its own (`--init_method`, ...). Unknown flags get one warning.
"""
import argparse
import math
import sys

from resnet import ARCHS
from storage import redact

TRUE_WORDS = {"true", "1", "yes", "y", "on"}
FALSE_WORDS = {"false", "0", "no", "n", "off"}
DEVICE_TARGETS = ("auto", "CPU", "GPU", "Ascend")
# Upper bounds no real job reaches, which stop a typo before it asks for more memory than any machine has.
MAX_EPOCHS, SCHEDULE = 10_000, "the per-step learning-rate schedule is held in memory"
MAX_IMAGE_SIZE, IMAGE = 4096, "one 4096x4096 image is already 200 MB as float32"
MAX_CLASSES, HEAD = 100_000, "the head holds up to 2048 weights per class"
MAX_VIEWS, VIEWS = 100, "every view of every training image is kept"


def str2bool(value):
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false/1/0, got {value!r}")


def _bounded(kind, low, inclusive=True, high=None, why=""):
    """A type that also enforces bounds, so `--epochs=0` is refused as early as `--epochs=ten`. NaN and inf are
    refused too: they pass every comparison, then break the schedule mid-job."""
    def parse(value):
        number = kind(value)
        if not math.isfinite(number):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {value}")
        if number < low or (not inclusive and number == low):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {low}, got {value}")
        if high is not None and number > high:
            raise argparse.ArgumentTypeError(f"must be <= {high} ({why}), got {value}")
        return number
    parse.__name__ = kind.__name__
    return parse


def _device(value):
    for target in DEVICE_TARGETS:
        if value.strip().lower() == target.lower():
            return target
    raise argparse.ArgumentTypeError(f"choose from {', '.join(DEVICE_TARGETS)}")


class _OneLineErrors(argparse.ArgumentParser):
    """argparse prints the whole usage before an error; a platform log wants one line."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def get_args_parser():
    parser = _OneLineErrors(
        description="Train a ResNet image classifier with MindSpore on CIFAR-10 (binary) or an ImageFolder dataset. "
                    "Runs locally and as the boot file of a Xihe/ModelArts training job.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("--data_url", "--data_path", dest="data_url", required=True,
                    help="CIFAR-10 binary files or train/ and val/ class folders, searched recursively: a local "
                         "folder, an obs:// or s3:// folder, or a .zip/.tar/.tar.gz archive (also over http(s))")
    io.add_argument("--pretrain_url", "--pretrain_path", dest="pretrain_url", default=None,
                    help="a .ckpt to start from (e.g. ImageNet weights), local, obs://, s3:// or http(s)://; "
                         "a head of another size is re-initialised")
    _add_output_folder(io, "checkpoints, the MindIR export, labels.json, metrics.json and curves.png")
    io.add_argument("--aim_repo", default=None,
                    help="folder that holds the Aim repo (.aim is created inside), local, obs:// or s3://, or an "
                         "aim://host:port tracking server; default: the output folder")

    hp = parser.add_argument_group("hyperparameters")
    hp.add_argument("--epochs", type=_bounded(int, 1, high=MAX_EPOCHS, why=SCHEDULE), default=10,
                    help=f"passes over the training split (at most {MAX_EPOCHS}: {SCHEDULE})")
    hp.add_argument("--batch_size", type=_bounded(int, 1), default=18, help="per-device batch size")
    hp.add_argument("--lr", type=_bounded(float, 0.0, inclusive=False), default=0.001,
                    help="peak learning rate (after warmup) of momentum SGD with a cosine schedule")
    hp.add_argument("--momentum", type=_bounded(float, 0.0), default=0.9, help="SGD momentum")
    hp.add_argument("--weight_decay", type=_bounded(float, 0.0), default=1e-4,
                    help="L2 on conv and dense weights (not on BatchNorm or biases)")
    hp.add_argument("--warmup_epochs", type=_bounded(float, 0.0, high=MAX_EPOCHS, why=SCHEDULE), default=0.0,
                    help="linear warmup length")
    hp.add_argument("--image_size", type=_bounded(int, 32, high=MAX_IMAGE_SIZE, why=IMAGE), default=224,
                    help=f"train/val crop size; CIFAR-10 is resized to it unless it is 32 (at most {MAX_IMAGE_SIZE}: "
                         f"{IMAGE})")
    hp.add_argument("--arch", type=str.lower, choices=sorted(ARCHS), default="resnet50")
    hp.add_argument("--num_classes", type=_bounded(int, 2, high=MAX_CLASSES, why=HEAD), default=None,
                    help=f"default: from the data (at most {MAX_CLASSES}: {HEAD})")
    hp.add_argument("--freeze", type=str2bool, nargs="?", const=True, default=False,
                    help="fixed-feature mode: train only the classifier head on a frozen backbone, whose features "
                         "are computed once (see --feature_cache)")
    hp.add_argument("--feature_cache", choices=("memory", "disk", "off"), default="memory",
                    help="with --freeze: keep the backbone's features in memory, or on disk under --cache_dir "
                         "(reused by later runs on the same weights and data), or 'off': run the frozen "
                         "backbone on every image every epoch, as the MindSpore tutorial does")
    hp.add_argument("--feature_views", type=_bounded(int, 1, high=MAX_VIEWS, why=VIEWS), default=1,
                    help="with --freeze: 1 = each training image once, with the validation transform; "
                         f"N = N randomly augmented views of each (at most {MAX_VIEWS}: {VIEWS})")
    hp.add_argument("--trainable", type=_layer_list, default=None,
                    help="partial fine-tuning: the only layers to train, e.g. 'layer4,fc' "
                         "(names: conv1, norm, layer1..layer4, fc); BatchNorm statistics of the rest stay fixed")
    hp.add_argument("--backbone_lr_scale", type=_bounded(float, 0.0), default=1.0,
                    help="learning rate of the backbone (everything but fc) as a fraction of --lr")
    hp.add_argument("--seed", type=_bounded(int, 0, high=2**32 - 1, why="MindSpore's seed range"), default=1,
                    help="seeds weights, shuffling, augmentation and the split of class folders")
    hp.add_argument("--class_weights", choices=("none", "auto"), default="none",
                    help="auto: weight the loss by inverse class frequency in the training split, N / (C x n_c), "
                         "for imbalanced data")
    hp.add_argument("--val_split", type=_bounded(float, 0.0, inclusive=False, high=0.9, why="some must be trained on"),
                    default=0.2,
                    help="class folders without train/ and val/: the fraction of each class held out for validation")
    hp.add_argument("--split", default=None,
                    help="a split.json from an earlier run's outputs: validate on the same images (a resumed run "
                         "reuses its own)")

    run = parser.add_argument_group("run")
    run.add_argument("--device_target", type=_device, default="auto", help="auto picks Ascend, then GPU, then CPU")
    run.add_argument("--amp_level", choices=("auto", "O0", "O2"), default="auto",
                     help="auto: O2 (fp16 with fp32 BatchNorm and loss, dynamic loss scaling) on GPU and Ascend, "
                          "O0 (fp32) on CPU")
    run.add_argument("--dataset_sink", choices=("auto", "true", "false"), default="auto",
                     help="run whole epochs on the device; auto: on Ascend only")
    run.add_argument("--num_workers", type=_bounded(int, 1), default=None,
                     help="data pipeline workers; default and maximum: the number of cores")
    run.add_argument("--experiment", default=None, help="Aim experiment name; default: the dataset's name")
    run.add_argument("--aim_log_every", type=_bounded(int, 1), default=1, help="log step metrics to Aim every N steps")
    run.add_argument("--aim_system_metrics", type=str2bool, nargs="?", const=True, default=True,
                     help="let Aim record CPU, memory and disk use every 10 s")
    run.add_argument("--resume", default=None,
                     help="'auto': continue from the last finished epoch saved in --output_url (start fresh when "
                          "there is none), or the path of a resume.ckpt; restores weights, optimizer, schedule, "
                          "best accuracy and the Aim run")
    run.add_argument("--resume_exact", type=str2bool, nargs="?", const=True, default=False,
                     help="a resumed job replays the finished epochs' data pipeline, so it goes on bit for bit as "
                          "the uninterrupted job would (costs one pass over the data per finished epoch); without "
                          "it the data order is the same but random augmentations are drawn anew")
    _add_staging(run)
    run.add_argument("--overwrite", type=str2bool, nargs="?", const=True, default=False,
                     help="allow a new run into an output folder that holds another run's outputs (they are "
                          "replaced once the new run has finished an epoch); without it such a folder is refused "
                          "unless --resume continues that run")
    return parser


def _add_output_folder(group, what):
    group.add_argument("--output_url", default=None,
                       help=f"where {what} go: a local folder, or obs:// / s3:// (written locally, copied there); "
                            f"default: output")
    group.add_argument("--output_path", default=None,
                       help="Xihe's name for the output folder, the one it collects: wins over --output_url and "
                            "--train_url")
    group.add_argument("--train_url", default=None, help="ModelArts' older name for the output folder")


def _add_staging(group):
    group.add_argument("--cache_dir", default=None,
                       help="where remote inputs are fetched and remote outputs staged; default: /cache/resnet-job "
                            "on ModelArts, else ~/.cache/resnet-job")
    group.add_argument("--io_timeout", type=_bounded(float, 0.0, inclusive=False, high=86400, why="a day"),
                       default=60.0,
                       help="seconds a download or upload may make no progress (or crawl below 1 KiB/s) before the "
                            "job stops with an error naming the location")


def _add_model(group):
    group.add_argument("--model_url", "--model", "--ckpt_url", dest="model_url", required=True,
                       help="a .ckpt or .mindir written by train.py, or a folder of its outputs (the best model in "
                            "it); local, obs://, s3:// or http(s)://; labels.json is read beside it")
    group.add_argument("--labels", default=None, help="labels.json, when it is not beside the model")


def get_eval_args_parser():
    """eval.py's flags: the trained model, the data (any layout train.py reads), where the report goes."""
    parser = _OneLineErrors(
        description="Evaluate a model that train.py produced on a split of a dataset: top-1 and top-5 accuracy, "
                    "per-class precision, recall and F1, their macro and weighted averages, the confusion matrix "
                    "and the most confident mistakes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    io = parser.add_argument_group("inputs and outputs")
    _add_model(io)
    io.add_argument("--data_url", "--data_path", dest="data_url", required=True,
                    help="the data, in any layout train.py reads")
    io.add_argument("--split", default=None,
                    help="the split.json of the training run, for class folders or labelled images: evaluate on "
                         "the images it validated on")
    io.add_argument("--subset", choices=("auto", "train", "val", "test"), default="auto",
                    help="which split to evaluate; auto: test/ when the data has one beside val/, else val")
    _add_output_folder(io, "eval.json, confusion_matrix.png and worst_mistakes.png")
    io.add_argument("--aim_repo", default=None, help="an Aim repo to log the scores to (local folder)")
    io.add_argument("--aim_run", default=None,
                    help="the training run's hash in --aim_repo: the scores are attached to it (default: a new run)")
    run = parser.add_argument_group("run")
    run.add_argument("--batch_size", type=_bounded(int, 1), default=64)
    run.add_argument("--device_target", type=_device, default="auto", help="auto picks Ascend, then GPU, then CPU")
    run.add_argument("--experiment", default="eval", help="Aim experiment of a new run")
    _add_staging(run)
    return parser


def get_predict_args_parser():
    """predict.py's flags: the trained model, the images, where the predictions go."""
    parser = _OneLineErrors(
        description="Label images with a model that train.py produced: predictions.csv and predictions.jsonl with "
                    "the top-k classes and probabilities of every image.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    io = parser.add_argument_group("inputs and outputs")
    _add_model(io)
    io.add_argument("--data_url", "--data_path", dest="data_url", required=True,
                    help="images: a folder (searched recursively), an archive, or an obs:// / s3:// / http(s) URL")
    _add_output_folder(io, "predictions.csv, predictions.jsonl and unreadable.txt")
    run = parser.add_argument_group("run")
    run.add_argument("--top_k", type=_bounded(int, 1), default=5, help="classes per image")
    run.add_argument("--batch_size", type=_bounded(int, 1), default=64)
    run.add_argument("--device_target", type=_device, default="auto", help="auto picks Ascend, then GPU, then CPU")
    _add_staging(run)
    return parser


LAYERS = ("conv1", "norm", "layer1", "layer2", "layer3", "layer4", "fc")


def _layer_list(text):
    layers = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [layer for layer in layers if layer not in LAYERS]
    if not layers or unknown:
        raise argparse.ArgumentTypeError(f"'{text}': name layers from {', '.join(LAYERS)}")
    return layers


def _shown(item):
    """An unknown argument as a log may show it: a misspelt location flag may carry a signed URL."""
    flag, sep, value = item.partition("=") if item.startswith("-") else ("", "", item)
    return flag + sep + redact(value)


def _one_output(args, warn):
    """One output folder from the three names it arrives under. The platform collects --output_path, so that one
    wins; a different --output_url or --train_url beside it is named in a warning."""
    given = {flag: value for flag, value in (("output_path", args.output_path), ("output_url", args.output_url),
                                             ("train_url", args.train_url)) if value}  # an empty one names nothing
    chosen = next(iter(given.values()), "output")
    others = [f"--{flag} {redact(value)}" for flag, value in given.items() if value.rstrip("/") != chosen.rstrip("/")]
    if others:
        warn(f"warning: writing the outputs to --{next(iter(given))} {redact(chosen)}, not to "
             f"{' or '.join(others)}")
    args.output_url = chosen
    del args.output_path, args.train_url


def parse_args(argv=None, warn=None, parser=None):
    """Parse known flags (train.py's, or `parser`'s); warn once about the rest and ignore them."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    args, unknown = (parser or get_args_parser()).parse_known_args(argv)
    if unknown:
        warn(f"warning: ignoring unknown arguments: {' '.join(map(_shown, unknown))}")
    _one_output(args, warn)
    return args
