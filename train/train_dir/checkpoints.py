"""Reading ResNet checkpoints: the four published MindSpore families (tutorial, MindCV, mindvision, mindspore
models) and PyTorch's (torchvision, timm; files read by torch_weights.py) recognised by their parameter names, mapped
onto resnet.py's names and padding, and loaded shape by shape."""
import re
from dataclasses import dataclass, field

import mindspore as ms
import numpy as np

import torch_weights
from errors import UserError
from resnet import ARCHS, HEAD_PREFIX, PADDINGS, Bottleneck


def read_checkpoint(path):
    """Parameters of a weights file (a MindSpore .ckpt, PyTorch's formats, or a folder holding one) as a dict of
    Parameters, or a UserError naming the file."""
    path = torch_weights.weights_file(path)
    if torch_weights.is_torch_weights(path):
        return {name: ms.Parameter(ms.Tensor(value), name=name)
                for name, value in torch_weights.read_arrays(path).items()}
    try:
        return ms.load_checkpoint(str(path))
    except Exception as exc:  # MindSpore raises ValueError/RuntimeError with multi-line text
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is not a readable MindSpore checkpoint ({first_line})") from None


OPTIMIZER_STATE = ("moments.", "accum.", "learning_rate", "global_step", "momentum", "scale_sense",
                   "current_iterator_step", "epoch_num", "step_num")
PADDING_KEY = "resnet_padding"


def _is_bookkeeping(name):
    """Optimizer state, and PyTorch's count of BatchNorm updates: no weights."""
    return name.startswith(OPTIMIZER_STATE) or name.endswith(".num_batches_tracked")


@dataclass(frozen=True)
class Family:
    """A published naming of ResNet parameters: how to recognise it, how its names map to ours, its padding."""
    name: str
    marker: str              # a regular expression only this family's names match
    renames: tuple           # (pattern, replacement) pairs applied in order, mapping its names to ours
    padding: str


BN = r"(gamma|beta|moving_mean|moving_variance)"
BN_RENAMES = ((r"^bn1\.", "norm."), (r"^(layer\d\.\d+)\.bn(\d)\.", r"\1.norm\2."))  # MindCV, models
FAMILIES = (
    # mindvision (the Xihe ResNet50 sample's resnet50_224.ckpt): backbone.* with ConvNormActivation "features"
    Family("mindvision", r"^backbone\.conv1\.features\.0\.weight$", (
        (r"^backbone\.conv1\.features\.0\.", "conv1."),
        (r"^backbone\.conv1\.features\.1\.", "norm."),
        (r"^backbone\.(layer\d\.\d+)\.conv(\d)\.features\.0\.", r"\1.conv\2."),
        (r"^backbone\.(layer\d\.\d+)\.conv(\d)\.features\.1\.", r"\1.norm\2."),
        (r"^backbone\.(layer\d\.\d+)\.down_sample\.features\.(\d)\.", r"\1.down_sample.\2."),
        (r"^head\.dense\.", "fc."),
    ), "explicit"),
    # mindspore models, official/cv/ResNet (1001 classes): bn*, down_sample_layer, end_point; "same" padding
    Family("mindspore-models", r"(down_sample_layer\.|^end_point\.)", BN_RENAMES + (
        (r"\.down_sample_layer\.", ".down_sample."),
        (r"^end_point\.", "fc."),
    ), "same"),
    # MindCV (resnet50-e0733ab8.ckpt): bn*, down_sample, classifier; explicit padding
    Family("mindcv", rf"^(classifier\.weight|bn1\.{BN})$", BN_RENAMES + (
        (r"^classifier\.", "fc."),
    ), "explicit"),
    # the MindSpore tutorial (resnet50_224_new.ckpt), and this code's own checkpoints
    Family("tutorial", rf"^(norm\.{BN}|layer1\.0\.norm1\.{BN})$", (), "same"),
    # torchvision and timm (resnet50-11ad3fa6.pth, timm/resnet50.a1_in1k): bn*.weight/bias/running_*, downsample
    Family("torchvision/timm", r"^(bn1\.running_mean|layer\d\.0\.downsample\.0\.weight)$", (
        (r"^(bn1|layer\d\.\d+\.bn\d|layer\d\.\d+\.downsample\.1)\.weight$", r"\1.gamma"),
        (r"^(bn1|layer\d\.\d+\.bn\d|layer\d\.\d+\.downsample\.1)\.bias$", r"\1.beta"),
        (r"\.running_mean$", ".moving_mean"),
        (r"\.running_var$", ".moving_variance"),
        (r"\.downsample\.", ".down_sample."),
    ) + BN_RENAMES, "pytorch"),
)
STRICT_FAMILIES = ("torchvision/timm",)  # one layout: every backbone tensor must find its place


def checkpoint_family(names):
    """The Family whose marker the checkpoint's names match, or None."""
    for family in FAMILIES:
        if any(re.search(family.marker, name) for name in names):
            return family
    return None


def to_our_names(params, path):
    """(family, padding, {our name: value}) for a checkpoint of any known family; optimizer state dropped."""
    weights = {n: v for n, v in params.items() if not _is_bookkeeping(n) and n != PADDING_KEY}
    family = checkpoint_family(weights)
    if family is None:
        raise UserError(f"{path} is not a ResNet checkpoint of a known family (tutorial, MindCV, mindvision, "
                        f"mindspore models, torchvision, timm): e.g. {next(iter(weights), 'no parameters')}")
    padding = family.padding
    if PADDING_KEY in params:  # written by this code, e.g. after fine-tuning from MindCV weights
        padding = str(params[PADDING_KEY])
        if padding not in PADDINGS:
            raise UserError(f"{path} records a padding this code does not know ({padding[:40]!r})")
    renamed = {}
    for name, value in weights.items():
        for pattern, replacement in family.renames:
            name = re.sub(pattern, replacement, name)
        renamed[name] = value
    return family, padding, renamed


@dataclass(frozen=True)
class Pretrained:
    """A checkpoint read once: its family, the padding its weights were trained with, and the weights in our names;
    `config` is what timm's config.json beside them says (architecture, tag, mean, std), if there is one."""
    path: str
    family: Family
    padding: str
    weights: dict
    config: dict = field(default_factory=dict)


def read_pretrained(path):
    config = torch_weights.folder_config(path)
    if config.get("architecture") and config["architecture"] not in ARCHS:
        raise UserError(f"{path}: its config.json names {config['architecture']}, not one of this code's ResNets "
                        f"({', '.join(ARCHS)} in torchvision's layout)")
    pretrained = Pretrained(path, *to_our_names(read_checkpoint(path), path), config=config)
    check_finite(pretrained.weights, path)
    return pretrained


def weights_arch(names):
    """The ARCHS entry whose blocks a set of our parameter names has (e.g. "resnet18"), or None."""
    blocks = {}
    for name in names:
        found = re.match(r"layer(\d)\.(\d+)\.", name)
        if found:
            blocks[int(found[1])] = max(blocks.get(int(found[1]), 0), int(found[2]) + 1)
    bottleneck = any(re.match(r"layer\d\.\d+\.conv3\.", name) for name in names)
    counts = tuple(blocks.get(layer, 0) for layer in (1, 2, 3, 4))
    return next((arch for arch, (block, layer_counts) in ARCHS.items()
                 if layer_counts == counts and (block is Bottleneck) == bottleneck), None)


def check_finite(weights, path):
    """NaN or infinite weights would train to NaN and be saved as if fine: refuse them, naming one."""
    for name, value in weights.items():
        array = value.asnumpy() if hasattr(value, "asnumpy") else None  # strings and scalars recorded beside
        if array is not None and np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise UserError(f"{path} holds NaN or infinite values (e.g. in {name}): the weights are damaged")


def checkpoint_padding(path):
    """The padding a checkpoint's weights were trained with (by its family, or as this code recorded it)."""
    return read_pretrained(path).padding


def load_pretrained(net, pretrained, log=print):
    """Load every parameter of `pretrained` (a path, or a checkpoint already read by `read_pretrained`, of any
    known family) whose name and shape match `net`; re-initialise a head of another size. The network must have
    been built with the checkpoint's padding.

    Stops with a UserError when less than half of the backbone matched, because training on would
    silently start from scratch.
    """
    if not isinstance(pretrained, Pretrained):
        pretrained = read_pretrained(pretrained)
    path, family, padding, ckpt = pretrained.path, pretrained.family, pretrained.padding, pretrained.weights
    if padding != net.padding:
        raise UserError(f"{path} was trained with {padding} padding but the network uses {net.padding}")
    own = {name: param for name, param in net.parameters_and_names()}
    theirs, ours = weights_arch(ckpt), weights_arch(own)
    if theirs and ours and theirs != ours:
        raise UserError(f"{path} does not fit this architecture ({ours}): it holds {theirs} weights, "
                        f"add --arch {theirs}")
    loaded, skipped = {}, []
    for name, value in ckpt.items():
        param = own.get(name)
        if param is None:
            skipped.append(f"{name} (not in {type(net).__name__})")
        elif tuple(value.shape) != tuple(param.shape):
            skipped.append(f"{name} (shape {tuple(value.shape)} != {tuple(param.shape)})")
        else:
            loaded[name] = value
    backbone = [n for n in own if not n.startswith(HEAD_PREFIX)]
    matched = sum(n in loaded for n in backbone)
    misfits = [line for line in skipped if not line.startswith(HEAD_PREFIX)]
    if family.name in STRICT_FAMILIES and (misfits or matched < len(backbone)):
        example = misfits[0] if misfits else f"{next(n for n in backbone if n not in loaded)} (missing)"
        raise UserError(f"{path} is a {family.name} network that does not fit this architecture: "
                        f"{len(misfits)} of its backbone tensors have no place here and {len(backbone) - matched} "
                        f"of ours are missing, e.g. {example} (variants such as timm's resnet50d are not "
                        f"torchvision's layout)")
    if matched < len(backbone) / 2:
        raise UserError(f"{path} does not fit this architecture: only {matched} of {len(backbone)} "
                        f"backbone parameters match by name and shape")
    ms.load_param_into_net(net, loaded, strict_load=False)
    head_kept = all(n in loaded for n in own if n.startswith(HEAD_PREFIX))
    missing = [n for n in backbone if n not in loaded]
    described = " ".join(filter(None, (pretrained.config.get("architecture"), pretrained.config.get("tag"))))
    log(f"pretrained: loaded {len(loaded)} of {len(own)} parameters from {path} ({family.name} checkpoint"
        f"{f' of {described}' if described else ''}, {padding} padding); {matched}/{len(backbone)} backbone, "
        f"head {'loaded' if head_kept else 're-initialised'}")
    for line in skipped:
        log(f"pretrained: skipped {line}")
    for name in missing:
        log(f"pretrained: not in the checkpoint, left initialised: {name}")
    return len(loaded), skipped
