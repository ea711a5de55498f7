"""The ResNet family, with the MindSpore tutorial's parameter names, and pretrained-weight loading.

Parameter names follow the tutorial so that its checkpoints load unchanged:
`conv1`, `norm`, `layerN.i.conv1..3`, `layerN.i.norm1..3`, `layerN.i.down_sample.0/1`, `fc`.
Two tutorial bugs are fixed: the basic block's conv2 takes `out_channel` inputs and has its own norm,
and the classifier uses global average pooling, so any input size works.
"""
import mindspore as ms
import mindspore.nn as nn
import mindspore.ops as ops
from mindspore.common.initializer import HeNormal

from errors import UserError

HEAD_PREFIX = "fc."


def _conv(in_channel, out_channel, kernel_size, stride=1):
    # He init (the tutorial's N(0, 0.02) makes from-scratch training of deep nets diverge)
    return nn.Conv2d(in_channel, out_channel, kernel_size=kernel_size, stride=stride,
                     weight_init=HeNormal(mode="fan_out", nonlinearity="relu"))


def _norm(channel, last_in_block=False):
    # A residual block's last norm starts at zero, so every block starts as the identity (Goyal et al. 2017)
    return nn.BatchNorm2d(channel, gamma_init="zeros" if last_in_block else "ones")


class BasicBlock(nn.Cell):
    """Two 3x3 convolutions (ResNet18/34)."""
    expansion = 1

    def __init__(self, in_channel, out_channel, stride=1, down_sample=None):
        super().__init__()
        self.conv1 = _conv(in_channel, out_channel, 3, stride)
        self.norm1 = _norm(out_channel)
        self.conv2 = _conv(out_channel, out_channel, 3)
        self.norm2 = _norm(out_channel, last_in_block=True)
        self.relu = nn.ReLU()
        self.down_sample = down_sample

    def construct(self, x):
        identity = x if self.down_sample is None else self.down_sample(x)
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Cell):
    """1x1 -> 3x3 (strided) -> 1x1 with 4x expansion (ResNet50/101)."""
    expansion = 4

    def __init__(self, in_channel, out_channel, stride=1, down_sample=None):
        super().__init__()
        self.conv1 = _conv(in_channel, out_channel, 1)
        self.norm1 = _norm(out_channel)
        self.conv2 = _conv(out_channel, out_channel, 3, stride)
        self.norm2 = _norm(out_channel)
        self.conv3 = _conv(out_channel, out_channel * self.expansion, 1)
        self.norm3 = _norm(out_channel * self.expansion, last_in_block=True)
        self.relu = nn.ReLU()
        self.down_sample = down_sample

    def construct(self, x):
        identity = x if self.down_sample is None else self.down_sample(x)
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.relu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return self.relu(out + identity)


def _make_layer(in_channel, block, channel, block_count, stride=1):
    out_channel = channel * block.expansion
    down_sample = None
    if stride != 1 or in_channel != out_channel:
        down_sample = nn.SequentialCell([
            _conv(in_channel, out_channel, 1, stride),
            _norm(out_channel),
        ])
    blocks = [block(in_channel, channel, stride=stride, down_sample=down_sample)]
    blocks += [block(out_channel, channel) for _ in range(1, block_count)]
    return nn.SequentialCell(blocks)


class ResNet(nn.Cell):
    def __init__(self, block, layer_counts, num_classes):
        super().__init__()
        self.conv1 = _conv(3, 64, 7, stride=2)
        self.norm = _norm(64)
        self.relu = nn.ReLU()
        self.max_pool = nn.MaxPool2d(kernel_size=3, stride=2, pad_mode="same")
        self.layer1 = _make_layer(64, block, 64, layer_counts[0])
        self.layer2 = _make_layer(64 * block.expansion, block, 128, layer_counts[1], stride=2)
        self.layer3 = _make_layer(128 * block.expansion, block, 256, layer_counts[2], stride=2)
        self.layer4 = _make_layer(256 * block.expansion, block, 512, layer_counts[3], stride=2)
        self.num_features = 512 * block.expansion
        self.fc = nn.Dense(self.num_features, num_classes)

    def features(self, x):
        x = self.max_pool(self.relu(self.norm(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return ops.mean(x, axis=(2, 3))  # global average pooling: any input size

    def construct(self, x):
        return self.fc(self.features(x))

    def freeze_backbone(self):
        """Fixed-feature mode: only `fc` trains, and BatchNorm keeps its moving statistics untouched."""
        for name, param in self.parameters_and_names():
            if not name.startswith(HEAD_PREFIX):
                param.requires_grad = False
        for _, cell in self.cells_and_names():
            if isinstance(cell, nn.BatchNorm2d):
                cell.use_batch_statistics = False


ARCHS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


def create_model(arch, num_classes):
    block, layer_counts = ARCHS[arch]
    return ResNet(block, layer_counts, num_classes)


def read_checkpoint(path):
    """Parameters of a .ckpt file as a dict, or a UserError naming the file."""
    try:
        return ms.load_checkpoint(str(path))
    except Exception as exc:  # MindSpore raises ValueError/RuntimeError with multi-line text
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is not a readable MindSpore checkpoint ({first_line})") from None


OPTIMIZER_STATE = ("moments.", "accum.", "learning_rate", "global_step", "momentum", "scale_sense",
                   "current_iterator_step")


def _is_optimizer_state(name):
    return name.startswith(OPTIMIZER_STATE)


def load_pretrained(net, path, log=print):
    """Load every parameter of `path` whose name and shape match `net`; re-initialise a head of another size.

    Stops with a UserError when less than half of the backbone matched, because training on would
    silently start from scratch.
    """
    ckpt = read_checkpoint(path)
    own = {name: param for name, param in net.parameters_and_names()}
    loaded, skipped = {}, []
    for name, value in ckpt.items():
        param = own.get(name)
        if _is_optimizer_state(name):
            continue
        if param is None:
            skipped.append(f"{name} (not in {type(net).__name__})")
        elif tuple(value.shape) != tuple(param.shape):
            skipped.append(f"{name} (shape {tuple(value.shape)} != {tuple(param.shape)})")
        else:
            loaded[name] = value
    backbone = [n for n in own if not n.startswith(HEAD_PREFIX)]
    matched = sum(n in loaded for n in backbone)
    if matched < len(backbone) / 2:
        raise UserError(f"{path} does not fit this architecture: only {matched} of {len(backbone)} "
                        f"backbone parameters match by name and shape")
    ms.load_param_into_net(net, loaded, strict_load=False)
    head_kept = all(n in loaded for n in own if n.startswith(HEAD_PREFIX))
    log(f"pretrained: loaded {len(loaded)} of {len(own)} parameters from {path}; "
        f"{matched}/{len(backbone)} backbone, head {'loaded' if head_kept else 're-initialised'}")
    for line in skipped:
        log(f"pretrained: skipped {line}")
    return len(loaded), skipped
