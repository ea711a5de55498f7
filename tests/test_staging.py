"""Staging inputs into the cache and mirroring outputs, against real servers on 127.0.0.1 (moto S3 as s3:// and
obs://, http.server), local disk, and the moxing test double; and whole jobs whose storage is moxing."""
import shutil
import socketserver
import sys
import tarfile
import threading
import time

import pytest
from conftest import MOXING_DOUBLE, free_port, run_train

import datasets
import staging
import storage
from errors import UserError
from make_demo_data import make_split, write_cifar


def write_files(root, files):
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def cifar_tarball(path, train=40, val=12):
    folder = write_cifar(path.parent / "tmp-cifar" / "cifar-10-batches-bin", make_split(train, 2, 0),
                         make_split(val, 2, 1), ["cat", "dog"])
    with tarfile.open(path, "w:gz") as tf:
        tf.add(folder, arcname="cifar-10-batches-bin")
    return path


def test_http_archive_is_fetched_once_and_detected(http_server, tmp_path, capsys):
    base, root = http_server
    cifar_tarball(root / "cifar-10-binary.tar.gz")
    url = f"{base}/cifar-10-binary.tar.gz"
    staged = staging.stage_in(url, "data_url", tmp_path / "cache")
    assert datasets.find_data(staged).sizes == {"train": 40, "val": 12}
    assert "staging" in capsys.readouterr().out
    assert staging.stage_in(url, "data_url", tmp_path / "cache") == staged
    assert "using the cached copy" in capsys.readouterr().out


def test_local_archive_is_extracted_into_the_cache(tmp_path):
    archive = cifar_tarball(tmp_path / "cifar.tgz")
    staged = staging.stage_in(archive, "data_url", tmp_path / "cache")
    assert (tmp_path / "cache") in staged.parents
    assert datasets.find_data(staged).kind == "cifar10-bin"


def test_remote_folder_and_file_are_staged(bucket, tmp_path):
    write_files(tmp_path / "src", {"a.txt": b"alpha", "sub/deeper/c.txt": b"gamma"})
    storage.FsspecStorage().copy_parallel(tmp_path / "src", f"s3://{bucket}/data")
    staged = staging.stage_in(f"s3://{bucket}/data/", "data_url", tmp_path / "cache")
    assert (staged / "sub/deeper/c.txt").read_bytes() == b"gamma"
    single = staging.stage_in(f"obs://{bucket}/data/a.txt", "pretrain_url", tmp_path / "cache")
    assert single.name == "a.txt" and single.read_bytes() == b"alpha"


@pytest.mark.parametrize("url,needle", [
    ("{http}/missing.zip", "could not download"),
    ("http://127.0.0.1:9/unreachable.zip", "could not download"),
    ("s3://no-such-bucket-here/data/", "does not exist"),
])
def test_unreachable_inputs_leave_nothing_trusted(url, needle, http_server, s3_server, tmp_path):
    url = url.format(http=http_server[0])
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=needle):
        staging.stage_in(url, "data_url", cache)
    assert not list(cache.rglob(staging.COMPLETE_MARKER))


def test_truncated_download_is_not_trusted(tmp_path):
    """A server that promises more bytes than it sends: the partial file is never used."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Truncating(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"PK\x03\x04" + b"\0" * 500)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Truncating)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(UserError):
            staging.stage_in(f"http://127.0.0.1:{server.server_address[1]}/data.zip", "data_url", tmp_path / "c")
    finally:
        server.shutdown()
    assert not list((tmp_path / "c").rglob(staging.COMPLETE_MARKER))


def test_url_credentials_go_in_a_header_and_never_into_logs(tmp_path, capsys):
    """user:password@ in an http URL becomes HTTP basic auth; the request line and every message go without it."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    seen = []

    class NeedsAuth(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization")))
            body = b"weights" if self.headers.get("Authorization") == "Basic cmVhZGVyOmh1bnRlcjI=" else b""
            self.send_response(200 if body else 401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NeedsAuth)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://reader:{{}}@127.0.0.1:{server.server_address[1]}/w.ckpt?X-Amz-Signature=SIG-SECRET"
    try:
        assert staging.stage_in(base.format("hunter2"), "pretrain_url", tmp_path / "c").read_bytes() == b"weights"
        with pytest.raises(UserError, match=r"could not download http://127.0.0.1:\d+/w.ckpt\?...: HTTP Error 401"):
            staging.stage_in(base.format("wrong"), "pretrain_url", tmp_path / "other-cache")
    finally:
        server.shutdown()
    assert seen[0] == ("/w.ckpt?X-Amz-Signature=SIG-SECRET", "Basic cmVhZGVyOmh1bnRlcjI=")
    assert not any(secret in capsys.readouterr().out for secret in ("hunter2", "wrong", "SIG-SECRET"))


def test_output_mirror_pushes_what_changed(bucket, tmp_path):
    mirror = staging.OutputMirror(f"s3://{bucket}/out", "output_url", tmp_path / "cache")
    (mirror.local / "metrics.json").write_text("[1]")
    (mirror.local / ".aim").mkdir()
    (mirror.local / ".aim" / "run").write_text("r")
    assert mirror.push() == 2
    assert mirror.push() == 0  # nothing changed
    (mirror.local / "metrics.json").write_text("[1, 2]")
    assert mirror.push() == 1
    fs, path = storage.filesystem(f"s3://{bucket}/out")
    fs.invalidate_cache()
    assert sorted(entry.rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)) == [".aim", "metrics.json"]
    storage.FsspecStorage().copy(f"s3://{bucket}/out/metrics.json", tmp_path / "m.json")
    assert (tmp_path / "m.json").read_text() == "[1, 2]"


@pytest.mark.parametrize("store", ["fsspec", "moxing"])
def test_a_file_the_job_deleted_is_deleted_remotely_and_no_other(store, bucket, tmp_path, monkeypatch, request):
    """--keep_checkpoints deletes the checkpoints of epochs that dropped out: the bucket must not keep them all.
    Files this job never wrote or pulled (another run's) stay."""
    remote = f"s3://{bucket}/out"
    write_files(tmp_path / "other", {"notes.txt": b"n", "resnet18-epoch9.ckpt": b"9"})
    if store == "moxing":  # moxing's double keeps obs:// and s3:// below a local folder
        monkeypatch.syspath_prepend(str(MOXING_DOUBLE))
        request.addfinalizer(lambda: [sys.modules.pop(name, None) for name in ("moxing", "moxing.file")])
        monkeypatch.setenv("MOXING_DOUBLE_ROOT", str(tmp_path / "obs"))
        shutil.copytree(tmp_path / "other", tmp_path / "obs" / bucket / "out")

        def listing():
            return sorted(p.name for p in (tmp_path / "obs" / bucket / "out").iterdir())
    else:
        storage.FsspecStorage().copy_parallel(tmp_path / "other", remote)

        def listing():
            fs, path = storage.filesystem(remote)
            fs.invalidate_cache()
            return sorted(entry.rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False))
    mirror = staging.OutputMirror(remote, "output_url", tmp_path / "cache")
    assert isinstance(mirror._store, storage.MoxingStorage) == (store == "moxing")
    for name in ("resnet18-epoch1.ckpt", "resnet18-epoch2.ckpt", "metrics.json"):
        (mirror.local / name).write_text(name)
    assert mirror.push() == 3
    (mirror.local / "resnet18-epoch1.ckpt").unlink()
    (mirror.local / "resnet18-epoch3.ckpt").write_text("3")
    assert mirror.push() == 1
    assert listing() == ["metrics.json", "notes.txt", "resnet18-epoch2.ckpt", "resnet18-epoch3.ckpt",
                         "resnet18-epoch9.ckpt"]
    assert mirror.push() == 0
    mirror._store.remove(f"{remote}/resnet18-epoch2.ckpt")  # someone deleted it there first: not an error
    (mirror.local / "resnet18-epoch2.ckpt").unlink()
    assert mirror.push() == 0
    assert "resnet18-epoch2.ckpt" not in listing()

    # A discarded file goes there too, though this job never wrote it: an export of weights it replaced
    (tmp_path / "old.onnx").write_text("an earlier run's model")
    mirror._store.copy(tmp_path / "old.onnx", f"{remote}/resnet18-best.onnx")
    assert "resnet18-best.onnx" in listing()
    mirror.discard("resnet18-best.onnx", "resnet18-best.air")  # the second was never there: fine
    assert mirror.push() == 0
    assert listing() == ["metrics.json", "notes.txt", "resnet18-epoch3.ckpt", "resnet18-epoch9.ckpt"]


def test_output_mirror_pulls_files_and_folders_a_restarted_job_needs(bucket, tmp_path):
    remote = f"s3://{bucket}/out"
    write_files(tmp_path / "first", {"resume.ckpt": b"state", "metrics.json": b"[1]", ".aim/run/chunk": b"r",
                                     ".aim/meta.sqlite": b"m", "other.png": b"p"})
    storage.FsspecStorage().copy_parallel(tmp_path / "first", remote)
    restarted = staging.OutputMirror(remote, "output_url", tmp_path / "fresh-cache")
    assert restarted.pull("resume.ckpt", "metrics.json", "resnet18-best.ckpt", ".aim") == 4  # best: not there yet
    assert sorted(p.relative_to(restarted.local).as_posix() for p in restarted.local.rglob("*") if p.is_file()) == \
        [".aim/meta.sqlite", ".aim/run/chunk", "metrics.json", "resume.ckpt"]
    assert restarted.push() == 0  # what was pulled is on the remote already
    (restarted.local / "metrics.json").write_text("[1, 2]")
    assert restarted.push() == 1

    everything = staging.OutputMirror(remote, "output_url", tmp_path / "another-cache")
    assert everything.pull() == 5 and (everything.local / "other.png").read_bytes() == b"p"
    assert everything.push() == 0
    assert staging.OutputMirror(f"s3://{bucket}/empty", "output_url", tmp_path / "c").pull() == 0


def test_an_upload_to_a_store_gone_silent_ends_in_time_and_keeps_the_outputs(bucket, tmp_path, monkeypatch):
    from test_faults_staging import Silent, serving
    mirror = staging.OutputMirror(f"s3://{bucket}/out", "output_url", tmp_path / "cache", io_timeout=1)
    (mirror.local / "metrics.json").write_text("[1]")
    with serving(socketserver.ThreadingTCPServer, Silent) as port:
        monkeypatch.setenv("S3_ENDPOINT", f"http://127.0.0.1:{port}")  # the endpoint stops answering mid-job
        start = time.monotonic()
        with pytest.raises(UserError, match=f"output_url: could not upload to s3://{bucket}/out: no answer for 1 s"):
            mirror.push()
        assert time.monotonic() - start < 8  # two attempts of io_timeout, and botocore's backoff
        start = time.monotonic()
        with pytest.raises(UserError, match="could not upload"):
            mirror.push()  # the final push after a failed one does not wait again
        assert time.monotonic() - start < 0.5
    assert (mirror.local / "metrics.json").read_text() == "[1]"


@pytest.mark.parametrize("url,needle", [("s3://no-such-bucket-out/x", "bucket 'no-such-bucket-out' does not exist"),
                                        ("https://example.invalid/out", "read-only")])
def test_output_mirror_refuses_bad_locations(url, needle, s3_server, tmp_path):
    with pytest.raises(UserError, match=needle):
        staging.OutputMirror(url, "output_url", tmp_path / "cache")


@pytest.mark.parametrize("args,needle", [
    (["--data_url", "{http}/nothing-here.tar.gz"], "could not download"),
    (["--data_url", "http://127.0.0.1:9/data.zip"], "could not download"),
    (["--data_url", "s3://missing-bucket-in/data/"], "does not exist"),
    (["--data_url", "{local}", "--output_url", "obs://missing-bucket-out/out"], "does not exist"),
    (["--data_url", "{local}", "--pretrain_url", "{http}/missing.ckpt"], "could not download"),
])
def test_remote_mistakes_end_with_one_line(args, needle, http_server, s3_server, tmp_path):
    local = write_cifar(tmp_path / "cifar", make_split(20, 2, 0), make_split(6, 2, 1), ["a", "b"])
    argv = [a.format(http=http_server[0], local=local) for a in args]
    result = run_train(*argv, "--cache_dir", tmp_path / "cache", "--output_url", tmp_path / "out", timeout=300) \
        if "--output_url" not in args else run_train(*argv, "--cache_dir", tmp_path / "cache", timeout=300)
    assert_one_error_line(result, needle)


@pytest.mark.parametrize("keys", [False, True], ids=["no keys", "no endpoint"])
def test_a_store_that_cannot_be_used_ends_with_one_line(keys, tmp_path, monkeypatch):
    monkeypatch.setenv("OBS_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    for name in ("OBS_ACCESS_KEY_ID", "OBS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    if keys:
        monkeypatch.setenv("OBS_ACCESS_KEY_ID", "key-id")
        monkeypatch.setenv("OBS_SECRET_ACCESS_KEY", "secret")
    result = run_train("--data_url", "obs://bucket/data/", "--output_url", tmp_path / "out",
                       "--cache_dir", tmp_path / "cache", timeout=300)
    assert_one_error_line(result, "could not read obs://bucket/data/")


def assert_one_error_line(result, needle):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


def test_a_follower_worker_waits_for_the_leaders_copy_instead_of_fetching(tmp_path):
    target = tmp_path / "inputs" / "key"
    fetches = []

    def fetch(partial):
        fetches.append(threading.current_thread().name)
        time.sleep(1.0)  # a slow download, which the follower must wait out
        (partial / "data").mkdir()
        return partial / "data"

    follower_result = {}
    follower = threading.Thread(name="follower", target=lambda: follower_result.setdefault(
        "path", staging._staged(target, "data_url", "s3://bucket/data", fetch, leader=False)))
    follower.start()
    time.sleep(0.2)
    leader_path = staging._staged(target, "data_url", "s3://bucket/data", fetch, leader=True)
    follower.join(timeout=30)
    assert fetches == ["MainThread"]
    assert follower_result["path"] == leader_path == target / "data" and leader_path.is_dir()


# ---------------------------------------------------------------- with moxing importable

def test_staging_goes_through_moxing_when_importable(moxing_double, tmp_path):
    bucket = moxing_double.root / "bucket"
    write_files(bucket / "data", {"a.txt": b"alpha", "sub/c.txt": b"gamma"})
    write_files(bucket / "out", {"resume.ckpt": b"state", ".aim/run/chunk": b"r"})
    staged = staging.stage_in("obs://bucket/data/", "data_url", tmp_path / "cache")
    assert (staged / "sub/c.txt").read_bytes() == b"gamma"
    assert staging.stage_in("obs://bucket/data/a.txt", "pretrain_url", tmp_path / "cache").read_bytes() == b"alpha"
    mirror = staging.OutputMirror("obs://bucket/out", "output_url", tmp_path / "cache")
    assert mirror.pull("resume.ckpt", "missing.json", ".aim") == 2
    (mirror.local / "metrics.json").write_text("[1]")
    assert mirror.push() == 1 and (bucket / "out" / "metrics.json").read_text() == "[1]"
    with pytest.raises(UserError, match="bucket 'nope' does not exist"):
        staging.OutputMirror("obs://nope/out", "output_url", tmp_path / "cache")

    copies = moxing_double.calls("copy", "copy_parallel")
    assert [(call, args[0]) for call, args in copies[:2]] == [("copy_parallel", "obs://bucket/data/"),
                                                              ("copy", "obs://bucket/data/a.txt")]
    assert all(args[1].startswith(str(tmp_path / "cache" / "inputs")) for _, args in copies[:2])
    assert copies[2:] == [("copy", ("obs://bucket/out/resume.ckpt", str(mirror.local / "resume.ckpt"))),
                          ("copy_parallel", ("obs://bucket/out/.aim", str(mirror.local / ".aim"))),
                          ("copy", (f"{mirror.local}/metrics.json", "obs://bucket/out/metrics.json"))]
    assert ("make_dirs", ("obs://bucket/out",)) in moxing_double.calls()
