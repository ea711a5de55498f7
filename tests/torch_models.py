"""PyTorch's own ResNets (torchvision's and timm's code), with random weights, saved in every format they are
published in, with their logits on fixed inputs. Run in a separate interpreter (PyTorch and MindSpore never share a
test process):

    python torch_models.py OUT

writes the weights as .pth, .safetensors and Hugging Face folders (config.json + model.safetensors or
pytorch_model.bin), odd files users have (wrapped, whole-model and hostile pickles, a resnet18d), OUT/inputs.npz and
OUT/logits.npz ("<model>/<input size>").
"""
import pickle
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from torch_resnet import import_torchvision  # noqa: E402  (the CPU build's torchvision import, explained there)

torchvision = import_torchvision()
import timm  # noqa: E402  (imports torchvision)
from timm.models import save_for_hf  # noqa: E402


def non_trivial(model, seed):
    """BatchNorm scales and shifts drawn at random (timm starts each block's last scale at 0, which would hide a
    wrongly mapped branch), moving statistics moved by a few batches in train mode, a head with logits of a few
    units: equal logits then mean equal computation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0, 0.2, generator=generator)
        model.train()
        for _ in range(3):
            model(torch.randn(4, 3, 64, 64, generator=generator) * 2 + 0.5)
        model.fc.weight.normal_(0, 0.15, generator=generator)
    return model.eval()


class RunsACommand:
    """Unpickling this runs `touch MARKER`: what a hostile .pth does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def main(out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    models = {
        "torchvision-resnet50": torchvision.models.resnet50(num_classes=10),
        "timm-resnet50": timm.create_model("resnet50", num_classes=10),
        "torchvision-resnet18": torchvision.models.resnet18(num_classes=1000),
        "timm-resnet34": timm.create_model("resnet34", num_classes=7),
    }
    inputs = {"224": torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5)),
              "75": torch.randn(2, 3, 75, 75, generator=torch.Generator().manual_seed(6))}  # odd: pads differ
    logits = {}
    for seed, (name, model) in enumerate(models.items()):
        non_trivial(model, seed)
        with torch.no_grad():
            for size, images in inputs.items():
                logits[f"{name}/{size}"] = model(images).numpy()
    # torchvision's downloads are .pth state dicts; timm's Hugging Face layout is config.json beside
    # model.safetensors or pytorch_model.bin
    torch.save(models["torchvision-resnet50"].state_dict(), out / "torchvision-resnet50.pth")
    torch.save(models["torchvision-resnet18"].state_dict(), out / "torchvision-resnet18.pth")
    save_file(models["torchvision-resnet18"].state_dict(), str(out / "torchvision-resnet18.safetensors"))
    save_file({k: v.bfloat16() if v.is_floating_point() else v for k, v in
               models["torchvision-resnet18"].state_dict().items()}, str(out / "resnet18-bf16.safetensors"))
    save_for_hf(models["timm-resnet50"], out / "hf-timm-resnet50", safe_serialization=True,
                model_config={"pretrained_cfg": {"tag": "random", "mean": [0.485, 0.456, 0.406],
                                                 "std": [0.229, 0.224, 0.225]}})
    save_for_hf(models["timm-resnet34"], out / "hf-timm-resnet34-bin", safe_serialization=False,
                model_config={"pretrained_cfg": {"tag": "random", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}})
    # what users also have: a training script's wrapped DataParallel state, a whole pickled model, a hostile file
    resnet18 = models["torchvision-resnet18"].state_dict()
    torch.save({"epoch": 90, "state_dict": {f"module.{k}": v for k, v in resnet18.items()}},
               out / "wrapped-resnet18.pth")
    torch.save({"epoch": 3, "model_state_dict": resnet18, "optimizer_state_dict": {}}, out / "tutorial-style.pth")
    torch.save({**resnet18, "note": "trained on cats"}, out / "with-a-string.pth")
    torch.save(models["torchvision-resnet18"], out / "whole-model.pth")
    torch.save({"conv1.weight": resnet18["conv1.weight"], "payload": RunsACommand(out / "PWNED")},
               out / "hostile.pth")
    with open(out / "hostile-legacy.pth", "wb") as legacy:  # the pre-1.6 format: a bare pickle
        pickle.dump({"payload": RunsACommand(out / "PWNED")}, legacy)
    # a timm variant that is not torchvision's layout: deep stem, average-pool shortcut
    save_file(timm.create_model("resnet18d").state_dict(), str(out / "timm-resnet18d.safetensors"))
    np.savez(out / "inputs.npz", **{size: images.numpy() for size, images in inputs.items()})
    np.savez(out / "logits.npz", **logits)


if __name__ == "__main__":
    main(sys.argv[1])
