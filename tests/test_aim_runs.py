"""Aim beyond one clean local run: a tracking server over aim://, and a run killed mid-training."""
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TRAIN_PY, aim_process, read_json, run_train

from make_demo_data import make_split, write_cifar

pytestmark = pytest.mark.slow
AIM = Path(sys.executable).parent / "aim"
QUICK = ["--arch", "resnet18", "--image_size", 32, "--batch_size", 16, "--lr", 0.01, "--aim_system_metrics", "false"]


@pytest.fixture(scope="module")
def data(module_tmp):
    root = module_tmp
    return write_cifar(root / "cifar", make_split(96, 2, 0), make_split(24, 2, 1), ["cat", "dog"])


def read_runs(folder):
    """{run hash: Run} for every run in a local repo, after indexing it (Aim's SDK needs the index to read)."""
    from aim import Repo
    from aim.sdk.index_manager import RepoIndexManager
    repo = Repo(str(folder))
    for run_hash in repo.list_all_runs():
        RepoIndexManager.get_index_manager(repo).index(run_hash)
    return {run.hash: run for run in repo.iter_runs()}


def test_logging_to_an_aim_tracking_server(data, tmp_path):
    server_repo = tmp_path / "server-repo"
    server_repo.mkdir()
    subprocess.run([str(AIM), "init", "--repo", str(server_repo)], check=True, capture_output=True)
    with aim_process("server", "--repo", server_repo, "-y") as port:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        result = run_train("--data_url", data, "--output_url", tmp_path / "out", "--aim_repo",
                           f"aim://127.0.0.1:{port}", "--epochs", 2, "--experiment", "remote", *QUICK)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert not (tmp_path / "out" / ".aim").exists()  # nothing tracked locally
    runs = read_runs(server_repo)
    assert len(runs) == 1
    run = next(iter(runs.values()))
    assert run.experiment == "remote" and run["hparams"]["epochs"] == 2
    from aim.storage.context import Context
    assert run.get_metric("accuracy", Context({"subset": "val"})).dataframe()["step"].tolist() == [1, 2]


def test_a_killed_run_leaves_the_repo_usable(data, tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, str(TRAIN_PY), "--data_url", str(data), "--output_url", str(out), "--epochs", "20",
            *map(str, QUICK)]
    victim = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in victim.stdout:  # kill it mid-training, once the first epoch is done
        if line.startswith("epoch 1/20  train_loss"):
            break
    victim.kill()
    victim.wait(timeout=30)

    result = run_train("--data_url", data, "--output_url", out, "--epochs", 1, *QUICK, "--overwrite")  # a new run
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    runs = read_runs(out)
    assert len(runs) == 2
    finished = [run for run in runs.values() if run.hash in result.stdout]
    assert len(finished) == 1 and finished[0]["hparams"]["epochs"] == 1


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stopped_run_is_closed_and_keeps_its_finished_epochs(data, tmp_path, signum):
    out = tmp_path / "out"
    argv = [sys.executable, str(TRAIN_PY), "--data_url", str(data), "--output_url", str(out), "--epochs", "20",
            *map(str, QUICK)]
    job = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    for line in job.stdout:
        if line.startswith("epoch 1/20  train_loss"):
            break
    job.send_signal(signum)
    stdout, stderr = job.communicate(timeout=120)
    # MindSpore turns a Ctrl-C that lands inside a graph step into SIGTERM, so Ctrl-C may exit as 143.
    assert job.returncode in (128 + signum, 128 + signal.SIGTERM), stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("error: stopped by SIG"), stderr[-3000:]
    assert "Traceback" not in stderr

    assert [r["epoch"] for r in read_json(out / "metrics.json")] == [1]  # the cut-short epoch is not recorded
    assert (out / "resnet18-last.ckpt").is_file()
    assert not list((out / ".aim" / "locks").glob("*"))  # the run was closed: no lock left behind
    from aim.storage.context import Context
    (run,) = read_runs(out).values()
    assert run.end_time is not None
    assert run.get_metric("accuracy", Context({"subset": "val"})).dataframe()["step"].tolist() == [1]


def test_a_diverging_loss_stops_the_run_naming_the_step(data, tmp_path):
    out = tmp_path / "out"
    result = run_train("--data_url", data, "--output_url", out, "--epochs", 3, *QUICK, "--lr", "1e30")
    assert result.returncode == 3, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("error: the loss became ") and " at step " in line and "Traceback" not in result.stdout
    assert not (out / "metrics.json").exists()  # no epoch finished, so none is recorded
    assert not list((out / ".aim" / "locks").glob("*"))  # the Aim run was closed
