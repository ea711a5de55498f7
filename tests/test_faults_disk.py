"""The disk-fault catalogue: an output disk that is full, read-only or deleted while the job runs ends it with one
`error:` line and exit 2 within a deadline (Aim's close used to hang on a full disk, deaf to SIGTERM), leaves no
partial file behind and damages nothing that was complete; a stop signal still ends a job that waits on a full disk.

Each case is a real training job on a real small tmpfs (mounting needs root: skipped otherwise). Sizes pick the
moment the disk fills: ResNet18's checkpoints are 45 MB, its resume state 90 MB, its MindIR 45 MB, an Aim run about
1 MB (RocksDB also reserves room for its logs, so Aim's own moment is set by filling its disk from outside)."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import pytest

import conftest
import export
from conftest import assert_fails_cleanly, snapshot, stderr_lines
from errors import OutputError
from run_state import AIM_SERIES
from make_demo_data import make_split, write_cifar

TINY = ["--arch", "resnet18", "--image_size", 32, "--epochs", 1, "--batch_size", 8]
PREVIOUS = "curves.png"  # a previous run's file, which a new run replaces only once it has finished
SIGNAL_DEADLINE = 20  # seconds from SIGTERM to the job's end


@pytest.fixture(scope="module")
def data(module_tmp):
    return write_cifar(module_tmp / "cifar", make_split(40, 2, 0), make_split(10, 2, 1), ["a", "b"])


@pytest.fixture
def tmpfs(tmp_path):
    """tmpfs(name, size) mounts a fresh tmpfs of `size` (e.g. "1m") at tmp_path/name; all are unmounted after."""
    mounted = []

    def mount(name, size):
        folder = tmp_path / name
        folder.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("a real full disk needs a tmpfs, and there is no `mount` here")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"a real full disk needs a tmpfs, which only root can mount: {result.stderr.strip()}")
        mounted.append(folder)
        return folder
    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "--lazy", str(folder)], capture_output=True)  # lazy: a killed job may hold files


def with_previous_run(disk, read_only=False):
    """An output folder on `disk` holding a previous run's file; with `read_only`, the disk is then made so."""
    out = disk / "out"
    out.mkdir()
    (out / PREVIOUS).write_bytes(b"the previous run's learning curves")
    if read_only:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    return out


# ---------------------------------------------------------------- what happens to a disk once the job trains

def fill(disk, leave=256 << 10):
    """Another program takes all but `leave` bytes. Aim's open write-ahead logs have their room reserved, so
    tracking goes on; flushing its databases when the run closes cannot. (With 64 KB left, a slow epoch on a loaded
    machine ran out while still training, 1 time in 3 full runs; with 1 MB the close had room.)"""
    with open(disk / "filler", "wb") as filler:
        os.posix_fallocate(filler.fileno(), 0, max(1, shutil.disk_usage(disk).free - leave))


def fill_then_sigterm(disk):
    def act(job):
        """SIGTERM once RocksDB logs that it waits for free space, i.e. once Aim's close is stuck."""
        fill(disk)
        deadline = time.monotonic() + 120
        while job.poll() is None and time.monotonic() < deadline:
            if any("No space left on device" in log.read_text(errors="replace") for log in disk.rglob("LOG")):
                job.send_signal(signal.SIGTERM)
                return time.monotonic()
            time.sleep(0.2)
    return act


class Case(NamedTuple):
    argv: list  # after --data_url DATA
    out: Path  # the output folder, holding a previous run's file
    says: tuple  # what the one error line must say (all of it)
    deadline: float  # seconds for the whole job
    during: Optional[Callable] = None  # done to the job once it trains; returns when it signalled the job, if it did
    exit_code: int = 2
    complete: tuple = ()  # outputs written before the fault: each must still load
    kept: bool = True  # the previous run's file stays (not when the folder is deleted)
    env: Optional[dict] = None  # the job's environment, when not this one's


FULL = "no space left on device"


def full_disk(size, unwritten, complete=(), deadline=150):
    """The output folder (and its Aim repo) on a disk of `size`, which fills while writing `unwritten`."""
    def case(tmpfs):
        out = with_previous_run(tmpfs("disk", size))
        return Case(["--output_url", out], out, (f"cannot write {unwritten} in {out}: {FULL}",), deadline,
                    complete=complete)
    return case


def aim_disk(size, says, during=None, io_timeout=5, exit_code=2):
    """Outputs on a roomy disk, the Aim repo (--aim_repo) on a disk of `size`; `says(aim folder)`."""
    def case(tmpfs):
        out, aim = with_previous_run(tmpfs("disk", "300m")), tmpfs("aim", size)
        return Case(["--output_url", out, "--aim_repo", aim, "--io_timeout", io_timeout], out, says(aim), 150,
                    during(aim) if during else None, exit_code)
    return case


def read_only(tmpfs):
    out = with_previous_run(tmpfs("disk", "1m"), read_only=True)
    return Case(["--output_url", out], out, (f"{out} cannot be written", "Read-only file system"), 60)


def read_only_mid_run(tmpfs):
    disk, aim = tmpfs("disk", "300m"), tmpfs("aim", "50m")  # Aim's files open for writing would block the remount
    out = with_previous_run(disk)
    return Case(["--output_url", out, "--aim_repo", aim], out, (f"in {out}: read-only file system",), 120,
                lambda job: remount_read_only(disk))


def remount_read_only(disk, tries=100):
    """The remount is refused (EBUSY) while a file on the disk is open for writing, e.g. a checkpoint being saved:
    try again until it is not."""
    for _ in range(tries):
        if subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True).returncode == 0:
            return None
        time.sleep(0.1)
    raise AssertionError(f"{disk} could not be made read-only")


def deleted_mid_run(tmpfs):
    out = with_previous_run(tmpfs("disk", "300m"))
    return Case(["--output_url", out], out, (f"in {out}: the folder was deleted while the job ran",), 120,
                lambda job: shutil.rmtree(out.rename(out.with_name("deleted")), ignore_errors=True), kept=False)
    # renamed first: the folder is gone at once, whatever the job creates in it while it is being deleted


def series_disk_full(tmpfs):
    """aim cannot be imported: the run's series (aim-series/, in the outputs) on a disk of their own, which the
    epoch's images fill."""
    from test_aim_fallback import without_aim
    out = with_previous_run(tmpfs("disk", "300m"))
    series = tmpfs(f"disk/out/{AIM_SERIES}", "64k")
    return Case(["--output_url", out], out, (f"cannot write the run's series in {series}: {FULL}",), 120,
                env=without_aim())


CASES = {
    "disk full as Aim migrates its database": full_disk("64k", "the Aim repo", deadline=60),  # in a child process
    "disk full as the Aim repo is created": full_disk("150k", "the Aim repo", deadline=60),
    "disk full at the first checkpoint": full_disk("1m", "resnet18-last.ckpt"),
    "disk full at the best checkpoint": full_disk("60m", "resnet18-best.ckpt", complete=("resnet18-last.ckpt",)),
    "disk full during the MindIR export": full_disk("200m", "resnet18-best.mindir",
                                                    complete=("resnet18-best.ckpt", "resume.ckpt")),
    "Aim repo's disk full while training": aim_disk("700k", lambda aim: (f"repo in {aim}", FULL)),
    "Aim repo's disk full as the run closes": aim_disk(
        "20m", lambda aim: (f"Aim did not finish writing its repo in {aim} within 5 s: {FULL}",),
        lambda disk: lambda job: fill(disk)),
    "SIGTERM while Aim waits on a full disk": aim_disk("20m", lambda aim: ("stopped by SIGTERM",), fill_then_sigterm,
                                                       io_timeout=600, exit_code=128 + signal.SIGTERM),
    "read-only output folder": read_only,
    "output folder turns read-only mid-run": read_only_mid_run,
    "output folder deleted mid-run": deleted_mid_run,
    "series' disk full, where aim cannot be imported": series_disk_full,
}


def run_job(argv, logs, timeout, during=None, env=None):
    """train.py with its output in files (a pipe nobody reads could block it), and `during(job)` done once it
    trains. Returns the result and the seconds from `during`'s signal to the job's end (None: no signal)."""
    stdout, stderr = logs / "stdout.txt", logs / "stderr.txt"
    signalled = None
    with stdout.open("w") as out, stderr.open("w") as err:
        job = subprocess.Popen([sys.executable, str(conftest.TRAIN_PY), *map(str, argv)], stdout=out, stderr=err,
                               env=env)
        try:
            if during is not None:
                while job.poll() is None and "\ntrain: " not in "\n" + stdout.read_text():
                    time.sleep(0.2)
                signalled = during(job)
            job.wait(timeout=timeout)
        finally:
            job.kill()
            job.wait()
    ended = time.monotonic()
    result = subprocess.CompletedProcess(job.args, job.returncode, stdout.read_text(), stderr.read_text())
    return result, (ended - signalled if signalled else None)


BEFORE_TRAINING = {"disk full as Aim migrates its database", "disk full as the Aim repo is created",
                   "read-only output folder"}


@pytest.mark.parametrize("case", [name if name in BEFORE_TRAINING else pytest.param(name, marks=pytest.mark.slow)
                                  for name in sorted(CASES)])
def test_disk_fault_ends_cleanly(case, data, tmpfs, tmp_path):
    import mindspore as ms
    plan = CASES[case](tmpfs)
    before = snapshot(plan.out)
    start = time.monotonic()
    result, after_signal = run_job(["--data_url", data, *plan.argv, *TINY], tmp_path, plan.deadline + 30,
                                   plan.during, plan.env)
    elapsed = time.monotonic() - start
    if plan.env is not None:  # without aim the job says so once, then fails with its one error line
        lines = result.stderr.splitlines()
        assert sum(line.startswith("warning: aim cannot be imported") for line in lines) == 1, lines
        result.stderr = "\n".join(line for line in lines if not line.startswith("warning: aim cannot be imported"))
    assert_fails_cleanly(result, plan.says[0], plan.exit_code)
    assert all(part in stderr_lines(result)[0] for part in plan.says), stderr_lines(result)
    assert elapsed < plan.deadline, f"took {elapsed:.0f} s"
    assert after_signal is None or after_signal < SIGNAL_DEADLINE, f"ended {after_signal:.0f} s after SIGTERM"
    if plan.kept:
        after = snapshot(plan.out)
        assert {path: after.get(path) for path in before} == before
    assert [p.name for p in plan.out.rglob("*") if ".partial" in p.name
            or (p.suffix == ".tmp" and ".aim" not in p.parts)] == []
    for name in plan.complete:
        assert ms.load_checkpoint(str(plan.out / name)), name


# ---------------------------------------------------------------- each writer on a full disk, in this process

def tiny_net():
    import mindspore.nn as nn
    return nn.Conv2d(3, 64, 3)  # 7 KB of weights


WRITERS = {  # name -> (file name, write(path))
    "checkpoint": ("w.ckpt", lambda path: export.save_checkpoint(tiny_net(), path)),
    "MindIR": ("w.mindir", lambda path: export.export_graph(tiny_net(), 8, path)),
    "JSON": ("metrics.json", lambda path: export.write_json(path, list(range(5000)))),
    "figure": ("curves.png", lambda path: export.plot_curves([{"epoch": 1, "train_loss": 1.0, "val_loss": 1.0,
                                                                "val_accuracy": 0.5}], path)),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_write_on_a_full_disk_keeps_the_complete_file_and_leaves_no_partial(writer, tmpfs, capfd):
    name, write = WRITERS[writer]
    disk = tmpfs("disk", "2m")
    write(disk / name)
    before = snapshot(disk)
    fill(disk, leave=4096)
    with pytest.raises(OutputError, match=f"cannot write {name} in {disk}: no space left on device"):
        write(disk / name)
    assert sorted(p.name for p in disk.iterdir()) == sorted([name, "filler"])  # no partial file
    assert {path: data for path, data in snapshot(disk).items() if path.name != "filler"} == before
    assert "Failed to save" not in capfd.readouterr().err  # MindSpore's own line: the job's error says it


@pytest.mark.parametrize("exc, folder_state, says", [
    (OSError(28, "No space left on device"), "roomy", "no space left on device"),
    (RuntimeError("IO error: No space left on device While appending to file"), "roomy", "no space left on device"),
    (OSError(30, "Read-only file system"), "roomy", "read-only file system"),
    (FileNotFoundError(2, "No such file or directory"), "gone", "the folder was deleted while the job ran"),
    (FileNotFoundError(2, "No such file or directory"), "roomy", None),  # the folder is there: a bug elsewhere
    (ValueError("a bug"), "roomy", None),
    (KeyboardInterrupt(), "roomy", None),
])
def test_only_disk_faults_become_one_error_line(exc, folder_state, says, tmp_path):
    """What is put down to the disk, and what keeps its traceback as the bug it is."""
    from errors import write_fault
    folder = tmp_path / "out"
    if folder_state == "roomy":
        folder.mkdir()
    fault = write_fault(exc, folder, "metrics.json")
    if says is None:
        assert fault is None
    else:
        assert isinstance(fault, OutputError) and str(fault) == f"cannot write metrics.json in {folder}: {says}"
