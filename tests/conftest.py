"""Shared fixtures: generated learnable data, a train.py runner, and one trained model for the tests that need one."""
import contextlib
import shutil
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN_DIR = ROOT / "train" / "train_dir"
TRAIN_PY = TRAIN_DIR / "train.py"
sys.path[:0] = [str(TRAIN_DIR), str(ROOT / "train"), str(Path(__file__).parent)]
os.environ.setdefault("GLOG_v", "3")
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

import onednn_conv  # noqa: E402

onednn_conv.quiet_openmp()  # as train.py does, before MindSpore loads OpenMP
# The jobs the tests start train on MindSpore's convolutions: oneDNN's operators add about 3 seconds to every job's
# start, which over the suite's ~100 jobs cost 6 minutes. The shared trained model (below) and
# tests/test_onednn_conv.py train on oneDNN, as a user's job does by default.
os.environ.setdefault(onednn_conv.DISABLE, "0")
WITH_ONEDNN = {key: value for key, value in os.environ.items() if key != onednn_conv.DISABLE}
from make_demo_data import make_demo_data  # noqa: E402
from run_state import RunFiles  # noqa: E402

# The shared training run: ResNet50 from scratch on 4 colour-and-shape classes (chance: 0.25).
# Several hundred images and ~150 steps, because BatchNorm's moving statistics lag on less (see toolchain notes).
TRAINED = {"classes": 4, "train": 960, "val": 200, "epochs": 5, "batch_size": 32}


# Minutes each test file took in a full run (`make test PYTEST_ADDOPTS="--durations=0 --junitxml=..."`, summed per
# file from the XML; 2026-12-02, at 079e92d). `make test` gives whole files to two workers in this order,
# longest first (`--no-loadscope-reorder`), so that neither is left alone with a long file at the end, and the file
# that first needs the shared `trained` model (test_onnx_serving.py) makes it while the other worker runs one that
# does not (xdist's own order, by test count, had one worker wait for it). A file missing here counts 0 and runs last.
FILE_MINUTES = {"test_onnx_serving.py": 3.8, "test_train_job.py": 3.6, "test_data_parallel.py": 3.5,
                "test_resume.py": 3.2, "test_multi_node.py": 3.2, "test_faults_disk.py": 3.2,
                "test_remote_jobs.py": 2.5, "test_torch_weights.py": 2.2, "test_resnet.py": 2.1,
                "test_inference.py": 2.0, "test_faults_run.py": 1.6, "test_aim_runs.py": 1.6, "test_run_job.py": 1.6,
                "test_faults_data.py": 1.5, "test_onednn_conv.py": 1.4, "test_bad_input.py": 1.4,
                "test_partial_training.py": 1.2, "test_aim_fallback.py": 1.2, "test_recipes.py": 1.2,
                "test_faults_staging.py": 1.1, "test_faults_flags.py": 1.0, "test_predict_job.py": 0.8,
                "test_eval_job.py": 0.7, "test_train_step.py": 0.7, "test_staging.py": 0.4,
                "test_checkpoint_families.py": 0.3, "test_callbacks.py": 0.2, "test_aim_ui.py": 0.1}


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: -FILE_MINUTES.get(item.path.name, 0))  # stable: each file's own order is kept
    files = list(dict.fromkeys(item.path for item in items))
    needs_model = {item.path for item in items if "trained" in item.fixturenames}
    if len(files) > 2 and files[0] in needs_model and files[1] in needs_model:  # the second worker would wait
        second = next((path for path in files[2:] if path not in needs_model), files[1])
        files.remove(second)
        files.insert(1, second)
        items.sort(key=lambda item: files.index(item.path))


@pytest.fixture(params=["Momentum", "FusedMomentum"])
def momentum_kind(request, monkeypatch):
    """Runs a test with `train_step.create_optimizer`'s momentum SGD on MindSpore's kernels (nn.Momentum, as on a
    machine without the C++ library) and on fused_momentum.cc's one operator (FusedMomentum, CPU training's default)."""
    onednn_conv.load.cache_clear()
    if request.param == "FusedMomentum":
        monkeypatch.delenv(onednn_conv.DISABLE, raising=False)
        library, why_not = onednn_conv.load()
        if library is None:
            pytest.skip(f"no C++ library here: {why_not}")
    else:
        monkeypatch.setenv(onednn_conv.DISABLE, "0")
    yield request.param
    onednn_conv.load.cache_clear()


def read_json(path):
    return json.loads(Path(path).read_text())


def predictions(checkpoint, data, classes=TRAINED["classes"], arch="resnet50", image_size=32, split="val"):
    """(true labels, predicted labels) of a checkpoint on a split, computed here rather than by the code tested."""
    import mindspore as ms
    import numpy as np

    import datasets
    from resnet import create_model
    net = create_model(arch, classes)
    ms.load_param_into_net(net, ms.load_checkpoint(str(checkpoint)))
    net.set_train(False)
    truth, predicted = [], []
    for images, labels in datasets.create_dataset(datasets.find_data(data), split, image_size,
                                                  batch_size=50).create_tuple_iterator(output_numpy=True):
        truth += labels.tolist()
        predicted += net(ms.Tensor(images)).asnumpy().argmax(1).tolist()
    return np.array(truth), np.array(predicted)


def run_script(script, *args, timeout=900, cwd=None, env=None):
    """A job script in a fresh interpreter, as a user or the platform runs it."""
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def without(tmp_path, *modules):
    """An environment whose Python refuses to import `modules` (a sitecustomize on PYTHONPATH), and the file where
    every attempt is written, so a test can prove the module was never even tried."""
    guard = tmp_path / "guard"
    guard.mkdir()
    attempts = tmp_path / "import-attempts.txt"
    (guard / "sitecustomize.py").write_text(f"""
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {set(modules)!r}:
            with open({str(attempts)!r}, "a") as log:
                log.write(name + "\\n")
            raise ImportError(f"{{name}} is not installed (refused by the test)")
sys.meta_path.insert(0, Refuse())
""")
    return {"PYTHONPATH": os.pathsep.join([str(guard), os.environ.get("PYTHONPATH", "")])}, attempts


def run_train(*args, timeout=900, cwd=None, env=None, onnx=False):
    """train.py in a fresh interpreter, as a user or the platform runs it. The ONNX export and its check (about 10
    seconds a job on 2 cores) run only where a test asks for them (`onnx`): the shared trained model has them."""
    if not onnx and "--export_onnx" not in map(str, args):
        args = (*args, "--export_onnx", "false")
    return run_script(TRAIN_PY, *args, timeout=timeout, cwd=cwd, env=env)


# ---------------------------------------------------------------- the bad-input and fault catalogue's checks

def snapshot(folder):
    """Every file below `folder` with its bytes: what a failed run must leave exactly as it was."""
    return {p: p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


def stderr_lines(result):
    """What the job said on stderr, without blank lines and MindSpore's own [WARNING] log lines."""
    return [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("[WARNING]")]


def assert_fails_cleanly(result, needle, exit_code=2):
    """The catalogue's promise: the exit code, exactly one `error:` line that mentions `needle`, no traceback."""
    lines = stderr_lines(result)
    assert result.returncode == exit_code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


def assert_warns_and_goes_on(result, needle):
    """A fault the job can work around: exit 0, a `warning:` line that mentions `needle`, no error, no traceback."""
    lines = stderr_lines(result)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    assert any(line.startswith("warning: ") and needle in line for line in lines), lines
    assert not any(line.startswith("error: ") for line in lines), lines


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request):
    """A folder for one module's shared files, deleted when the module is done: ResNet checkpoints are 45-190 MB
    each, and keeping every module's until the session ends filled the CI disk."""
    path = tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """A few images per class in both layouts: enough to load, too few to learn from."""
    return make_demo_data(tmp_path_factory.mktemp("small"), train=64, val=32, num_classes=4, seed=3)


def once_per_session(tmp_path_factory, name, make):
    """`make(folder)` once for the whole session, also under pytest-xdist (`make test` runs two workers), where
    each worker would otherwise repeat it: the first makes it under a lock, the others wait and read what it left.
    Returns the folder and what `make` returned (JSON)."""
    import fcntl
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by the workers of this session
    folder, done = base / name, base / f"{name}.json"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            done.write_text(json.dumps(make(folder)))
    return folder, json.loads(done.read_text())


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One ResNet50 trained on learnable data, shared by every test that inspects a finished job."""
    def train(root):
        make_demo_data(root / "data", TRAINED["train"], TRAINED["val"], TRAINED["classes"], seed=0)
        result = run_train("--data_url", root / "data", "--output_url", root / "out", "--image_size", 32,
                           "--epochs", TRAINED["epochs"], "--batch_size", TRAINED["batch_size"], "--lr", 0.01,
                           "--warmup_epochs", 1, "--experiment", "pytest", "--seed", 7, onnx=True, env=WITH_ONEDNN)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return {"stdout": result.stdout, "stderr": result.stderr}

    root, made = once_per_session(tmp_path_factory, "trained", train)
    out = root / "out"
    return {"out": out, "files": RunFiles(out, "resnet50"), "data": root / "data" / "cifar-10-batches-bin",
            "result": subprocess.CompletedProcess([], 0, made["stdout"], made["stderr"])}


# ---------------------------------------------------------------- loopback servers for remote storage

S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
           "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server():
    """A real moto S3 server on 127.0.0.1; its endpoint serves both s3:// and obs:// (S3-compatible)."""
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {**S3_KEYS, "S3_ENDPOINT": endpoint, "OBS_ENDPOINT": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture
def bucket(s3_server, request):
    """A fresh bucket; its name is unique per test."""
    import fsspec
    import hashlib
    readable = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    name = f"b-{readable}-{hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:8]}"  # unique when cut short
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_server})
    fs.mkdir(name)
    fs.invalidate_cache()
    return name


@pytest.fixture(scope="session")
def http_server(tmp_path_factory):
    """A real http.server on 127.0.0.1 serving a folder; returns (base URL, folder)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
    root = tmp_path_factory.mktemp("www")

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()


# ---------------------------------------------------------------- Aim's own servers

def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url, timeout=60):
    """GET a JSON document, retrying until a just-started server answers."""
    import json
    import time
    import urllib.request
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@contextlib.contextmanager
def aim_process(*args):
    """`aim ARGS --host 127.0.0.1 --port P` in its own process group; yields P. The whole group is ended after,
    because uvicorn workers outlive the parent."""
    import signal
    port = free_port()
    aim = Path(sys.executable).parent / "aim"
    server = subprocess.Popen([str(aim), *map(str, args), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        yield port
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="session")
def chromium():
    """Debian's Chromium, installed here when missing (Playwright's own browser download cannot work offline)."""
    path = shutil.which("chromium")
    if path is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env, timeout=600)
        install = subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], capture_output=True, text=True,
                                 env=env, timeout=900)
        path = shutil.which("chromium")
        if path is None:
            pytest.skip(f"Chromium could not be installed: {install.stderr.strip().splitlines()[-1:]}")
    if path is None:
        pytest.skip("Chromium is not installed and apt-get is not usable here (needs root)")
    return path


# ---------------------------------------------------------------- Huawei's moxing, as a test double

MOXING_DOUBLE = Path(__file__).resolve().parent / "fixtures" / "moxing_double"


class MoxingDouble:
    def __init__(self, root, log):
        self.root, self.log = root, log

    def calls(self, *names):
        """(call, args) of every call so far, or of those named, in order."""
        if not self.log.exists():
            return []
        records = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [(r["call"], tuple(r["args"])) for r in records if not names or r["call"] in names]


@pytest.fixture
def moxing_double(tmp_path, monkeypatch):
    """obs://BUCKET/... lives in the double's root folder. fsspec's S3 is pointed at a closed port and has no keys,
    so in a new process (train.py) any read or write that bypassed moxing would fail."""
    root, log = tmp_path / "moxing-root", tmp_path / "moxing-calls.jsonl"
    root.mkdir()
    monkeypatch.setenv("MOXING_DOUBLE_ROOT", str(root))
    monkeypatch.setenv("MOXING_DOUBLE_LOG", str(log))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(MOXING_DOUBLE), os.environ.get("PYTHONPATH")])))
    for name in ("OBS_ENDPOINT", "S3_ENDPOINT", "AWS_ENDPOINT_URL"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{free_port()}")
    for name in ("OBS_ACCESS_KEY_ID", "OBS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.syspath_prepend(str(MOXING_DOUBLE))
    yield MoxingDouble(root, log)
    for name in ("moxing", "moxing.file"):
        sys.modules.pop(name, None)
