"""PyTorch's ResNets from torchvision's own code: the speed reference of bench/speed.py, and the source of the weights
tests/torch_models.py writes.

requirements.txt pins PyTorch's CPU build (2.13.0+cpu, 0.75 GB installed instead of the CUDA build's 5.5 GB) beside
PyPI's torchvision 0.28.0, which is built against the CUDA build: its C++ ops (detection's nms, roi_align, ...) do not
load beside the CPU build, and `import torchvision` then fails registering fake kernels for two of them ("operator
torchvision::nms does not exist"). Declaring those two first lets the import through; ResNets use none of the ops.
Where the C++ ops load (the CUDA build, or a matching CPU torchvision), nothing is declared."""
import glob
import importlib.util
import os

import torch

# the two ops torchvision/_meta_registrations.py registers without checking that its library loaded
UNGUARDED_OPS = {"nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                 "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"}


def import_torchvision():
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        raise ImportError("torchvision is not installed (requirements.txt pins it: make venv)")
    libraries = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so"))
    try:
        torch.ops.load_library(libraries[0])
    except (IndexError, OSError):
        for name, schema in UNGUARDED_OPS.items():
            if not _op_declared(name):  # a second call
                torch.library.define(f"torchvision::{name}", schema)
    import torchvision
    return torchvision


def _op_declared(name):
    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def create_model(arch, num_classes):
    return getattr(import_torchvision().models, arch)(num_classes=num_classes)


if __name__ == "__main__":
    model = create_model("resnet50", 1000)
    print(sum(p.numel() for p in model.parameters()), torch.__version__, import_torchvision().__version__)
