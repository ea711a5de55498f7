"""Label images with a model that train.py produced, in batches through the data pipeline.

    python predict.py --model_url OUT --data_url PHOTOS --output_url PREDICTIONS [--top_k 5]

Writes `predictions.csv` (path, then label and probability for each of the top k) and the same as
`predictions.jsonl`, one row per image as it is predicted (nothing is held for all images), and `unreadable.txt`
listing the files that could not be decoded (named in one warning: they never stop the job). Images are read and
prepared as the inference app reads them (images.read_rgb and the validation transform), so the labels agree.
It takes the platform's flags like train.py, so it runs as a Xihe job from the same code_dir.
"""
import csv
import json
import os
import sys
import time

os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import datasets  # noqa: E402
import export  # noqa: E402
import images  # noqa: E402
import runtime  # noqa: E402
import staging  # noqa: E402
import storage  # noqa: E402
import trained_model  # noqa: E402
from args import get_predict_args_parser, parse_args  # noqa: E402
from errors import UserError, run_main  # noqa: E402
from folders import Walker, named, warn  # noqa: E402

CSV, JSONL, UNREADABLE = "predictions.csv", "predictions.jsonl", "unreadable.txt"


class _Decoded:
    """The pipeline's source: image i decoded, or (a blank of the right size and -1 - i) when it cannot be, or when
    it is a sliver that the validation transform's resize would make gigabytes of (1 x 20000 pixels)."""

    def __init__(self, paths, side, labels):
        self.paths, self.blank = paths, np.zeros((side, side, 3), np.uint8)
        self.image_size, self.data_format = int(labels["image_size"]), labels.get("data_format", "imagefolder")

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            if os.path.getsize(self.paths[index]) == 0:
                raise ValueError("empty file")
            pixels = images.read_rgb(self.paths[index])
            if datasets.eval_resized_pixels(*pixels.shape[:2], self.image_size, self.data_format) > images.MAX_PIXELS:
                raise ValueError("too narrow to resize")
            return pixels, np.int64(index)
        except Exception:  # a hostile file breaks decoders in many ways; it is listed, and the rest go on
            return self.blank, np.int64(-1 - index)


def image_files(root):
    """Every image file below `root` (links followed once, a job's outputs left out), sorted."""
    if root.is_file():
        return [root]
    walker = Walker()
    return walker.files(root, images.EXTENSIONS)


def pipeline(paths, labels, batch_size):
    import mindspore.dataset as ds
    workers = datasets.worker_count(None)
    data = ds.GeneratorDataset(_Decoded(paths, 8, labels), ["image", "index"], shuffle=False,
                               num_parallel_workers=workers,
                               python_multiprocessing=False)  # threads: PIL decodes without the GIL
    transforms = datasets.eval_transforms(int(labels["image_size"]), labels.get("data_format", "imagefolder"))
    return data.map(operations=transforms, input_columns="image", num_parallel_workers=workers).batch(batch_size)


def main(args):
    runtime.tune_cpu_env()
    device = runtime.setup_device(args.device_target)
    model, labels_path = trained_model.stage(args, device)
    labels, forward = trained_model.load(model, labels_path)
    root = staging.stage_in(args.data_url, "data_url", args.cache_dir, io_timeout=args.io_timeout)
    paths = image_files(root)
    if not paths:
        raise UserError(f"no images ({', '.join(images.EXTENSIONS)}) in {storage.redact(args.data_url)}")
    mirror = staging.OutputMirror(args.output_url, "output_url", args.cache_dir, io_timeout=args.io_timeout)
    names, top_k = labels["class_names"], min(args.top_k, len(labels["class_names"]))
    base = root if root.is_dir() else root.parent
    unreadable, done, started, shown = [], 0, time.perf_counter(), 0.0
    # Written under temporary names and renamed at the end: an earlier run's predictions stay until this one is done.
    with export.atomic_write(mirror.local / CSV) as csv_part, export.atomic_write(mirror.local / JSONL) as json_part, \
            open(csv_part, "w", newline="") as table, open(json_part, "w") as lines:
        rows = csv.writer(table)
        rows.writerow(["path"] + [f"{what}_{k}" for k in range(1, top_k + 1) for what in ("label", "probability")])
        for batch, indices in pipeline(paths, labels, args.batch_size).create_tuple_iterator(output_numpy=True):
            probabilities = trained_model.softmax(forward(batch)[:, :len(names)])
            for row, index in zip(probabilities, indices.tolist()):
                if index < 0:
                    unreadable.append(paths[-1 - index])
                    continue
                path = paths[index].relative_to(base).as_posix()
                best = np.argsort(-row)[:top_k]
                rows.writerow([path] + [value for k in best for value in (names[k], f"{row[k]:.6f}")])
                lines.write(json.dumps({"path": path, "top": [[names[k], float(row[k])] for k in best]}) + "\n")
            done += len(indices)
            if time.perf_counter() - shown > 10 or done == len(paths):  # a line every 10 s, not one per batch
                shown = time.perf_counter()
                print(f"predict: {done}/{len(paths)} images, {done / (shown - started):.1f} images/s", flush=True)
    with export.atomic_write(mirror.local / UNREADABLE) as part:
        part.write_text("".join(f"{path.relative_to(base).as_posix()}\n" for path in unreadable))
    if unreadable:
        warn(f"{len(unreadable)} image file(s) could not be read and have no prediction (listed in {UNREADABLE}): "
             f"{named([path.relative_to(base).as_posix() for path in unreadable])}")
    mirror.push()
    print(f"predict: {len(paths) - len(unreadable)} images labelled by {model.name} into "
          f"{storage.redact(mirror.url)}/{CSV}")


if __name__ == "__main__":
    sys.exit(run_main(main, lambda: parse_args(parser=get_predict_args_parser())))
