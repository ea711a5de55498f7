"""The storage layer against real servers on 127.0.0.1: moto S3 (as s3:// and obs://), http.server, local disk."""
import io
import sys
import tarfile
import uuid
import zipfile

import pytest
from conftest import run_train

import datasets
import storage
from errors import UserError
from make_demo_data import make_split, write_cifar


def make_tree(root):
    files = {"a.txt": b"alpha", "sub/b.bin": bytes(range(256)) * 10, "sub/deeper/c.txt": b"gamma"}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


@pytest.fixture(params=["local", "memory", "s3", "obs"])
def base_url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    if request.param == "memory":
        return f"memory://mem-{uuid.uuid4().hex}"
    bucket = request.getfixturevalue("bucket")
    return f"{request.param}://{bucket}/prefix"


def test_moxing_calls_with_moxing_semantics(base_url, tmp_path):
    src = tmp_path / "src"
    files = make_tree(src)
    dst = f"{base_url}/copied"
    storage.make_dirs(dst)
    copied = storage.copy_parallel(src, dst)
    assert sorted(copied) == sorted(files)
    assert storage.list_directory(dst) == ["a.txt", "sub"]  # the contents, not a nested src/
    assert storage.list_directory(f"{dst}/sub") == ["b.bin", "deeper"]
    assert storage.exists(f"{dst}/sub/deeper/c.txt") and not storage.exists(f"{dst}/nope.txt")

    back = tmp_path / "back"
    storage.copy_parallel(dst, back)
    assert {p.relative_to(back).as_posix(): p.read_bytes() for p in back.rglob("*") if p.is_file()} == files

    storage.copy(f"{dst}/a.txt", f"{base_url}/single/a-copy.txt")
    storage.copy(f"{base_url}/single/a-copy.txt", tmp_path / "a-copy.txt")
    assert (tmp_path / "a-copy.txt").read_bytes() == b"alpha"

    storage.remove(f"{dst}/a.txt")
    assert not storage.exists(f"{dst}/a.txt")
    storage.remove(f"{dst}/sub", recursive=True)
    assert not storage.exists(f"{dst}/sub/b.bin")


def test_http_is_readable(http_server, tmp_path):
    base, root = http_server
    (root / "hello.txt").write_text("hi there")
    assert storage.exists(f"{base}/hello.txt")
    storage.copy(f"{base}/hello.txt", tmp_path / "hello.txt")
    assert (tmp_path / "hello.txt").read_text() == "hi there"


def test_real_moxing_is_used_when_importable(tmp_path, monkeypatch):
    package = tmp_path / "fake" / "moxing"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("from . import file\n")
    (package / "file.py").write_text(
        "calls = []\n"
        "def _record(name):\n"
        "    return lambda *a, **k: calls.append((name, a, k)) or [name]\n"
        "for _name in ('copy_parallel', 'copy', 'exists', 'make_dirs', 'list_directory', 'remove'):\n"
        "    globals()[_name] = _record(_name)\n")
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    monkeypatch.delitem(sys.modules, "moxing", raising=False)
    monkeypatch.delitem(sys.modules, "moxing.file", raising=False)
    storage.copy_parallel("obs://bucket/data/", "/cache/data")
    storage.copy("obs://bucket/a.ckpt", "/cache/a.ckpt")
    storage.exists("obs://bucket/x")
    storage.make_dirs("obs://bucket/out")
    storage.list_directory("obs://bucket/")
    storage.remove("obs://bucket/x", recursive=True)
    import moxing
    assert [c[0] for c in moxing.file.calls] == ["copy_parallel", "copy", "exists", "make_dirs", "list_directory",
                                                 "remove"]
    assert moxing.file.calls[0][1] == ("obs://bucket/data/", "/cache/data")
    assert moxing.file.calls[-1][2] == {"recursive": True}
    sys.modules.pop("moxing", None)
    sys.modules.pop("moxing.file", None)


def test_transient_errors_are_retried_with_backoff(monkeypatch, capsys):
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.0, 0.0, 0.0))
    attempts = []

    def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    assert storage._retry(flaky, "uploading x") == "ok" and len(attempts) == 3
    assert capsys.readouterr().out.count("retrying") == 2

    def missing():
        attempts.append(1)
        raise FileNotFoundError("gone")

    attempts.clear()
    with pytest.raises(FileNotFoundError):
        storage._retry(missing, "reading y")
    assert len(attempts) == 1


def test_credentials_are_redacted():
    assert storage.redact("https://user:pa55@host.example:8443/data/x.zip?X-Amz-Signature=abc") == \
        "https://host.example:8443/data/x.zip?..."
    assert storage.redact("obs://bucket/path/") == "obs://bucket/path/"
    assert storage.redact("/local/path") == "/local/path"


# ---------------------------------------------------------------- archives

def zip_with(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def zip_with_symlink(path, name, target):
    with zipfile.ZipFile(path, "w") as zf:
        info = zipfile.ZipInfo(name)
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, target)
    return path


def tar_with(path, members):
    """members: name -> bytes, or ("symlink"|"hardlink", target)."""
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(data, tuple):
                info.type = tarfile.SYMTYPE if data[0] == "symlink" else tarfile.LNKTYPE
                info.linkname = data[1]
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


MALICIOUS = {
    "zip ../": lambda d: zip_with(d / "a.zip", {"ok.txt": b"x", "../evil.txt": b"x"}),
    "zip absolute": lambda d: zip_with(d / "a.zip", {"/tmp/evil-abs-zip.txt": b"x"}),
    "zip symlink out": lambda d: zip_with_symlink(d / "a.zip", "link", "../../etc/passwd"),
    "tar ../": lambda d: tar_with(d / "a.tar.gz", {"ok.txt": b"x", "sub/../../evil.txt": b"x"}),
    "tar absolute": lambda d: tar_with(d / "a.tar.gz", {"/tmp/evil-abs-tar.txt": b"x"}),
    "tar symlink out": lambda d: tar_with(d / "a.tar.gz", {"link": ("symlink", "../../outside"),
                                                           "link/evil.txt": b"x"}),
    "tar absolute symlink": lambda d: tar_with(d / "a.tar.gz", {"link": ("symlink", "/etc")}),
    "tar hardlink out": lambda d: tar_with(d / "a.tar.gz", {"hard": ("hardlink", "../../etc/passwd")}),
}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_malicious_archives_are_refused(case, tmp_path):
    (tmp_path / "archives").mkdir()
    archive = MALICIOUS[case](tmp_path / "archives")
    target = tmp_path / "deep" / "cache" / "target"
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(UserError, match="refusing archive member"):
        storage.extract_archive(archive, target)
    after = sorted(p for p in tmp_path.rglob("*") if p != target and target not in p.parents)
    assert [p for p in after if p not in before and p not in target.parents] == []
    assert not list(target.rglob("*"))
    assert not any(p.exists() for p in (tmp_path / "evil.txt", tmp_path / "deep" / "evil.txt"))
    for absolute in ("/tmp/evil-abs-zip.txt", "/tmp/evil-abs-tar.txt"):
        assert not __import__("os").path.exists(absolute)


def test_safe_archives_extract(tmp_path):
    zip_with(tmp_path / "ok.zip", {"data/x/a.txt": b"1", "data/y/b.txt": b"2"})
    tar_with(tmp_path / "ok.tar.gz", {"top/c.txt": b"3", "top/link": ("symlink", "c.txt")})
    assert (storage.extract_archive(tmp_path / "ok.zip", tmp_path / "z") / "data/y/b.txt").read_bytes() == b"2"
    out = storage.extract_archive(tmp_path / "ok.tar.gz", tmp_path / "t")
    assert (out / "top/c.txt").read_bytes() == b"3" and (out / "top/link").read_bytes() == b"3"


def test_corrupt_archive_is_a_user_error(tmp_path):
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(UserError, match="not a readable archive"):
        storage.extract_archive(tmp_path / "bad.zip", tmp_path / "out")


# ---------------------------------------------------------------- staging

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
    staged = storage.stage_in(url, "data_url", tmp_path / "cache")
    assert datasets.find_data(staged).sizes == {"train": 40, "val": 12}
    assert "staging" in capsys.readouterr().out
    assert storage.stage_in(url, "data_url", tmp_path / "cache") == staged
    assert "using the cached copy" in capsys.readouterr().out


def test_local_archive_is_extracted_into_the_cache(tmp_path):
    archive = cifar_tarball(tmp_path / "cifar.tgz")
    staged = storage.stage_in(archive, "data_url", tmp_path / "cache")
    assert (tmp_path / "cache") in staged.parents
    assert datasets.find_data(staged).kind == "cifar10-bin"


def test_remote_folder_and_file_are_staged(bucket, tmp_path):
    make_tree(tmp_path / "src")
    storage.copy_parallel(tmp_path / "src", f"s3://{bucket}/data")
    staged = storage.stage_in(f"s3://{bucket}/data/", "data_url", tmp_path / "cache")
    assert (staged / "sub/deeper/c.txt").read_bytes() == b"gamma"
    single = storage.stage_in(f"obs://{bucket}/data/a.txt", "pretrain_url", tmp_path / "cache")
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
        storage.stage_in(url, "data_url", cache)
    assert not list(cache.rglob(storage.COMPLETE_MARKER))


def test_truncated_download_is_not_trusted(tmp_path):
    """A server that promises more bytes than it sends: the partial file is never used."""
    import threading
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
            storage.stage_in(f"http://127.0.0.1:{server.server_address[1]}/data.zip", "data_url", tmp_path / "c")
    finally:
        server.shutdown()
    assert not list((tmp_path / "c").rglob(storage.COMPLETE_MARKER))


def test_output_mirror_pushes_what_changed(bucket, tmp_path):
    mirror = storage.OutputMirror(f"s3://{bucket}/out", "output_url", tmp_path / "cache")
    (mirror.local / "metrics.json").write_text("[1]")
    (mirror.local / ".aim").mkdir()
    (mirror.local / ".aim" / "run").write_text("r")
    assert mirror.push() == 2
    assert mirror.push() == 0  # nothing changed
    (mirror.local / "metrics.json").write_text("[1, 2]")
    assert mirror.push() == 1
    assert storage.list_directory(f"s3://{bucket}/out") == [".aim", "metrics.json"]
    storage.copy(f"s3://{bucket}/out/metrics.json", tmp_path / "m.json")
    assert (tmp_path / "m.json").read_text() == "[1, 2]"


@pytest.mark.parametrize("url,needle", [("s3://no-such-bucket-out/x", "bucket 'no-such-bucket-out' does not exist"),
                                        ("https://example.invalid/out", "read-only")])
def test_output_mirror_refuses_bad_locations(url, needle, s3_server, tmp_path):
    with pytest.raises(UserError, match=needle):
        storage.OutputMirror(url, "output_url", tmp_path / "cache")


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
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


def test_a_follower_worker_waits_for_the_leaders_copy_instead_of_fetching(tmp_path):
    import threading
    import time
    target = tmp_path / "inputs" / "key"
    fetches = []

    def fetch(partial):
        fetches.append(threading.current_thread().name)
        time.sleep(1.0)  # a slow download, which the follower must wait out
        (partial / "data").mkdir()
        return partial / "data"

    follower_result = {}
    follower = threading.Thread(name="follower", target=lambda: follower_result.setdefault(
        "path", storage._staged(target, "data_url", "s3://bucket/data", fetch, leader=False)))
    follower.start()
    time.sleep(0.2)
    leader_path = storage._staged(target, "data_url", "s3://bucket/data", fetch, leader=True)
    follower.join(timeout=30)
    assert fetches == ["MainThread"]
    assert follower_result["path"] == leader_path == target / "data" and leader_path.is_dir()
