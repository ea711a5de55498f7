"""train.py under msrun: 2 real CPU workers, data parallel, against a single process at the same global batch."""
import os
import re
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from conftest import TRAIN_PY, free_port, read_json, run_train
from test_aim_runs import read_runs

import runtime
from make_demo_data import make_split, write_cifar

pytestmark = pytest.mark.slow
COMMON = ["--arch", "resnet18", "--image_size", "32", "--epochs", "4", "--aim_system_metrics", "false"]


def msrun(workers, argv, log_dir, timeout=900):
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}  # msrun starts workers with `python`
    return subprocess.run([str(bin_dir / "msrun"), f"--worker_num={workers}", f"--local_worker_num={workers}",
                           f"--master_port={free_port()}", f"--log_dir={log_dir}", "--join=True", str(TRAIN_PY),
                           *map(str, argv)], env=env, capture_output=True, text=True, timeout=timeout)


CLASSES = ["red_circle", "blue_square", "red_square", "blue_circle"]


@pytest.fixture(scope="module")
def data(module_tmp):
    root = module_tmp / "data"
    return write_cifar(root / "cifar", make_split(480, 4, 0), make_split(200, 4, 1), CLASSES)


@pytest.fixture(scope="module")
def few(module_tmp):
    """For a run that only compares the ranks with each other (it need not learn): a rank's 112 images in 16s."""
    return write_cifar(module_tmp / "few" / "cifar", make_split(224, 4, 0), make_split(56, 4, 1), CLASSES)


@pytest.fixture(scope="module")
def two_workers(data, module_tmp):
    root = module_tmp / "two-workers"
    result = msrun(2, ["--data_url", data, "--output_url", root / "out", "--cache_dir", root / "cache",
                       "--batch_size", 16, "--lr", 0.01, *COMMON], root / "logs")
    logs = {rank: (root / "logs" / f"worker_{rank}.log").read_text() for rank in (0, 1)}
    assert result.returncode == 0, result.stderr[-2000:] + logs[0][-3000:] + logs[1][-3000:]
    return root, logs


def test_both_ranks_finish_with_identical_weights(two_workers):
    root, logs = two_workers
    for rank in (0, 1):
        assert "x 2 workers (rank %d), global batch 32, lr 0.02" % rank in logs[rank]
        assert "done: best val_accuracy" in logs[rank]
    ours = ms.load_checkpoint(str(root / "out" / "resnet18-last.ckpt"))
    theirs = ms.load_checkpoint(str(root / "cache" / "rank-1" / "resnet18-last.ckpt"))
    weights = [name for name in ours if not isinstance(ours[name], str)]
    assert len(weights) > 100
    for name in weights:  # BatchNorm statistics included: they are averaged over the workers every epoch
        assert np.array_equal(ours[name].asnumpy(), theirs[name].asnumpy()), name


def test_accumulation_and_the_weight_average_stay_identical_across_ranks(few, tmp_path):
    """The all-reduce sits inside the train step's branch that updates (one per update, not one per step), and
    BatchNorm statistics of the weight average are synced like the network's: both ranks end bit-identical."""
    result = msrun(2, ["--data_url", few, "--output_url", tmp_path / "out", "--cache_dir", tmp_path / "cache",
                       "--batch_size", 16, "--lr", 0.01, *COMMON[:4], "--epochs", 2, "--aim_system_metrics", "false",
                       "--accumulate", 2, "--ema", 0.9], tmp_path / "logs")
    logs = [(tmp_path / "logs" / f"worker_{rank}.log").read_text() for rank in (0, 1)]
    assert result.returncode == 0, result.stderr[-2000:] + logs[0][-3000:] + logs[1][-3000:]
    assert "an update every 2 steps, weights averaged (EMA 0.9)" in logs[0]
    ours = ms.load_checkpoint(str(tmp_path / "out" / "resume.ckpt"))
    theirs = ms.load_checkpoint(str(tmp_path / "cache" / "rank-1" / "resume.ckpt"))
    arrays = [name for name in ours if isinstance(ours[name], ms.Parameter)]
    assert any(name.startswith("ema.") for name in arrays) and "accumulated_steps" in arrays
    assert ours["ema_updates"].asnumpy().item() == 7  # 2 epochs x 7 steps (a rank's 112 images in 16s) / 2
    assert ours["accumulated_steps"].asnumpy().item() == 0  # no rank's own gradients left unshared
    for name in arrays:
        assert np.array_equal(ours[name].asnumpy(), theirs[name].asnumpy()), name


def test_only_rank_0_writes_outputs_and_tracks(two_workers):
    root, logs = two_workers
    assert [r["epoch"] for r in read_json(root / "out" / "metrics.json")] == [1, 2, 3, 4]
    assert "outputs only on rank 0" in logs[1] and "outputs only on rank 0" not in logs[0]
    assert not (root / "out" / "rank-1").exists() and (root / "cache" / "rank-1").is_dir()
    (run,) = read_runs(root / "out").values()
    assert run["hparams"]["workers"] == 2 and run["hparams"]["global_batch_size"] == 32


def test_validation_matches_a_single_process_at_the_same_global_batch(two_workers, data, tmp_path):
    root, logs = two_workers
    single = run_train("--data_url", data, "--output_url", tmp_path / "single", "--batch_size", 32, "--lr", 0.02,
                       *COMMON)
    assert single.returncode == 0, single.stderr[-3000:]
    best = {name: max(r["val_accuracy"] for r in read_json(folder / "metrics.json"))
            for name, folder in (("parallel", root / "out"), ("single", tmp_path / "single"))}
    assert best["single"] > 0.4, best  # it learned (chance is 0.25), so the comparison means something
    assert best["parallel"] >= 0.8 * best["single"], best
    # Every worker validated on the whole split with the same weights: the same numbers on both ranks.
    validation = re.compile(r"val_loss (\S+)  val_accuracy (\S+)")  # a best epoch adds " *", and times differ
    lines = [[validation.search(line).groups() for line in logs[rank].splitlines() if "  train_loss" in line]
             for rank in (0, 1)]
    assert lines[0] == lines[1] and len(lines[0]) == 4, lines


def test_a_single_process_does_not_join_a_group():
    assert runtime.join_data_parallel("CPU", {}) == (0, 1, 0)
    assert runtime.detect_launch({"RANK_SIZE": "1"}).size == 1
    assert runtime.detect_launch({"MS_ROLE": "MS_WORKER", "MS_WORKER_NUM": "2"}).size == 2
