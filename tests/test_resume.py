"""--resume auto: a job killed at any moment and restarted with the same command continues where it stopped."""
import json
import random
import subprocess
import sys
import time

import mindspore as ms
import pytest
from conftest import TRAIN_PY, read_json, run_train
from test_aim_runs import read_runs

from make_demo_data import make_split, write_cifar
from run_state import RunFiles

pytestmark = pytest.mark.slow
EPOCHS = 3


def files_of(out):
    """The files a resnet18 job writes into `out`."""
    return RunFiles(out, "resnet18")


CLASSES = ["red_circle", "blue_square", "red_square", "blue_circle"]


@pytest.fixture(scope="module")
def data(module_tmp):
    """Enough to learn from in 3 epochs: 480 / 32 = 15 steps an epoch."""
    return write_cifar(module_tmp / "cifar", make_split(480, 4, 0), make_split(200, 4, 1), CLASSES)


def argv(data, out, epochs=EPOCHS, extra=()):
    return ["--data_url", data, "--output_url", out, "--epochs", epochs, "--arch", "resnet18", "--image_size", 32,
            "--batch_size", 32, "--lr", 0.02, "--aim_system_metrics", "false", "--resume", "auto", "--resume_exact",
            *extra]


def start(data, out, epochs=EPOCHS, extra=()):
    return subprocess.Popen([sys.executable, str(TRAIN_PY), *map(str, argv(data, out, epochs, extra))],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# With an update every 4 of an epoch's 15 steps, epoch 1 ends 3 steps into an update: the resumed job must go on
# with those 3 steps' gradients, and with the weight average where it was. (A job without --ema and --accumulate
# resumes through the same code with less state: tests/test_train_job.py and test_multi_node.py resume such jobs.)
EXTRA = ("--ema", 0.9, "--accumulate", 4)


def test_killed_in_epoch_2_then_restarted_finishes_as_one_run(data, tmp_path):
    steps = 15  # an epoch's: 480 / 32
    reference = run_train(*argv(data, tmp_path / "uninterrupted", extra=EXTRA))
    assert reference.returncode == 0, reference.stdout[-3000:]

    out = tmp_path / "out"
    job = start(data, out, extra=EXTRA)
    for line in job.stdout:
        if line.startswith(f"epoch 2/{EPOCHS} step"):  # mid-epoch 2: epoch 1 is saved, epoch 2 half done
            job.kill()
            break
    job.wait(timeout=60)
    first_epoch = read_json(files_of(out).metrics)
    assert [r["epoch"] for r in first_epoch] == [1]

    assert ms.load_checkpoint(str(files_of(out).resume))["accumulated_steps"].asnumpy().item() == steps % 4 == 3
    resumed = run_train(*argv(data, out, extra=EXTRA))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resume: continuing after epoch 1 of 3" in resumed.stdout
    history = read_json(files_of(out).metrics)
    assert [r["epoch"] for r in history] == [1, 2, 3] and history[0] == first_epoch[0]
    # The same weights, optimizer state, schedule and (with --resume_exact) the same augmented images in the same
    # order: the resumed epochs are the uninterrupted job's, bit for bit.
    learned = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "best")
    expected = read_json(files_of(tmp_path / "uninterrupted").metrics)
    assert [[r[k] for k in learned] for r in history] == [[r[k] for k in learned] for r in expected]
    # It learned (chance is 0.25; measured 0.43 after 11 updates), so the equality says something.
    assert expected[-1]["val_accuracy"] > 0.35 and expected[-1]["val_loss"] < expected[0]["val_loss"]
    state, reference_state = (ms.load_checkpoint(str(files_of(o).resume)) for o in (out, tmp_path / "uninterrupted"))
    assert state.keys() == reference_state.keys()
    for name, value in state.items():  # weights, moments, the average and the gradient sums, bit for bit
        if isinstance(value, ms.Parameter):
            assert (value.asnumpy() == reference_state[name].asnumpy()).all(), name
    assert state["ema_updates"].asnumpy().item() == 3 * steps // 4  # 45 steps: 11 updates, 1 step summed
    assert state["accumulated_steps"].asnumpy().item() == 3 * steps % 4 == 1
    assert not (state["ema.fc.weight"].asnumpy() == state["fc.weight"].asnumpy()).all()  # an average, moving

    (run,) = read_runs(out).values()  # the same Aim run, continued
    from aim.storage.context import Context
    assert run.get_metric("accuracy", Context({"subset": "val"})).dataframe()["step"].tolist() == [1, 2, 3]
    tracked = run.get_metric("loss", Context({"subset": "train"})).dataframe()["step"].tolist()
    assert tracked == list(range(1, 3 * steps + 1))  # each step once


def test_kills_at_random_moments_never_leave_a_checkpoint_that_fails_to_load(data, tmp_path):
    out = tmp_path / "out"
    rng = random.Random(7)
    for _ in range(5):
        job = start(data, out, epochs=4)
        time.sleep(rng.uniform(4, 16))
        job.kill()
        job.wait(timeout=60)
        files = files_of(out)
        for path in (files.resume, files.last_checkpoint, files.best_checkpoint):
            if path.exists():
                assert len(ms.load_checkpoint(str(path))) > 50, path
        if files.metrics.exists():
            epochs = [r["epoch"] for r in json.loads(files.metrics.read_text())]
            assert epochs == list(range(1, len(epochs) + 1))
    final = run_train(*argv(data, out, epochs=4))
    assert final.returncode == 0, final.stdout[-3000:]
    assert [r["epoch"] for r in read_json(files_of(out).metrics)] == [1, 2, 3, 4]
