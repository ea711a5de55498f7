"""The fault catalogue, runs and their output folder: one run per folder, resuming whatever state the folder is in,
and weights or records that are damaged. Each case: its exit code, one `error:` line (or the note where the job goes
on), no traceback, the previous run's files byte-identical unless the case says which it completes, a deadline."""
import shutil
import subprocess
import sys
import time

import mindspore as ms
import numpy as np
import pytest
from conftest import TRAIN_PY, assert_fails_cleanly, run_train, snapshot

from make_demo_data import make_split, write_cifar
from resnet import create_model
from run_state import AIM_FOLDER, RunFiles

pytestmark = pytest.mark.slow
ARCH = "resnet18"
QUICK = ["--arch", ARCH, "--image_size", 32, "--batch_size", 16, "--lr", 0.01, "--aim_system_metrics", "false"]
DEADLINE = 240  # seconds for any one case: they train one epoch of 64 images at most


@pytest.fixture(scope="module")
def data(module_tmp):
    return write_cifar(module_tmp / "cifar", make_split(64, 2, 0), make_split(16, 2, 1), ["red", "blue"])


@pytest.fixture(scope="module")
def finished(data, module_tmp):
    """A finished one-epoch run's output folder; each case works on its own copy."""
    out = module_tmp / "finished"
    result = run_train("--data_url", data, "--output_url", out, "--epochs", 1, *QUICK)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def job(data, out, *extra):
    """Runs train.py on the module's data into `out` within the deadline; (result, seconds)."""
    start = time.monotonic()
    result = run_train("--data_url", data, "--output_url", out, "--epochs", 1, *QUICK, *extra, timeout=DEADLINE + 60)
    seconds = time.monotonic() - start
    assert seconds < DEADLINE
    return result


def copy_of(finished, tmp_path):
    return shutil.copytree(finished, tmp_path / "out")


def checkpoint_with(tmp_path, value):
    """A ResNet18 checkpoint of the tutorial's names, one of whose weights holds `value`."""
    net = create_model(ARCH, 2)
    weight = net.conv1.weight.asnumpy()
    weight[0, 0, 0, 0] = value
    net.conv1.weight.set_data(ms.Tensor(weight))
    path = tmp_path / "damaged.ckpt"
    ms.save_checkpoint(net, str(path))
    return path


def damaged_records(tmp_path, out):
    metrics = RunFiles(out, ARCH).metrics
    metrics.write_bytes(metrics.read_bytes()[:-40])  # cut short, as by a failing disk or a partial copy
    return ["--resume", "auto"]


def state_of_another_folder(tmp_path, out):
    return ["--resume", RunFiles(shutil.copytree(out, tmp_path / "other"), ARCH).resume]


FAILURES = {
    # name: (prepare(tmp_path, out) -> extra flags, exit code, needle); all fail before the first write except the
    # last, which is tracked in the folder's Aim repo (a shared database, so it changes) and writes nothing else
    "a new run into another run's folder": (lambda t, o: [], 2, "holds another run's outputs"),
    "--resume PATH of another folder into a used one": (state_of_another_folder, 2, "holds another run's outputs"),
    "a damaged metrics.json on resume": (damaged_records, 2, "metrics.json is damaged"),
    "NaN in pretrained weights": (lambda t, o: ["--pretrain_url", checkpoint_with(t, np.nan), "--overwrite"],
                                  2, "NaN or infinite values (e.g. in conv1.weight)"),
    "infinity in pretrained weights": (lambda t, o: ["--pretrain_url", checkpoint_with(t, np.inf), "--overwrite"],
                                       2, "NaN or infinite values"),
    "an --overwrite run that diverges before its first epoch ends": (lambda t, o: ["--overwrite", "--lr", "1e30"],
                                                                     3, "the loss became"),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_a_run_that_cannot_go_on_leaves_the_previous_run_alone(case, data, finished, tmp_path):
    out = copy_of(finished, tmp_path)
    prepare, exit_code, needle = FAILURES[case]
    extra = prepare(tmp_path, out)
    before = snapshot(out)
    result = job(data, out, *extra)
    assert_fails_cleanly(result, needle, exit_code)
    after = snapshot(out)
    if "diverges" in case:  # tracked in the Aim repo, a shared database: everything else is untouched
        before, after = without_aim(before), without_aim(after)
    assert after == before


def without_aim(files):
    return {path: data for path, data in files.items() if AIM_FOLDER not in path.parts}


def test_resume_auto_on_a_finished_job_trains_nothing_and_changes_nothing(data, finished, tmp_path):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    result = job(data, out, "--resume", "auto")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "nothing left to train" in result.stdout and "epoch 1/1  train_loss" not in result.stdout
    assert snapshot(out) == before


def test_resume_auto_after_a_kill_during_the_export_completes_it(data, finished, tmp_path):
    out = copy_of(finished, tmp_path)
    files = RunFiles(out, ARCH)
    files.best_mindir.unlink()
    files.curves.unlink()
    before = snapshot(out)
    result = job(data, out, "--resume", "auto")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "nothing left to train" in result.stdout
    after = snapshot(out)
    assert {p: after[p] for p in before} == before  # what was there is untouched; the two are back
    assert set(after) - set(before) == {files.best_mindir, files.curves}
    graph = ms.nn.GraphCell(ms.load(str(files.best_mindir)))
    assert graph(ms.Tensor(np.zeros((1, 3, 32, 32), np.float32))).shape == (1, 2)


@pytest.mark.parametrize("lost", ["the Aim repo", "the whole folder but resume.ckpt"])
def test_resume_without_its_aim_run_continues_in_a_new_one(lost, data, finished, tmp_path):
    out = copy_of(finished, tmp_path)
    if lost == "the Aim repo":
        shutil.rmtree(out / AIM_FOLDER)
        state = ["--resume", "auto"]
    else:  # the state alone, copied elsewhere: a new folder, a new Aim repo
        state = ["--resume", shutil.copy(RunFiles(out, ARCH).resume, tmp_path / "state.ckpt")]
        out = tmp_path / "fresh"
    result = job(data, out, *state, "--epochs", 2)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "is not in" in result.stdout and "tracked in a new Aim run" in result.stdout
    assert "epoch 2/2  train_loss" in result.stdout and "epoch 1/2  train_loss" not in result.stdout


def test_a_second_run_into_a_folder_in_use_is_refused(data, tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, str(TRAIN_PY), "--data_url", str(data), "--output_url", str(out),
                              "--epochs", "50", *map(str, QUICK)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        for line in first.stdout:
            if line.startswith("train:"):  # it holds the folder
                break
        second = job(data, out, "--overwrite")
        assert_fails_cleanly(second, "is in use by another run")
        assert first.poll() is None  # the first run goes on undisturbed
    finally:
        first.kill()
        first.wait(timeout=60)


def test_only_an_aim_repo_without_runs_is_created_again(tmp_path, capsys):
    """A `.aim` without VERSION and without runs was cut short while Aim created it; one with runs is an Aim 2 repo
    and is never deleted."""
    from errors import UserError
    from tracking import recreate_interrupted_repo
    whole = tmp_path / "whole" / AIM_FOLDER
    (whole / "meta" / "chunks").mkdir(parents=True)
    (whole / "VERSION").write_text("3.0\n")
    half = tmp_path / "half" / AIM_FOLDER
    (half / "meta" / "index").mkdir(parents=True)
    old = tmp_path / "old" / AIM_FOLDER
    (old / "meta" / "chunks" / "0123abcd").mkdir(parents=True)
    for folder in ("whole", "half", "missing"):
        recreate_interrupted_repo(tmp_path / folder)
    assert whole.is_dir() and not half.exists()
    assert capsys.readouterr().err.count("left half-created") == 1
    with pytest.raises(UserError, match="has runs but no VERSION file"):
        recreate_interrupted_repo(tmp_path / "old")
    assert (old / "meta" / "chunks" / "0123abcd").is_dir()


def test_a_run_opens_in_a_repo_whose_creation_was_killed(tmp_path, capsys):
    """What a job killed while Aim creates its repo leaves (no VERSION yet): Aim itself refuses it with a bare
    RuntimeError; the job's tracker creates it again and its run is there to read."""
    from aim import Repo
    from tracking import AimCallback
    for folder in ("locks", "meta/index"):
        (tmp_path / AIM_FOLDER / folder).mkdir(parents=True)
    tracker = AimCallback(tmp_path, "half", {"lr": 0.1}, meter=None, system_tracking=False)
    run_hash = tracker.hash
    tracker.close()
    assert capsys.readouterr().err.count("left half-created") == 1
    assert (tmp_path / AIM_FOLDER / "VERSION").is_file()
    assert (tmp_path / AIM_FOLDER / "meta" / "chunks" / run_hash).exists()  # the run's own store in the new repo
    assert Repo.check_repo_status(str(tmp_path)).name == "UPDATED"  # Aim opens it now
