"""The storage back end against real servers on 127.0.0.1 (moto S3 as s3:// and obs://, http.server), local disk,
memory://, and the moxing test double."""
import sys
import uuid

import pytest

import storage


def make_tree(root):
    files = {"a.txt": b"alpha", "sub/b.bin": bytes(range(256)) * 10, "sub/deeper/c.txt": b"gamma"}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(params=["local", "memory", "s3", "obs", "moxing"])
def store_and_base(request, tmp_path):
    """(back end, a folder URL in it): fsspec on every scheme it serves, and moxing (the double) on obs://."""
    if request.param == "local":
        return storage.FsspecStorage(), str(tmp_path / "store")
    if request.param == "memory":
        return storage.FsspecStorage(), f"memory://mem-{uuid.uuid4().hex}"
    if request.param == "moxing":
        double = request.getfixturevalue("moxing_double")
        (double.root / "bucket").mkdir()
        return storage.backend(), "obs://bucket/prefix"
    bucket = request.getfixturevalue("bucket")
    return storage.FsspecStorage(), f"{request.param}://{bucket}/prefix"


def test_back_ends_share_moxing_semantics(store_and_base, tmp_path):
    store, base = store_and_base
    src = tmp_path / "src"
    files = make_tree(src)
    dst = f"{base}/copied"
    store.make_dirs(dst)
    store.copy_parallel(src, dst)
    assert store.exists(f"{dst}/a.txt") and store.exists(f"{dst}/sub/deeper/c.txt")  # the contents, not src/...
    assert not store.exists(f"{dst}/src") and not store.exists(f"{dst}/nope.txt")
    assert store.is_directory(f"{dst}/sub") and not store.is_directory(f"{dst}/a.txt")

    back = tmp_path / "back"
    store.copy_parallel(dst, back)
    assert tree(back) == files

    store.copy_parallel(src, f"{base}/some", only=["sub/b.bin"])
    store.copy_parallel(f"{base}/some", tmp_path / "some")
    assert tree(tmp_path / "some") == {"sub/b.bin": files["sub/b.bin"]}

    store.copy(f"{dst}/a.txt", f"{base}/single/a-copy.txt")
    store.copy(f"{base}/single/a-copy.txt", tmp_path / "a-copy.txt")
    assert (tmp_path / "a-copy.txt").read_bytes() == b"alpha"


def test_http_is_readable(http_server, tmp_path):
    base, root = http_server
    (root / "hello.txt").write_text("hi there")
    store = storage.FsspecStorage()
    assert store.exists(f"{base}/hello.txt")
    store.copy(f"{base}/hello.txt", tmp_path / "hello.txt")
    assert (tmp_path / "hello.txt").read_text() == "hi there"


def test_real_moxing_is_used_when_importable(moxing_double, tmp_path):
    assert "moxing" not in sys.modules
    store = storage.backend()
    assert isinstance(store, storage.MoxingStorage)
    make_tree(tmp_path / "src")
    store.make_dirs("obs://bucket/data")
    store.copy_parallel(tmp_path / "src", "obs://bucket/data/")
    store.copy_parallel(tmp_path / "src", "obs://bucket/out", only=["a.txt"])
    store.copy("obs://bucket/data/a.txt", tmp_path / "a.ckpt")
    assert store.exists("obs://bucket/data/sub/deeper/c.txt") and store.is_directory("obs://bucket/data/sub")
    assert [call for call, _ in moxing_double.calls()] == ["make_dirs", "copy_parallel", "copy", "copy", "exists",
                                                           "is_directory"]
    assert moxing_double.calls("copy_parallel") == [("copy_parallel", (str(tmp_path / "src"), "obs://bucket/data/"))]
    assert moxing_double.calls("copy")[0] == ("copy", (f"{tmp_path / 'src'}/a.txt", "obs://bucket/out/a.txt"))
    assert tree(moxing_double.root / "bucket" / "data") == tree(tmp_path / "src")


def test_fsspec_is_used_without_moxing():
    assert "moxing" not in sys.modules
    assert isinstance(storage.backend(), storage.FsspecStorage)


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
    assert storage.redact_text('Read timeout on "https://u:pw@h.example/b/k?X-Amz-Signature=s", retrying') == \
        'Read timeout on "https://h.example/b/k?...", retrying'


def test_timeouts_are_recognised_whoever_raises_them():
    import asyncio
    import botocore.exceptions
    import fsspec.exceptions
    for exc in (TimeoutError(), asyncio.TimeoutError(), fsspec.exceptions.FSTimeoutError(),
                botocore.exceptions.ReadTimeoutError(endpoint_url="http://x"),
                botocore.exceptions.ConnectTimeoutError(endpoint_url="http://x")):
        assert storage.is_timeout(exc), exc
    assert not storage.is_timeout(ConnectionRefusedError()) and not storage.is_timeout(OSError(28, "full"))
