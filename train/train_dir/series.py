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
import sys
import time
import uuid
from pathlib import Path

from errors import UserError
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


def read_series(run_folder):
    """(run.json's content, the tracked records, how many lines were cut short) of one run's folder."""
    try:
        meta = json.loads((run_folder / RUN).read_text())
        meta["id"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{run_folder / RUN} is damaged or unreadable ({exc})") from None
    records, torn = [], 0
    series = run_folder / SERIES
    for line in series.read_text(encoding="utf-8").splitlines() if series.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            torn += 1
    return meta, records, torn


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


def replay(where, repo):
    """Each run's series under `where` as a new run of the Aim repo `repo`, unless it was replayed there before.
    Returns the Aim runs' hashes."""
    from aim import Image as AimImage, Repo, Run
    from PIL import Image as PILImage
    Path(repo).mkdir(parents=True, exist_ok=True)
    done = {}
    if Repo.exists(str(repo)):
        for run in Repo.from_path(str(repo)).iter_runs():
            source = run.get("replayed_from")
            if source:
                done[source] = run.hash
    hashes = []
    for folder in run_folders(where):
        meta, records, torn = read_series(folder)
        if meta["id"] in done:
            print(f"series {meta['id']}: already replayed into {repo} as Aim run {done[meta['id']]}")
            hashes.append(done[meta["id"]])
            continue
        run = Run(repo=str(repo), experiment=meta.get("experiment"), system_tracking_interval=None)
        run["hparams"] = meta.get("hparams", {})
        run["replayed_from"] = meta["id"]
        images = 0
        for record in records:
            where_ = {"name": record["name"], "step": record["step"], "epoch": record["epoch"],
                      "context": record["context"]}
            if "value" in record:
                run.track(record["value"], **where_)
                continue
            pictures = [AimImage(PILImage.open(folder / item["file"]).convert("RGB"), caption=item["caption"])
                        for item in record["images"]]
            images += len(pictures)
            run.track(pictures[0] if record.get("single") else pictures, **where_)
        run.close()
        cut = f", {torn} line(s) cut short skipped" if torn else ""
        print(f"series {meta['id']}: replayed into {repo} as Aim run {run.hash} "
              f"({len(records)} records, {images} images{cut})")
        hashes.append(run.hash)
    return hashes


def main(argv=None):
    parser = argparse.ArgumentParser(description="Replay the series a job kept without Aim into a local Aim repo.")
    parser.add_argument("outputs", help="the job's output folder (or its aim-series folder, or one run's folder)")
    parser.add_argument("--repo", default="runs", help="the Aim repo to replay into (created when missing)")
    args = parser.parse_args(argv)
    try:
        replay(args.outputs, args.repo)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"error: replaying needs aim ({exc}); pip install -r requirements.txt", file=sys.stderr)
        return 2
    print(f"browse: aim up --repo {args.repo}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
