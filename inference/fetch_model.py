"""Put the model files named in inference/config.json into inference/, under their basenames, as Xihe's
inference pod does before it starts app.py.

    python inference/fetch_model.py --from job-work/resnet50-cifar10/train/output   # a training job's outputs
    python inference/fetch_model.py --hub HUB_DIR     # a local mirror of the hub: HUB_DIR/owner/repo/path

`model_path` entries are `owner/repo/path` strings naming files of a Xihe model repository.
"""
import argparse
import json
import sys
from pathlib import Path, PurePosixPath

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "train" / "train_dir"))

import storage  # noqa: E402
from errors import UserError  # noqa: E402

PLACEHOLDER = "YOUR_NAME"  # inference/config.json as shipped: the model repository is the user's own
PLACEHOLDER_HINT = ("put your Xihe user name and the model repository you uploaded the job's outputs to there "
                    "(owner/repo/file), so the platform downloads your model")


def model_paths(config_path):
    try:
        paths = json.loads(Path(config_path).read_text())["model_path"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{config_path}: needs {{\"model_path\": [\"owner/repo/path\", ...]}} ({exc})") from None
    if not isinstance(paths, list) or not all(isinstance(p, str) and p.count("/") >= 2 for p in paths):
        raise UserError(f"{config_path}: model_path must be a list of \"owner/repo/path\" strings")
    if any(p.split("/")[0] == PLACEHOLDER for p in paths):
        raise UserError(f"{config_path} still names {PLACEHOLDER}: {PLACEHOLDER_HINT}")
    return paths


def fetch(paths, source=None, hub=None, target=HERE):
    """Copy each named file into `target` under its basename; returns the files written."""
    written, store = [], storage.backend()
    for entry in paths:
        name = PurePosixPath(entry).name
        src = f"{str(hub).rstrip('/')}/{entry}" if hub else f"{str(source).rstrip('/')}/{name}"
        if not store.exists(src):
            raise UserError(f"model file {entry}: {storage.redact(src)} does not exist")
        store.copy(src, target / name)
        written.append(target / name)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--from", dest="source", help="a folder or URL holding the files (e.g. a job's output)")
    where.add_argument("--hub", help="a folder or URL mirroring the hub: HUB/owner/repo/path")
    parser.add_argument("--config", default=str(HERE / "config.json"))
    args = parser.parse_args(argv)
    try:
        for path in fetch(model_paths(args.config), args.source, args.hub):
            print(f"fetched {path}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
