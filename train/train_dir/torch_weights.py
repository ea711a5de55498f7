"""Weights saved by PyTorch, torchvision, timm and Hugging Face, read as NumPy arrays without MindSpore.

- `.safetensors` (timm's and Hugging Face's `model.safetensors`): read with the safetensors package, no PyTorch.
- `.pth`, `.pt`, `.bin` (torchvision's downloads, `pytorch_model.bin`) are Python pickles, and unpickling runs
  whatever code the file names. They are read only with `torch.load(weights_only=True)`, PyTorch's restricted
  unpickler, which builds tensors and plain containers and refuses anything else. Where PyTorch is not installed
  (the cloud images), they are refused, never read with a full unpickler: convert them once where PyTorch is,

      python torch_weights.py resnet50-11ad3fa6.pth            # writes resnet50-11ad3fa6.safetensors

- a folder (a Hugging Face download such as timm/resnet50.a1_in1k): its `model.safetensors`, else its
  `pytorch_model.bin`, with timm's `config.json` beside it naming the architecture and the normalisation.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

from errors import UserError

SAFETENSORS = ".safetensors"
PICKLES = (".pth", ".pt", ".bin")
SUFFIXES = (SAFETENSORS, *PICKLES)
FOLDER_FILES = ("model.safetensors", "pytorch_model.bin")  # Hugging Face's names, the safe one first
WRAPPERS = ("state_dict", "model")  # training scripts save {"state_dict": ..., "epoch": ...}


def is_torch_weights(path):
    path = Path(path)
    return path.is_dir() or path.suffix.lower() in SUFFIXES


def weights_file(path):
    """The file of weights a path stands for: the path itself, or the one a Hugging Face folder holds."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in FOLDER_FILES:
        if (path / name).is_file():
            return path / name
    found = sorted(p.name for p in path.iterdir() if p.suffix.lower() in (*SUFFIXES, ".ckpt"))
    if len(found) == 1:
        return path / found[0]
    raise UserError(f"{path} is a folder without {' or '.join(FOLDER_FILES)}"
                    + (f", and holds several weight files ({', '.join(found[:4])}): name one" if found else ""))


def folder_config(path):
    """timm's config.json beside the weights ({} when there is none): architecture, mean, std, tag."""
    config_path = Path(path) / "config.json" if Path(path).is_dir() else None
    if config_path is None or not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{config_path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_path} is not a JSON object")
    if "architecture" not in config and config.get("architectures"):  # Hugging Face transformers' own models
        raise UserError(f"{config_path} describes a transformers model ({config['architectures'][0]}); only "
                        f"torchvision's and timm's ResNets load here (e.g. timm/resnet50.a1_in1k)")
    pretrained = config.get("pretrained_cfg") or {}
    return {"architecture": config.get("architecture"), "tag": pretrained.get("tag"),
            "mean": pretrained.get("mean"), "std": pretrained.get("std")}


def read_arrays(path):
    """{name: float32 or integer ndarray} from a safetensors file or a PyTorch pickle (a state dict, possibly
    wrapped in {"state_dict": ...} or saved from DataParallel with "module." names)."""
    path = Path(path)
    if path.suffix.lower() == SAFETENSORS:
        arrays = _read_safetensors(path)
    else:
        arrays = _read_pickle(path)
    if arrays and all(name.startswith("module.") for name in arrays):
        arrays = {name[len("module."):]: value for name, value in arrays.items()}
    return {name: value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value
            for name, value in arrays.items()}


def _read_safetensors(path):
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise UserError(f"reading {path} needs the safetensors package (pip install safetensors; "
                        f"pip-requirements.txt installs it in the cloud)") from None
    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError, TypeError for bfloat16 (NumPy has no such type)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "bf16" in reason.lower() or "bfloat16" in reason.lower():
            reason += "; bfloat16 weights: convert them with PyTorch first (python torch_weights.py)"
        raise UserError(f"{path} is not a readable safetensors file ({reason})") from None


def _read_pickle(path):
    torch = _safe_torch()
    if torch is None:
        raise UserError(f"{path} is a PyTorch pickle, and reading one safely needs PyTorch, which is not installed "
                        f"here: convert it once where PyTorch is, with `python torch_weights.py {path.name}` "
                        f"(writes {path.stem}{SAFETENSORS}), and pass the .safetensors file instead")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, getattr(torch.serialization.pickle, "UnpicklingError", ())) or "weights_only" in reason:
            raise UserError(f"{path} holds Python objects besides tensors (a whole model, or a training state with "
                            f"its arguments?), which are not unpickled, as that could run any code: save "
                            f"model.state_dict() and pass that") from None
        raise UserError(f"{path} is not a readable PyTorch file ({reason})") from None
    for key in WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path} is not a state dict of tensors ({type(state).__name__})")
    return {name: (value.float() if value.is_floating_point() else value).detach().cpu().numpy()
            for name, value in state.items()}


def _safe_torch():
    """PyTorch, if it is installed and has the restricted unpickler (`weights_only`, 1.13 and later), else None."""
    try:
        import torch
    except ImportError:
        return None
    import inspect
    return torch if "weights_only" in inspect.signature(torch.load).parameters else None


def convert(source, target=None):
    """Write a PyTorch pickle's tensors (read with the restricted unpickler) as safetensors, names unchanged."""
    from safetensors.numpy import save_file
    source = Path(source)
    target = Path(target) if target else source.with_suffix(SAFETENSORS)
    if not source.exists():
        raise UserError(f"{source} does not exist")
    arrays = read_arrays(weights_file(source))
    partial = target.with_name(target.name + ".partial")
    try:
        save_file({name: np.ascontiguousarray(value) for name, value in arrays.items()}, str(partial),
                  metadata={"format": "pt", "converted_from": source.name})
        partial.replace(target)
    except BaseException as exc:  # a full disk or Ctrl-C leaves no half-written file behind
        partial.unlink(missing_ok=True)
        if isinstance(exc, Exception):  # OSError, or safetensors' own error for the same causes
            reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0]
            raise UserError(f"could not write {target}: {reason}") from None
        raise
    return target, len(arrays)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert PyTorch weights (.pth, .pt, .bin) to .safetensors, "
                                     "which train.py --pretrain_url reads without PyTorch.")
    parser.add_argument("source", help="a .pth/.pt/.bin state dict, or a folder holding pytorch_model.bin")
    parser.add_argument("target", nargs="?", help="the .safetensors to write (default: beside the source)")
    args = parser.parse_args(argv)
    try:
        if _safe_torch() is None:
            raise UserError("converting a PyTorch pickle safely needs PyTorch 1.13 or later (pip install torch)")
        target, count = convert(args.source, args.target)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {count} tensors to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
