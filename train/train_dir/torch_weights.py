"""Weights saved by PyTorch, torchvision, timm and Hugging Face, read as NumPy arrays without MindSpore.

- `.safetensors` (timm's and Hugging Face's `model.safetensors`): read with the safetensors package, no PyTorch.
- `.pth`, `.pt`, `.bin` (torchvision's downloads, `pytorch_model.bin`) are Python pickles, and unpickling runs
  whatever code the file names. They are read only with `torch.load(weights_only=True)`, PyTorch's restricted
  unpickler, which builds tensors and plain containers and refuses anything else. Where PyTorch is not installed
  (the cloud images), they are refused, never read with a full unpickler: convert them once where PyTorch is,

      python torch_weights.py resnet50-11ad3fa6.pth            # writes resnet50-11ad3fa6.safetensors
      python torch_weights.py resnet50.a1_in1k/                # a folder: writes model.safetensors in it

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
WRAPPERS = ("state_dict", "model_state_dict", "model")  # training scripts save {"state_dict": ..., "epoch": ...}


def is_torch_weights(path):
    path = Path(path)
    return path.is_dir() or path.suffix.lower() in SUFFIXES


def model_folder(path):
    """A folder as downloaded, or the one folder inside it (an archive of a Hugging Face download)."""
    path = Path(path)
    if path.is_dir():
        entries = [p for p in path.iterdir() if not p.name.startswith(".")]
        if len(entries) == 1 and entries[0].is_dir():
            return entries[0]
    return path


def weights_file(path):
    """The file of weights a path stands for: the path itself, or the one a Hugging Face folder holds (its
    model.safetensors, else its only .safetensors, else its pytorch_model.bin, else its only weights file)."""
    path = model_folder(path)
    if not path.is_dir():
        return path
    files = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix.lower() in (*SUFFIXES, ".ckpt"))
    safe = [name for name in files if name.lower().endswith(SAFETENSORS)]
    for choice in (["model.safetensors"], safe, ["pytorch_model.bin"], files):
        present = [name for name in choice if name in files]
        if len(present) == 1:
            return path / present[0]
    raise UserError(f"{path} is a folder without {' or '.join(FOLDER_FILES)}"
                    + (f", and holds several weight files ({', '.join(files[:4])}): name one" if files else ""))


def folder_config(path):
    """timm's config.json beside the weights ({} when there is none): architecture, tag, mean, std."""
    folder = model_folder(path)
    config_path = folder / "config.json" if folder.is_dir() else None
    if config_path is None or not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{config_path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_path} is not a JSON object")
    if "architecture" not in config and config.get("architectures"):  # Hugging Face transformers' own models
        names = config["architectures"]
        named = ", ".join(map(str, names)) if isinstance(names, list) else str(names)
        raise UserError(f"{config_path} describes a transformers model ({named[:80]}); only "
                        f"torchvision's and timm's ResNets load here (e.g. timm/resnet50.a1_in1k)")
    pretrained = config.get("pretrained_cfg") or {}
    found = {"architecture": config.get("architecture"), "tag": pretrained.get("tag") if isinstance(pretrained, dict)
             else None, "mean": None, "std": None}
    if not isinstance(pretrained, dict) or not isinstance(found["architecture"], (str, type(None))) \
            or not isinstance(found["tag"], (str, type(None))):
        raise UserError(f"{config_path} is not timm's config.json (architecture a name, pretrained_cfg an object)")
    for key in ("mean", "std"):
        value = pretrained.get(key)
        if value is not None and not (isinstance(value, list) and len(value) == 3
                                      and all(isinstance(v, (int, float)) for v in value)):
            raise UserError(f"{config_path}: pretrained_cfg.{key} is not three numbers ({str(value)[:60]})")
        found[key] = value
    return found


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
        reason = _first_line(exc)
        if "bf16" in reason.lower() or "bfloat16" in reason.lower():
            reason += (f"; bfloat16 weights: convert them to float32 once where PyTorch is, with "
                       f"`python torch_weights.py {path.name}` (writes {path.stem}-float32{SAFETENSORS})")
        raise UserError(f"{path} is not a readable safetensors file ({reason})") from None


def _first_line(exc):
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _looks_like(path):
    """What a file that is no pickle may be: "a web page" or "a safetensors file", else None."""
    with open(path, "rb") as file:
        head = file.read(16)
    if head.lstrip()[:1] == b"<":
        return "a web page"
    if len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000:
        return "a safetensors file"
    return None


def _read_pickle(path):
    looks_like = _looks_like(path)
    if looks_like:
        raise UserError(f"{path} is {looks_like}, not PyTorch weights"
                        + (" (for Hugging Face, download the file's resolve/ URL, not its page)"
                           if looks_like == "a web page" else f": name it {path.stem}{SAFETENSORS}"))
    torch = _safe_torch()
    if torch is None:
        source, target = ((path.parent.name, f"{path.parent.name}/model{SAFETENSORS}")
                          if path.name == "pytorch_model.bin" else (path.name, f"{path.stem}{SAFETENSORS}"))
        raise UserError(f"{path} is a PyTorch pickle, and reading one safely needs PyTorch, which is not installed "
                        f"here: convert it once where PyTorch is, with `python torch_weights.py {source}` "
                        f"(writes {target}), and pass the .safetensors file instead")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "global" in text.lower():  # the restricted unpickler met a class or function: code or objects
            raise UserError(f"{path} holds Python objects besides tensors (a whole model, or a training state with "
                            f"its arguments?), which are not unpickled, as that could run any code: save "
                            f"model.state_dict() and pass that") from None
        if "weights only load failed" in text.lower():
            detail = next((line.strip() for line in text.splitlines() if "Unsupported" in line), _first_line(exc))
            raise UserError(f"{path} is a pickle that PyTorch's restricted unpickler does not read ({detail[:120]}), "
                            f"and it is not unpickled otherwise, as that could run any code") from None
        raise UserError(f"{path} is not a readable PyTorch file ({_first_line(exc)[:200]})") from None
    for key in WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state:
        raise UserError(f"{path} is not a state dict of tensors ({type(state).__name__})")
    others = [f"{name} ({type(value).__name__})" for name, value in state.items() if not torch.is_tensor(value)]
    if others:
        raise UserError(f"{path} is not a state dict of tensors: it holds {', '.join(others[:4])}"
                        + ("" if any(torch.is_tensor(v) for v in state.values()) else
                           f"; none of {', '.join(WRAPPERS)} holds the weights"))
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


def default_target(source):
    """Beside the source: `x.pth` -> `x.safetensors`; a folder -> its model.safetensors (beside its config.json);
    `x.safetensors` (bfloat16) -> `x-float32.safetensors`."""
    source = Path(source)
    if source.is_dir():
        return model_folder(source) / f"model{SAFETENSORS}"
    if source.suffix.lower() == SAFETENSORS:
        return source.with_name(f"{source.stem}-float32{SAFETENSORS}")
    return source.with_suffix(SAFETENSORS)


def convert(source, target=None):
    """Write a PyTorch pickle's tensors (read with the restricted unpickler), or a bfloat16 safetensors file's, as
    float32 safetensors, names unchanged. Never overwrites a file."""
    from safetensors.numpy import save_file
    source = Path(source)
    if not source.exists():
        raise UserError(f"{source} does not exist")
    weights = weights_file(source)
    target = Path(target) if target else default_target(source)
    if target.suffix.lower() != SAFETENSORS:
        raise UserError(f"{target}: the converted weights are safetensors: name the file *{SAFETENSORS}")
    if target.exists():
        raise UserError(f"{target} exists already (remove it, or name another target)")
    if weights.suffix.lower() == SAFETENSORS:  # only bfloat16 needs this: NumPy has no such type
        from safetensors.torch import load_file
        arrays = {name: (t.float() if t.is_floating_point() else t).numpy() for name, t in
                  load_file(str(weights)).items()}
    else:
        arrays = read_arrays(weights)
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
    parser = argparse.ArgumentParser(description="Convert PyTorch weights (.pth, .pt, .bin, bfloat16 .safetensors) "
                                     "to float32 .safetensors, which train.py --pretrain_url reads without PyTorch.")
    parser.add_argument("source", help="a .pth/.pt/.bin state dict, or a folder holding pytorch_model.bin")
    parser.add_argument("target", nargs="?", help="the .safetensors to write (default: beside the source, or "
                        "model.safetensors in a source folder)")
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
