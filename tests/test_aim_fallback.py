"""A job where `aim` cannot be imported (the Ascend images are aarch64, and aim 3.x has no aarch64 build): it says so
in one line, keeps every series in its outputs, and the replay gives the Aim run a live-tracked job gives."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from aim.storage.context import Context
from conftest import TRAIN_PY, run_train, stderr_lines
from test_aim_runs import read_runs

import series
from make_demo_data import make_split, write_cifar
from run_state import AIM_FOLDER, AIM_SERIES

NO_AIM = Path(__file__).resolve().parent / "fixtures" / "no_aim"  # an `aim` package whose import fails
SERIES_PY = Path(series.__file__)
FLAGS = ["--epochs", 2, "--arch", "resnet18", "--image_size", 32, "--batch_size", 16, "--lr", 0.02,
         "--aim_system_metrics", "false", "--experiment", "fallback", "--resume", "auto", "--resume_exact"]


def without_aim():
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(NO_AIM), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def data(module_tmp):
    return write_cifar(module_tmp / "cifar", make_split(160, 2, 0), make_split(40, 2, 1), ["a", "b"])


@pytest.fixture(scope="module")
def jobs(data, module_tmp):
    """The same two-epoch job tracked live, and without aim: killed in epoch 2, then resumed."""
    live = run_train("--data_url", data, "--output_url", module_tmp / "live", *FLAGS)
    assert live.returncode == 0, live.stderr[-3000:]
    out = module_tmp / "no-aim"
    argv = ["--data_url", data, "--output_url", out, *FLAGS]
    job = subprocess.Popen([sys.executable, str(TRAIN_PY), *map(str, argv)], env=without_aim(), text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first_lines = []
    for line in job.stdout:
        first_lines.append(line)
        if line.startswith("epoch 2/2 step 4/"):  # epoch 1 is saved, epoch 2 half tracked
            job.kill()
            break
    assert job.wait(timeout=60) == -9, "".join(first_lines)[-2000:]  # killed mid-run
    resumed = run_train(*argv, env=without_aim())
    return {"live": module_tmp / "live", "out": out, "first": "".join(first_lines), "first_err": job.stderr.read(),
            "resumed": resumed}


def replay(*argv):
    return subprocess.run([sys.executable, str(SERIES_PY), *map(str, argv)], capture_output=True, text=True,
                          timeout=300)


def metrics_of(run):
    """{(name, context): [(step, epoch, value), ...]} of every metric of an Aim run."""
    found = {}
    for metric in run.metrics():
        frame = metric.dataframe()
        found[(metric.name, json.dumps(metric.context.to_dict(), sort_keys=True))] = \
            list(zip(frame["step"], frame["epoch"], frame["value"]))
    return found


def image_steps(run, name, context):
    images = run.get_image_sequence(name, Context(context))
    return None if images is None else sorted(images.values.sparse_numpy()[0].tolist())


@pytest.mark.slow
def test_a_job_without_aim_says_so_once_and_keeps_its_series(jobs):
    resumed = jobs["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr + jobs["first_err"]
    for lines in (stderr_lines(resumed), [line for line in jobs["first_err"].splitlines()
                                          if line.strip() and not line.startswith("[WARNING]")]):
        (line,) = lines
        assert line.startswith("warning: aim cannot be imported") and "series.py OUTPUT_FOLDER" in line
    assert "resume: continuing after epoch 1 of 2" in resumed.stdout
    assert not (jobs["out"] / AIM_FOLDER).exists()
    (run_folder,) = (jobs["out"] / AIM_SERIES).iterdir()  # the resumed job continued the same run
    assert f"series {run_folder.name} in" in jobs["first"] and f"series {run_folder.name} in" in resumed.stdout
    meta, records, torn = series.read_series(run_folder)
    assert meta["experiment"] == "fallback" and meta["hparams"]["epochs"] == 2 and "ended" in meta
    steps = [r["step"] for r in records if r["name"] == "loss" and r["context"] == {"subset": "train"}]
    assert set(steps) == set(range(1, 21))  # 160 / 16 = 10 steps an epoch; the killed steps are tracked again
    assert steps[-10:] == list(range(11, 21)) and len(steps) > 20


@pytest.mark.slow
def test_the_replay_is_the_run_a_live_job_tracks(jobs, tmp_path):
    repo = tmp_path / "runs"
    result = replay(jobs["out"], "--repo", repo)
    assert result.returncode == 0, result.stderr
    (replayed,) = read_runs(repo).values()
    (live,) = read_runs(jobs["live"]).values()
    assert replayed.experiment == live.experiment == "fallback"
    ignored = {"output_url"}  # where each ran
    assert {k: v for k, v in replayed["hparams"].items() if k not in ignored} == \
        {k: v for k, v in live["hparams"].items() if k not in ignored}

    got, expected = metrics_of(replayed), metrics_of(live)
    timing = {"images_per_second", "epoch_seconds"}
    assert set(got) == set(expected) and len(got) >= 8
    for key in expected:
        steps = [(s, e) for s, e, _ in expected[key]]
        assert [(s, e) for s, e, _ in got[key]] == steps, key
        if key[0] not in timing:  # the same seeded job: the same numbers, on this CPU
            np.testing.assert_allclose([v for *_, v in got[key]], [v for *_, v in expected[key]], rtol=1e-5,
                                       err_msg=str(key))
    for name, context in (("val_predictions", {"subset": "val"}), ("confusion_matrix", {"subset": "val"}),
                          ("train_samples", {})):
        assert image_steps(replayed, name, context) == image_steps(live, name, context) is not None, name


@pytest.mark.slow
def test_a_second_replay_finds_the_first_without_an_index(jobs, tmp_path):
    """Aim's index lags behind a run just closed: the replay reads each run, so twice in a row is still one run."""
    repo = tmp_path / "runs"
    first, again = replay(jobs["out"], "--repo", repo), replay(jobs["out"], "--repo", repo)
    assert first.returncode == 0 and "replayed into" in first.stdout
    assert again.returncode == 0 and "already replayed" in again.stdout
    from aim import Repo
    assert len(Repo(str(repo)).list_all_runs()) == 1


@pytest.mark.slow
def test_replaying_nothing_or_a_damaged_run_is_one_error_line(jobs, tmp_path):
    empty = replay(tmp_path, "--repo", tmp_path / "runs")
    assert empty.returncode == 2 and empty.stderr.strip().startswith("error: no tracked series in")
    damaged = tmp_path / "damaged"
    (run_folder,) = (jobs["out"] / AIM_SERIES).iterdir()
    copy = damaged / AIM_SERIES / run_folder.name
    copy.mkdir(parents=True)
    (copy / series.RUN).write_text((run_folder / series.RUN).read_text()[:-30])
    result = replay(damaged, "--repo", tmp_path / "runs")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: ") and "damaged" in result.stderr


def hostile_copy(jobs, tmp_path, damage):
    """A copy of the job's run folder with `damage(run folder)` done: a downloaded archive anyone could have made."""
    import shutil
    (run_folder,) = (jobs["out"] / AIM_SERIES).iterdir()
    copy = shutil.copytree(run_folder, tmp_path / "download" / AIM_SERIES / run_folder.name)
    damage(copy)
    return tmp_path / "download"


def with_record(change):
    """Damage: the first image record changed by `change(record)`."""
    def damage(folder):
        lines = (folder / series.SERIES).read_text().splitlines()
        index = next(i for i, line in enumerate(lines) if '"images"' in line)
        record = json.loads(lines[index])
        lines[index] = json.dumps(change(record))
        (folder / series.SERIES).write_text("\n".join(lines) + "\n")
    return damage


def image_at(path):
    def change(record):
        record["images"][0]["file"] = str(path)
        return record
    return change


def linked_image(folder):
    first = sorted((folder / series.IMAGES).iterdir())[0]
    first.unlink()
    first.symlink_to("/etc/passwd")


HOSTILE = {  # name: (damage, what the one error line says)
    "an image outside the folder, absolute": (with_record(image_at("/etc/passwd")), "is not a file of images/"),
    "an image outside the folder, ../": (with_record(image_at("../../../../etc/passwd")), "is not a file of images/"),
    "an image that is a link": (linked_image, "is not a file of images/"),
    "a record of the wrong shape": (with_record(lambda r: [1, 2]), "is not a tracked record"),
    "a step that is not a number": (with_record(lambda r: {**r, "step": "1"}), "is not a tracked record"),
    "an id of the wrong type": (lambda f: (f / series.RUN).write_text('{"id": ["x"], "hparams": {}}'), "damaged"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_download_is_refused_with_one_line_and_no_half_run(case, jobs, tmp_path):
    damage, needle = HOSTILE[case]
    download = hostile_copy(jobs, tmp_path, damage)
    result = replay(download, "--repo", tmp_path / "runs")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and needle in line, line
    from aim import Repo
    assert not Repo.exists(str(tmp_path / "runs")) or Repo(str(tmp_path / "runs")).list_all_runs() == []


def test_a_resumed_run_starts_a_line_of_its_own_after_a_torn_one(tmp_path):
    run = series.SeriesRun(tmp_path, experiment="torn")
    run.track(1.0, name="loss", step=1)
    run.close()
    lines = tmp_path / run.hash / series.SERIES
    lines.write_text(lines.read_text() + '{"name": "loss", "cont')  # killed mid-write, or the disk filled
    resumed = series.SeriesRun(tmp_path, run_hash=run.hash)
    resumed.track(2.0, name="loss", step=2)
    resumed.track(3.0, name="loss", step=3)
    resumed.close()
    _, records, torn = series.read_series(tmp_path / run.hash)
    assert [(r["step"], r["value"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0)] and torn == 0


@pytest.mark.slow
def test_a_line_cut_short_by_a_kill_is_skipped_and_counted(jobs, tmp_path):
    (run_folder,) = (jobs["out"] / AIM_SERIES).iterdir()
    import shutil
    copy = shutil.copytree(run_folder, tmp_path / AIM_SERIES / run_folder.name)
    lines = (copy / series.SERIES).read_text()
    (copy / series.SERIES).write_text(lines[:-25])  # the last record cut in half
    result = replay(tmp_path, "--repo", tmp_path / "runs")
    assert result.returncode == 0, result.stderr
    assert "1 line(s) cut short skipped" in result.stdout
    (run,) = read_runs(tmp_path / "runs").values()
    assert run["replayed_from"] == run_folder.name
