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
                    help="weights to start from (e.g. ImageNet's), local, obs://, s3:// or http(s)://: a MindSpore "
                         ".ckpt (tutorial, MindCV, mindvision, mindspore models), torchvision's or timm's .pth/.bin "
                         "(needs PyTorch, else convert with torch_weights.py) or .safetensors, or a Hugging Face "
                         "folder of timm weights; a head of another size is re-initialised")
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

    _add_recipe_flags(parser)

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
    run.add_argument("--export_onnx", type=str2bool, nargs="?", const=True, default=True,
                     help="also export the best model as ONNX, checked against MindSpore with onnxruntime when it "
                          "is installed")
    run.add_argument("--export_air", type=str2bool, nargs="?", const=True, default=None,
                     help="also export the best model as AIR, for Ascend deployment (default: on Ascend; it needs "
                          "an Ascend device)")
    _add_staging(run)
    run.add_argument("--overwrite", type=str2bool, nargs="?", const=True, default=False,
                     help="allow a new run into an output folder that holds another run's outputs (they are "
                          "replaced once the new run has finished an epoch); without it such a folder is refused "
                          "unless --resume continues that run")
    return parser


# Named recipes: each sets a group of flags; a flag given explicitly still wins. Values and their sources:
RECIPES = {
    # The MindSpore 2.x ResNet50 tutorial (CIFAR-10 at 32x32, from ImageNet weights): 5 epochs of batch 256, momentum
    # SGD 0.9 with a cosine schedule peaking at 0.001 (it ends at 1e-5, ours at 0), no weight decay, no warmup.
    "tutorial": {"epochs": 5, "batch_size": 256, "image_size": 32, "optimizer": "momentum", "lr": 0.001,
                 "momentum": 0.9, "weight_decay": 0.0, "lr_schedule": "cosine", "warmup_epochs": 0.0},
    # MindCV's configs/resnet/resnet_50_ascend.yaml: 120 epochs, 8 devices x batch 32, lr 0.1 for that global batch
    # (our --lr is per device and scaled by the device count: 0.0125), cosine, no warmup, momentum 0.9, weight decay
    # 1e-4 off BatchNorm and biases, label smoothing 0.1, random resized crop and flip at 224.
    "mindcv": {"epochs": 120, "batch_size": 32, "image_size": 224, "optimizer": "momentum", "lr": 0.0125,
               "momentum": 0.9, "weight_decay": 1e-4, "lr_schedule": "cosine", "warmup_epochs": 0.0,
               "label_smoothing": 0.1},
    # Ours, for fine-tuning pretrained weights on a few hundred to a few thousand images: a short warmup, the
    # backbone at a tenth of the head's rate, label smoothing and TrivialAugment against over-fitting (the
    # regularisers of torchvision's and timm's recipes that help on small data), and a stop when validation
    # accuracy has not improved for 5 epochs (not the loss: against smoothed targets it bottoms out early).
    "finetune": {"epochs": 30, "optimizer": "momentum", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4,
                 "backbone_lr_scale": 0.1, "lr_schedule": "cosine", "warmup_epochs": 1.0, "label_smoothing": 0.1,
                 "auto_augment": "trivialaugment", "early_stop": 5},
}
MONITORS = ("val_accuracy", "val_loss", "val_macro_f1")


def _add_recipe_flags(parser):
    recipe = parser.add_argument_group("recipe (regularisers, optimiser, schedule, stopping)")
    recipe.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                        help="a named group of settings (see README: Recipes); flags given explicitly win")
    recipe.add_argument("--optimizer", choices=("momentum", "adamw"), default="momentum",
                        help="momentum SGD (--momentum), or AdamW (decoupled weight decay)")
    recipe.add_argument("--lr_schedule", choices=("cosine", "step", "constant"), default="cosine",
                        help="after the warmup: cosine decay to 0, steps of x--lr_gamma every --lr_step_epochs, "
                             "or constant")
    recipe.add_argument("--lr_step_epochs", type=_bounded(float, 0.0, inclusive=False), default=None,
                        help="--lr_schedule step: epochs between decays; default: a third of the epochs after warmup")
    recipe.add_argument("--lr_gamma", type=_bounded(float, 0.0, inclusive=False, high=1.0, why="a decay"),
                        default=0.1, help="--lr_schedule step: the factor of each decay")
    recipe.add_argument("--label_smoothing", type=_bounded(float, 0.0, high=0.99, why="some weight on the label"),
                        default=0.0, help="the target puts 1 - s on the label and s spread over all classes")
    recipe.add_argument("--auto_augment", choices=("none", "randaugment", "trivialaugment", "autoaugment"),
                        default="none", help="a learned or random augmentation policy after crop and flip "
                                             "(mindspore.dataset.vision; autoaugment: its ImageNet policy)")
    recipe.add_argument("--random_erasing", type=_bounded(float, 0.0, high=1.0, why="a probability"), default=0.0,
                        help="probability of erasing a random rectangle of each training image (after normalising)")
    recipe.add_argument("--mixup", type=_bounded(float, 0.0), default=0.0,
                        help="alpha of mixup (batches of blended image pairs with blended labels); 0: off")
    recipe.add_argument("--cutmix", type=_bounded(float, 0.0), default=0.0,
                        help="alpha of cutmix (a patch of another image, labels by area); 0: off. With --mixup too, "
                             "each batch gets one of them at even odds")
    recipe.add_argument("--clip_grad_norm", type=_bounded(float, 0.0), default=0.0,
                        help="scale the gradients down when their global L2 norm exceeds this; 0: off")
    recipe.add_argument("--early_stop", type=_bounded(int, 0), default=0,
                        help="stop after this many epochs without improvement of --monitor; 0: off")
    recipe.add_argument("--min_delta", type=_bounded(float, 0.0), default=0.0,
                        help="the least change of --monitor that counts as an improvement")
    recipe.add_argument("--monitor", choices=MONITORS, default="val_accuracy",
                        help="what chooses the best epoch (its checkpoint is the one exported) and what "
                             "--early_stop watches")
    recipe.add_argument("--ema", type=_bounded(float, 0.0, high=0.999999, why="1 would never move"), default=0.0,
                        help="keep an exponential moving average of the weights with this decay (e.g. 0.999), and "
                             "validate, keep and export it instead of the raw weights; 0: off")
    recipe.add_argument("--accumulate", type=_bounded(int, 1, high=1000, why="updates would be too rare"),
                        default=1, help="sum the gradients of N steps into one update: the effective batch is N x "
                                        "--batch_size (x the devices), in the memory of one batch")
    recipe.add_argument("--keep_checkpoints", type=_bounded(int, 1, high=1000, why="each is a whole model"),
                        default=1, help="how many of the best epochs' checkpoints to keep (beside last and resume)")


def apply_recipe(args, argv, parser, say=print):
    """Set the flags of `args.recipe` that were not given explicitly, and say what it set."""
    if not getattr(args, "recipe", None):
        return args
    explicit = _explicit(parser, argv)
    chosen = {key: value for key, value in RECIPES[args.recipe].items() if key not in explicit}
    for key, value in chosen.items():
        setattr(args, key, value)
    kept = sorted(set(RECIPES[args.recipe]) & explicit)
    say(f"recipe {args.recipe}: " + ", ".join(f"{key} {value}" for key, value in chosen.items())
        + (f" (given explicitly: {', '.join(kept)})" if kept else ""))
    return args


def _explicit(parser, argv):
    """The destinations of the flags given on the command line (in any spelling: `--lr 1`, `--lr=1`, an alias)."""
    saved = {action.dest: action.default for action in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        given, _ = parser.parse_known_args(argv)
    finally:
        for action in parser._actions:
            action.default = saved[action.dest]
    return set(vars(given))


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
                       help="a .ckpt, .mindir or .onnx written by train.py, or a folder of its outputs (the best model "
                            "in it); local, obs://, s3:// or http(s)://; labels.json is read beside it")
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
    parser = parser or get_args_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        warn(f"warning: ignoring unknown arguments: {' '.join(map(_shown, unknown))}")
    _one_output(args, warn)
    return apply_recipe(args, sys.argv[1:] if argv is None else argv, parser)
