"""What the cloud job installs: train/train_dir/pip-requirements.txt on the platform's MindSpore 2.2 / Python 3.9 image."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TRAIN_DIR, TRAIN_PY, free_port

from make_demo_data import make_split, write_cifar

REQUIREMENTS = TRAIN_DIR / "pip-requirements.txt"


def requirement_names():
    lines = [line.split("#")[0].strip() for line in REQUIREMENTS.read_text().splitlines()]
    return {re.split(r"[<>=!~\[; ]", line)[0].lower(): line for line in lines if line}


def test_never_pins_mindspore_and_keeps_numpy_below_2():
    names = requirement_names()
    assert "mindspore" not in names and not any(n.startswith("mindspore") for n in names)
    assert "<2" in names["numpy"]
    assert {"aim", "fsspec", "s3fs", "tqdm", "matplotlib"} <= set(names)
    local = (ROOT / "requirements.txt").read_text()
    assert re.search(r"^aim==([\d.]+)", local, re.M).group(1) == re.search(r"aim==([\d.]+)", names["aim"]).group(1)
    assert 'platform_machine == "x86_64"' in names["aim"]  # no aim build exists for aarch64: left out there
    assert "safetensors" in names and not {"torch", "torchvision", "timm"} & set(names)  # PyTorch: tests only
    assert not {"torch", "torchvision", "timm"} & set(re.findall(r"^([\w-]+)", INFERENCE_REQUIREMENTS.read_text(),
                                                               re.M))


network = pytest.mark.skipif(os.environ.get("RUN_NETWORK_TESTS") != "1",
                             reason="asks PyPI (not loopback): run with RUN_NETWORK_TESTS=1, as `make check-cloud` does")


@pytest.mark.network
@network
@pytest.mark.parametrize("platform, aim", [("x86_64-manylinux_2_28", "3.29.1"), ("aarch64-manylinux_2_28", None)])
def test_resolves_for_python_3_9_from_wheels(platform, aim):
    """The toolchain notes' recipe: uv resolves for another Python version and machine without that interpreter.
    Wheels only (no compiler on the image), except aim-ui: aim's web UI, a source package with nothing to build.
    On aarch64 (the Ascend images) aim has no build at all, so it is left out."""
    result = subprocess.run([sys.executable, "-m", "uv", "pip", "compile", str(REQUIREMENTS), "--python-version",
                             "3.9", "--python-platform", platform, "--only-binary", ":all:", "--no-binary", "aim-ui",
                             "--no-header", "--quiet"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    resolved = dict(line.split("==") for line in result.stdout.splitlines() if "==" in line and not line.startswith(" "))
    assert resolved.get("aim") == aim and resolved["numpy"].startswith("1.")
    assert "mindspore" not in resolved and {"onnx", "onnxruntime"} <= set(resolved)  # the export is checked there too
    assert "safetensors" in resolved and "torch" not in resolved  # timm's weights load without PyTorch


def python_3_9():
    """A working Python 3.9 on this machine (pyenv's, or on PATH), else "3.9" for uv to find or download."""
    import glob
    import shutil
    candidates = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python3.9")))[::-1]
    candidates += [shutil.which("python3.9")] if shutil.which("python3.9") else []
    for python in candidates:  # a pyenv shim on PATH fails when 3.9 is not selected
        if subprocess.run([python, "-c", "pass"], capture_output=True).returncode == 0:
            return python
    return "3.9"


def python_3_9_venv(name, *requirements):
    """ROOT/name: a Python 3.9 venv with `requirements` (uv pip install arguments), rebuilt when they change."""
    venv = ROOT / name
    stamp = venv / ".installed-requirements"
    wanted = "\n".join(Path(r).read_text() if Path(r).is_file() else r for r in requirements)
    if not stamp.is_file() or stamp.read_text() != wanted:
        subprocess.run([sys.executable, "-m", "uv", "venv", "--clear", "--python", python_3_9(), str(venv)], check=True,
                       timeout=900)
        args = [a for r in requirements for a in (["-r", str(r)] if Path(r).is_file() else [r])]
        subprocess.run([sys.executable, "-m", "uv", "pip", "install", "--python", str(venv / "bin" / "python"),
                        *args], check=True, timeout=1800)
        stamp.write_text(wanted)
    return venv / "bin"


@pytest.fixture(scope="module")
def cloud_python():
    """Shaped like the platform's training image: the oldest MindSpore 2.x on PyPI (2.0.0; the image has 2.2, which
    PyPI does not carry), then pip-requirements.txt as the job installs it."""
    return python_3_9_venv(".venv-py39", "mindspore==2.0.0", REQUIREMENTS)


def runs_seen_by_aim_up(bin_dir, repo):
    """How many bytes `aim up` (of that venv) streams back for a search of all runs: 0 when it sees none."""
    port = free_port()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}  # aim runs `alembic` from PATH
    server = subprocess.Popen([str(bin_dir / "aim"), "up", "--repo", str(repo), "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        import urllib.request
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/runs/search/run/?q=", timeout=30) as r:
                    return len(r.read())
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


@pytest.mark.network
@network
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the job's aim is installed on x86_64 only")
def test_the_job_runs_on_python_3_9_and_the_local_aim_shows_its_run(cloud_python, tmp_path):
    """The cloud job's Python and requirements fine-tune torchvision's weights (a .safetensors, no PyTorch there)
    and track a run, which `aim up` of this machine's venv (the local pin) shows, as a user who downloads the job's
    outputs would see it."""
    data = write_cifar(tmp_path / "cifar", make_split(64, 2, 0), make_split(32, 2, 1), ["cat", "dog"])
    weights = tmp_path / "resnet18.safetensors"
    subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[2]); import torch_resnet; "
                    "from safetensors.torch import save_file; "
                    "save_file(torch_resnet.create_model('resnet18', 1000).state_dict(), sys.argv[1])",
                    str(weights), str(Path(__file__).resolve().parents[1] / "bench")], check=True)
    env = {**os.environ, "PATH": f"{cloud_python}:{os.environ['PATH']}"}
    cloud = subprocess.run([str(cloud_python / "python"), str(TRAIN_PY), "--data_url", str(data), "--epochs", "1",
                            "--arch", "resnet18", "--image_size", "32", "--batch_size", "16", "--output_url",
                            str(tmp_path / "cloud"), "--pretrain_url", str(weights)],
                           env=env, capture_output=True, text=True, timeout=900)
    assert cloud.returncode == 0, cloud.stderr[-3000:]
    assert "(torchvision/timm checkpoint, pytorch padding); 100/100 backbone" in cloud.stdout
    assert "export: resnet18-best.onnx agrees with the model on 16 validation images" in cloud.stdout, cloud.stderr
    assert runs_seen_by_aim_up(cloud_python, tmp_path / "cloud") > 1000
    assert runs_seen_by_aim_up(Path(sys.executable).parent, tmp_path / "cloud") > 1000


INFERENCE_REQUIREMENTS = ROOT / "inference" / "requirements.txt"


@pytest.mark.network
@network
def test_inference_requirements_resolve_for_python_3_9():
    result = subprocess.run([sys.executable, "-m", "uv", "pip", "compile", str(INFERENCE_REQUIREMENTS),
                             "--python-version", "3.9", "--python-platform", "x86_64-manylinux_2_28", "--no-header",
                             "--quiet"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    resolved = dict(line.split("==") for line in result.stdout.splitlines() if "==" in line and not line.startswith(" "))
    assert resolved["gradio"].startswith("4.") and resolved["numpy"].startswith("1.")
    assert "onnxruntime" in resolved and "mindspore" not in resolved  # the pod serves the .onnx: no 778 MB wheel


@pytest.mark.network
@network
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the inference pod is x86_64")
def test_the_app_serves_the_onnx_on_python_3_9_with_gradio_4_and_no_mindspore(tmp_path):
    """The inference pod's Python with inference/requirements.txt (no MindSpore) serves the .onnx of a model
    trained here (MindSpore 2.10); asked for the .ckpt, it says in one line what it would need."""
    from gradio_client import handle_file
    bin_dir = python_3_9_venv(".venv-py39-inference", INFERENCE_REQUIREMENTS)
    assert subprocess.run([str(bin_dir / "python"), "-c", "import mindspore"], capture_output=True).returncode != 0
    data = write_cifar(tmp_path / "cifar", make_split(64, 2, 0), make_split(32, 2, 1), ["cat", "dog"])
    out = tmp_path / "out"
    trained = subprocess.run([sys.executable, str(TRAIN_PY), "--data_url", str(data), "--epochs", "1", "--arch",
                              "resnet18", "--image_size", "32", "--batch_size", "16", "--output_url", str(out)],
                             capture_output=True, text=True, timeout=900)
    assert trained.returncode == 0, trained.stderr[-3000:]
    sys.path.insert(0, str(ROOT / "inference"))
    from launch import running_app
    from predictor import Predictor
    example = sorted((out / "examples").iterdir())[0]
    expected = Predictor.load(out / "resnet18-best.onnx").predict([example], top_k=2)[0]
    with running_app(["--model", out / "resnet18-best.onnx"], python=bin_dir / "python") as (_, client):
        result = client.predict(handle_file(str(example)), api_name="/predict")
        assert result["label"] == expected[0][0]
        assert [c["confidence"] for c in result["confidences"]] == pytest.approx([p for _, p in expected], abs=1e-5)
        junk = tmp_path / "junk.png"
        junk.write_text("not an image")
        with pytest.raises(Exception, match="not an image"):
            client.predict(handle_file(str(junk)), api_name="/predict")
    refused = subprocess.run([str(bin_dir / "python"), str(ROOT / "inference" / "app.py"), "--model",
                              str(out / "resnet18-best.ckpt")], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        "error: resnet18-best.ckpt needs MindSpore (pip install mindspore); without it, serve the job's .onnx with "
        "onnxruntime"]


ARM64_ROOT = ROOT / os.environ.get("ARM64_ROOT", ".cache/arm64-bullseye")  # `make check-cloud` builds it


@pytest.mark.network
@network
@pytest.mark.skipif(not (ARM64_ROOT / "usr" / "bin" / "python3.9").is_file(),
                    reason="needs the emulated arm64 root that `make check-cloud` extracts from Debian's packages")
def test_the_job_installs_from_wheels_and_runs_on_emulated_aarch64_without_aim(tmp_path):
    """The Ascend images' machine: aarch64, Python 3.9, MindSpore (2.0.0, the oldest 2.x with an aarch64 wheel on
    PyPI) and numpy. pip-requirements.txt installs there from wheels alone, aim is left out, and the job, run under
    qemu, keeps its series, which replay into a local Aim repo that `aim up` serves with the run's metrics."""
    import json
    import shutil
    site = tmp_path / "site-packages"
    subprocess.run([sys.executable, "-m", "uv", "pip", "install", "--quiet", "--target", str(site),
                    "--python-platform", "aarch64-manylinux_2_28", "--python-version", "3.9", "--only-binary", ":all:",
                    "-r", str(REQUIREMENTS), "mindspore==2.0.0"], check=True, timeout=1800)
    assert not (site / "aim").exists() and (site / "mindspore").is_dir()
    data = write_cifar(tmp_path / "cifar", make_split(32, 2, 0), make_split(16, 2, 1), ["cat", "dog"])
    out = tmp_path / "out"
    started = time.monotonic()
    job = subprocess.run([shutil.which("qemu-aarch64-static"), "-L", str(ARM64_ROOT),
                          str(ARM64_ROOT / "usr" / "bin" / "python3.9"), str(TRAIN_PY), "--data_url", str(data),
                          "--output_path", str(out), "--epochs", "1", "--arch", "resnet18", "--image_size", "32",
                          "--batch_size", "16", "--aim_system_metrics", "false"],
                         env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=3600,
                         cwd=tmp_path)
    print(f"emulated aarch64 job: {time.monotonic() - started:.0f} s")
    assert job.returncode == 0, job.stderr[-3000:]
    warnings = [line for line in job.stderr.splitlines() if line.startswith(("warning:", "error:"))]
    assert len(warnings) == 1 and warnings[0].startswith("warning: aim cannot be imported"), warnings
    assert (out / "resnet18-best.mindir").is_file() and not (out / ".aim").exists()

    replayed = subprocess.run([sys.executable, str(TRAIN_PY.parent / "series.py"), str(out), "--repo",
                               str(tmp_path / "runs")], capture_output=True, text=True, timeout=300)
    assert replayed.returncode == 0, replayed.stderr
    (run_folder,) = (out / "aim-series").iterdir()
    tracked = [json.loads(line) for line in (run_folder / "series.jsonl").read_text().splitlines()]
    wanted = [{"name": "accuracy", "context": {"subset": "val"}}, {"name": "loss", "context": {"subset": "train"}}]
    from aim import Repo
    from conftest import aim_process, get_json
    (run_hash,) = Repo(str(tmp_path / "runs")).list_all_runs()
    with aim_process("up", "--repo", tmp_path / "runs") as port:
        info = get_json(f"http://127.0.0.1:{port}/api/runs/{run_hash}/info/")
        import urllib.request
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/runs/{run_hash}/metric/get-batch/",
                                         data=json.dumps(wanted).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            served = json.loads(response.read())
    assert info["params"]["hparams"]["arch"] == "resnet18"
    for metric, series in zip(wanted, served):
        expected = [(r["step"], r["value"]) for r in tracked if r["name"] == metric["name"]
                    and r["context"] == metric["context"]]
        assert series["iters"] == [step for step, _ in expected] and len(expected) >= 1, metric
        assert series["values"] == pytest.approx([value for _, value in expected]), metric
