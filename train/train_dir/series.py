"""Aim's series without Aim: where `aim` cannot be imported (aim 3.x publishes no aarch64 wheel, and the Ascend
training images are aarch64), the job keeps everything it would have tracked, in a portable form in its outputs, and
`replay` turns that into a run of a local Aim repo, so `aim up` shows the cloud run as if it had been tracked live.

    python train/train_dir/series.py OUTPUT_FOLDER --repo runs     # then: aim up --repo runs

`aim-series/<run id>/` holds one run:
- `run.json`: `id`, `experiment`, `hparams`, `created` and (once closed) `ended`, as Unix times;
- `series.jsonl`: one line per tracked value, in order: `name`, `context`, `step`, `epoch`, and `value` (a number) or
  `images` (a list of `{"file", "caption"}`, with `"single": true` when one image was tracked, not a list);
- `images/`: those images, as PNG.

A line is written whole and flushed at once, so a killed job keeps what it tracked; a line cut short by the kill is
skipped on replay, and counted. A resumed job continues its run's file.
"""
import argparse
import json
import os
import stat
import sys
import time
import uuid
from pathlib import Path

from errors import UserError, run_main
from export import write_json
from run_state import AIM_SERIES as FOLDER  # in the output folder
RUN, SERIES, IMAGES = "run.json", "series.jsonl", "images"


class MissingRunError(RuntimeError):
    """A resumed job's run is not in the series folder (named as Aim's own error, which callers match by name)."""


class Image:
    """An image to track (PIL image or HWC uint8 array) with a caption: what `aim.Image` is to an Aim run."""

    def __init__(self, image, caption=""):
        self.image, self.caption = image, caption


class SeriesRun:
    """A stand-in for `aim.Run`, with what `tracking.AimCallback` uses of it: `hash`, `run["hparams"] = ...`,
    `track(value, name=, step=, epoch=, context=)` and `close()`. `run_hash` continues a run of `folder`."""

    repo = None

    def __init__(self, folder, run_hash=None, experiment=None, **_aim_only):
        self.hash = run_hash or uuid.uuid4().hex[:24]
        self.folder = Path(folder) / self.hash
        if run_hash:
            if not (self.folder / RUN).is_file():
                raise MissingRunError(f"run {run_hash} is not in {folder}")
            self.meta = json.loads((self.folder / RUN).read_text())
        else:
            (self.folder / IMAGES).mkdir(parents=True)
            self.meta = {"id": self.hash, "experiment": experiment, "hparams": {}, "created": time.time()}
            write_json(self.folder / RUN, self.meta)
        self.meta.pop("ended", None)
        _drop_torn_line(self.folder / SERIES)
        self._lines = open(self.folder / SERIES, "a", encoding="utf-8")
        self._images = sum(1 for _ in (self.folder / IMAGES).iterdir())

    def __setitem__(self, key, value):
        if key != "hparams":
            raise KeyError(f"only hparams are kept, not {key!r}")
        self.meta["hparams"] = json.loads(json.dumps(value, default=str))
        write_json(self.folder / RUN, self.meta)

    def track(self, value, name, step, epoch=None, context=None):
        record = {"name": name, "context": context or {}, "step": step, "epoch": epoch}
        if isinstance(value, (Image, list)):
            record["images"] = [self._save(image) for image in (value if isinstance(value, list) else [value])]
            record["single"] = isinstance(value, Image)
        else:
            record["value"] = float(value)
        self._lines.write(json.dumps(record) + "\n")
        self._lines.flush()

    def _save(self, image):
        from PIL import Image as PILImage
        picture = image.image if isinstance(image.image, PILImage.Image) else PILImage.fromarray(image.image)
        relative = f"{IMAGES}/{self._images:06d}.png"
        self._images += 1
        picture.convert("RGB").save(self.folder / relative, format="PNG")
        return {"file": relative, "caption": image.caption}

    def close(self):
        if not self._lines.closed:
            self._lines.close()
            self.meta["ended"] = time.time()
            write_json(self.folder / RUN, self.meta)


def _drop_torn_line(path):
    """A line the previous job was killed (or ran out of disk) in the middle of is cut off, so that the resumed job's
    first record starts a line of its own."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as lines:
        lines.seek(-1, os.SEEK_END)
        if lines.read(1) == b"\n":
            return
        data = lines.seek(0) or lines.read()
        lines.truncate(data.rfind(b"\n") + 1)


def read_series(run_folder):
    """(run.json's content, the tracked records, how many lines were cut short) of one run's folder. Every record is
    checked, since the folder may come from a downloaded archive: a bad one is a UserError naming its line."""
    run_file, series = run_folder / RUN, run_folder / SERIES
    try:
        meta = json.loads(_regular(run_file, MAX_RUN_JSON).read_text(encoding="utf-8"))
        if not (isinstance(meta, dict) and isinstance(meta.get("id"), str) and isinstance(meta.get("hparams", {}), dict)
                and isinstance(meta.get("experiment"), (str, type(None)))):
            raise ValueError("it needs an id, an experiment and hparams")
    except (OSError, ValueError) as exc:
        raise UserError(f"{run_file} is damaged or unreadable ({exc})") from None
    records, torn = [], 0
    if not series.exists():
        return meta, records, torn
    try:
        with open(_regular(series), encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                try:
                    record = json.loads(line)
                except ValueError:
                    if line.endswith("\n"):
                        raise ValueError(f"line {number} is not JSON") from None
                    torn += 1  # the last line, cut short by a kill
                    continue
                records.append(_checked(record, number, run_folder))
    except (OSError, ValueError) as exc:
        raise UserError(f"{series}: {exc}") from None
    return meta, records, torn


MAX_RUN_JSON = 16 << 20  # bytes
MAX_IMAGE_FILE = 64 << 20


def _regular(path, limit=None):
    """`path`, when it is a regular file (not a link: a downloaded archive may hold one pointing anywhere) no larger
    than `limit` bytes."""
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path.name} is not a regular file")
    if limit is not None and info.st_size > limit:
        raise ValueError(f"{path.name} is {info.st_size} bytes, more than {limit}")
    return path


def _checked(record, number, run_folder):
    """The record of line `number`, when it has the fields and types the job writes; images must be files of the
    run's own images/ folder."""
    where = f"line {number}"
    if not (isinstance(record, dict) and isinstance(record.get("name"), str)
            and isinstance(record.get("context"), dict) and type(record.get("step")) is int
            and (record.get("epoch") is None or type(record.get("epoch")) is int)):
        raise ValueError(f"{where} is not a tracked record (name, context, step, epoch)")
    if "value" in record:
        if not isinstance(record["value"], (int, float)) or isinstance(record["value"], bool):
            raise ValueError(f"{where}: value is not a number")
        return record
    images = record.get("images")
    if not (isinstance(images, list) and images and all(isinstance(i, dict) and isinstance(i.get("file"), str)
                                                         and isinstance(i.get("caption", ""), str) for i in images)):
        raise ValueError(f"{where} has neither a value nor images")
    folder = (run_folder / IMAGES).resolve()
    for image in images:
        path = run_folder / image["file"]
        if path.resolve().parent != folder or path.is_symlink():
            raise ValueError(f"{where}: image {image['file']!r} is not a file of {IMAGES}/")
    return record


def run_folders(where):
    """The run folders under `where`: an output folder, its `aim-series`, or one run's folder."""
    where = Path(where)
    for candidate in (where, where / FOLDER):
        if (candidate / RUN).is_file():
            return [candidate]
        runs = sorted(path.parent for path in candidate.glob(f"*/{RUN}"))
        if runs:
            return runs
    raise UserError(f"no tracked series in {where} (looked for {FOLDER}/<run>/{RUN})")


def _replayed(repo):
    """{series id: Aim run hash} of the runs of `repo` that earlier replays made. Aim reads runs through its index,
    which lags behind a run just closed (`aim up` brings it up to date), so every run is indexed first."""
    from aim import Repo
    from aim.sdk.index_manager import RepoIndexManager
    if not Repo.exists(str(repo)):
        return {}
    aim_repo = Repo.from_path(str(repo))
    index = RepoIndexManager.get_index_manager(aim_repo)
    for run_hash in aim_repo.list_all_runs():
        index.index(run_hash)
    return {run.get("replayed_from"): run.hash for run in aim_repo.iter_runs() if run.get("replayed_from")}


def _image(folder, item):
    from aim import Image as AimImage
    from PIL import Image as PILImage
    from images import MAX_PIXELS
    PILImage.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with PILImage.open(_regular(folder / item["file"], MAX_IMAGE_FILE)) as picture:
            return AimImage(picture.convert("RGB"), caption=item.get("caption", ""))
    except (OSError, ValueError, PILImage.DecompressionBombError) as exc:
        raise UserError(f"{folder / item['file']} is not an image this replay can read ({exc})") from None


def _replay_run(folder, meta, records, repo):
    """One run's records as a new Aim run; a replay that fails leaves no half run behind."""
    from aim import Repo, Run
    run = Run(repo=str(repo), experiment=meta.get("experiment"), system_tracking_interval=None)
    try:
        run["hparams"] = meta.get("hparams", {})
        images = 0
        for record in records:
            where = {"name": record["name"], "step": record["step"], "epoch": record["epoch"],
                     "context": record["context"]}
            if "value" in record:
                run.track(float(record["value"]), **where)
                continue
            pictures = [_image(folder, item) for item in record["images"]]
            images += len(pictures)
            run.track(pictures[0] if record.get("single") else pictures, **where)
        run["replayed_from"] = meta["id"]  # last: only a whole replay counts as done
        run.close()
    except BaseException:
        run.close()
        Repo.from_path(str(repo)).delete_run(run.hash)
        raise
    return run.hash, images


def replay(where, repo):
    """Each run's series under `where` as a new run of the Aim repo `repo`, unless it was replayed there before.
    Returns the Aim runs' hashes."""
    Path(repo).mkdir(parents=True, exist_ok=True)
    done, hashes = _replayed(repo), []
    for folder in run_folders(where):
        meta, records, torn = read_series(folder)
        if meta["id"] in done:
            print(f"series {meta['id']}: already replayed into {repo} as Aim run {done[meta['id']]}")
            hashes.append(done[meta["id"]])
            continue
        run_hash, images = _replay_run(folder, meta, records, repo)
        cut = f", {torn} line(s) cut short skipped" if torn else ""
        print(f"series {meta['id']}: replayed into {repo} as Aim run {run_hash} "
              f"({len(records)} records, {images} images{cut})")
        hashes.append(run_hash)
    return hashes


def replay_command(args):
    try:
        replay(args.outputs, args.repo)
    except ImportError as exc:
        raise UserError(f"replaying needs aim ({exc}); pip install -r requirements.txt") from None
    print(f"browse: aim up --repo {args.repo}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Replay the series a job kept without Aim into a local Aim repo.")
    parser.add_argument("outputs", help="the job's output folder (or its aim-series folder, or one run's folder)")
    parser.add_argument("--repo", default="runs", help="the Aim repo to replay into (created when missing)")
    return run_main(replay_command, lambda: parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
