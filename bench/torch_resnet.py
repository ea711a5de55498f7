"""The same ResNet as train/train_dir/resnet.py, in PyTorch, as the speed reference (torchvision cannot be
installed beside the CPU torch wheel here, so the architecture is written out: torchvision's ResNet v1.5)."""
import torch
from torch import nn

LAYOUTS = {"resnet18": (False, (2, 2, 2, 2)), "resnet34": (False, (3, 4, 6, 3)),
           "resnet50": (True, (3, 4, 6, 3)), "resnet101": (True, (3, 4, 23, 3))}


def conv_norm(in_channel, out_channel, kernel_size, stride=1, relu=True):
    layers = [nn.Conv2d(in_channel, out_channel, kernel_size, stride, kernel_size // 2, bias=False),
              nn.BatchNorm2d(out_channel)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class Block(nn.Module):
    def __init__(self, in_channel, channel, stride, bottleneck):
        super().__init__()
        out_channel = channel * (4 if bottleneck else 1)
        if bottleneck:
            self.body = nn.Sequential(conv_norm(in_channel, channel, 1), conv_norm(channel, channel, 3, stride),
                                      conv_norm(channel, out_channel, 1, relu=False))
        else:
            self.body = nn.Sequential(conv_norm(in_channel, channel, 3, stride),
                                      conv_norm(channel, channel, 3, relu=False))
        self.down_sample = (conv_norm(in_channel, out_channel, 1, stride, relu=False)
                            if stride != 1 or in_channel != out_channel else nn.Identity())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.down_sample(x))


class ResNet(nn.Module):
    def __init__(self, arch, num_classes):
        super().__init__()
        bottleneck, counts = LAYOUTS[arch]
        layers, in_channel = [conv_norm(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1)], 64
        for i, (channel, count) in enumerate(zip((64, 128, 256, 512), counts)):
            for j in range(count):
                layers.append(Block(in_channel, channel, 2 if i > 0 and j == 0 else 1, bottleneck))
                in_channel = channel * (4 if bottleneck else 1)
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(in_channel, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


def create_model(arch, num_classes):
    return ResNet(arch, num_classes)


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    print(parameter_count(create_model("resnet50", 1000)), torch.__version__)
