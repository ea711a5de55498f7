"""Fault catalogue, flags and job configs: numbers no job can use (NaN, inf, sizes beyond any machine's memory) and
job configs that would run code or write files outside their folders, or print a URL's secrets. Each ends with one
`error:` line (or the named warning where the job goes on), leaves earlier outputs byte-identical and ends in time."""
import json
import os
import zlib
import shutil
import subprocess
import sys
import time

import pytest
from conftest import ROOT, assert_fails_cleanly, assert_warns_and_goes_on, run_train, snapshot
from test_bad_input import cifar, out  # noqa: F401  (out: a folder holding a previous run's file)

RUN_JOB = ROOT / "train" / "run_job.py"
ECHO_JOB = "tests/fixtures/echo_job/"
SECRET = "s3cr3t-token"
SIGNED = f"https://user:{SECRET}@obs.example.com/bucket/cifar.tgz?X-Amz-Signature={SECRET}"
PARSE_DEADLINE, TRAIN_DEADLINE = 60, 300  # seconds: refused while parsing / a tiny job that trains one epoch


def train(*flags):
    """train.py on tiny data into a fresh folder, then `flags` (argparse keeps the last value of a flag)."""
    return "train", lambda t, out: ["--data_url", cifar(t), "--output_url", t / "new-out", "--arch", "resnet18",
                                    "--image_size", 32, "--epochs", 1, "--batch_size", 8, *flags]


def repo_scratch(t):
    """A folder inside the repository (git-ignored job-work/), for a code_dir; removed after each test."""
    return ROOT / "job-work" / f"f{os.getpid()}-{zlib.crc32(t.name.encode())}"  # a code_dir the platform accepts


def job(check=True, extra=(), **changes):
    """run_job.py on config.json with `changes`, inputs given locally, the previous run's folder as --work."""
    def build(t, out):
        config = {**json.loads((ROOT / "config.json").read_text()), **changes}
        for key, value in config.items():
            config[key] = value(t) if callable(value) else value
        path = t / "job.json"
        path.write_text(json.dumps(config))
        return [path, "--input", "data_url=/d", "--input", "pretrain_url=/p", "--work", out, *extra,
                *(["--check"] if check else [])]
    return "job", build


def outside_script(t):
    (t / "outside.py").write_text("print('ran outside code_dir')\n")
    return str(t / "outside.py")


def linked_boot_file(t):
    """code_dir inside the repository whose train.py is a link to a script outside it."""
    code_dir = repo_scratch(t)
    code_dir.mkdir(parents=True)
    (code_dir / "train.py").symlink_to(outside_script(t))
    return str(code_dir.relative_to(ROOT)) + "/"


CASES = {  # name: (runner and its arguments, needle: an error, or "warning: ..." where the job goes on)
    "warmup_epochs nan": (train("--warmup_epochs", "nan"), "--warmup_epochs: must be a finite number"),
    "lr inf": (train("--lr", "inf"), "--lr: must be a finite number"),
    "lr that overflows to inf": (train("--lr=1e999"), "--lr: must be a finite number"),
    "momentum nan": (train("--momentum", "NaN"), "--momentum: must be a finite number"),
    "weight_decay inf": (train("--weight_decay", "inf"), "--weight_decay: must be a finite number"),
    "backbone_lr_scale nan": (train("--backbone_lr_scale=nan"), "--backbone_lr_scale: must be a finite number"),
    "io_timeout -inf": (train("--io_timeout=-inf"), "--io_timeout: must be a finite number"),
    "a billion epochs": (train("--epochs", "1000000000"), "--epochs: must be <= 10000"),
    "warmup longer than any schedule": (train("--warmup_epochs", "1e308"), "--warmup_epochs: must be <= 10000"),
    "image_size 100000": (train("--image_size", "100000"), "--image_size: must be <= 4096"),
    "a billion classes": (train("--num_classes", "1000000000"), "--num_classes: must be <= 100000"),
    "negative seed": (train("--seed", "-1"), "--seed: must be >= 0"),
    "platform flags and a misspelt signed URL": (
        train("--init_method=tcp://127.0.0.1:6666", "--num_gpus", "1", f"--data_ur={SIGNED}",
              "--aim_system_metrics=false"), "warning: ignoring unknown arguments: --init_method"),
    "boot_file ../../x.py": (job(boot_file="../../x.py"), "boot_file '../../x.py': folders of letters, digits"),
    "boot_file absolute": (job(boot_file=outside_script), "characters; the platform allows at most 50"),
    "boot_file absolute and short": (job(boot_file="/tmp/x.py"), "boot_file '/tmp/x.py' does not exist in code_dir"),
    "boot_file linked outside": (job(code_dir=linked_boot_file), "boot_file 'train.py' would leave code_dir"),
    "code_dir outside the repository": (job(code_dir="../"), "code_dir '../': only letters, digits, '_', '-' and '/' (no '.')"),
    "job_name with ../": (job(job_name="../escape"), "job_name '../escape': only letters, digits, '_' and '-'"),
    "job_name absolute": (job(job_name="/tmp/job"), "job_name '/tmp/job': only letters, digits, '_' and '-'"),
    "log_url outside --work": (job(log_url="../../logs/"), "log_url '../../logs/' would leave --work"),
    "output_dir outside --work": (job(outputs=[{"name": "output_path", "output_dir": "/tmp/out"}]),
                                  "outputs[0].output_dir '/tmp/out' would leave --work"),
    "env variable that cannot be set": (job(env_variables={"A=B": "1"}), "env_variables 'A=B' cannot be set"),
    "signed URL without NAME=": (job(extra=["--input", SIGNED]), "--input takes NAME=VALUE, got 'https://obs.example.com/"),
    "signed URL in a malformed entry": (job(inputs=[{"name": "data_url", "url": SIGNED}]),
                                        'inputs[0] must be {"name": ..., "input_url": ...}'),
    "PYTHONHOME from the image": (  # set, it would stop the local Python from starting
        job(check=False, code_dir=ECHO_JOB, boot_file="echo.py", job_name="echo-job",
            env_variables={"PYTHONHOME": "/home/ma-user/anaconda3"}),
        "warning: env_variables.PYTHONHOME is not set"),
}

TRAINS = {"platform flags and a misspelt signed URL"}  # goes on to train an epoch


@pytest.fixture
def scratch_cleanup(tmp_path):
    yield
    shutil.rmtree(repo_scratch(tmp_path), ignore_errors=True)


@pytest.mark.parametrize("case", [pytest.param(name, marks=pytest.mark.slow) if name in TRAINS else name
                                  for name in sorted(CASES)])
def test_flag_or_job_config_fault(case, tmp_path, out, scratch_cleanup):  # noqa: F811  (out is the fixture)
    (runner, build), needle = CASES[case]
    argv = build(tmp_path, out)
    deadline = TRAIN_DEADLINE if case in TRAINS else PARSE_DEADLINE
    before, paths = snapshot(out), sorted(out.rglob("*"))
    start = time.monotonic()
    if runner == "train":
        result = run_train(*argv, timeout=deadline + 30, cwd=tmp_path)
    else:
        result = subprocess.run([sys.executable, str(RUN_JOB), *map(str, argv)], capture_output=True, text=True,
                                timeout=deadline + 30, cwd=tmp_path)
    elapsed = time.monotonic() - start
    if needle.startswith("warning: "):
        assert_warns_and_goes_on(result, needle.removeprefix("warning: "))
        after = snapshot(out)
        assert {path: after.get(path) for path in before} == before  # the job may add files, not change them
    else:
        assert_fails_cleanly(result, needle)
        assert snapshot(out) == before and sorted(out.rglob("*")) == paths  # not even a folder is created
    assert SECRET not in result.stdout + result.stderr
    assert elapsed < deadline, f"{case} took {elapsed:.0f} s"
