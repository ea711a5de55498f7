"""The fault catalogue of transfers, archives and the cache: stalled and unreachable servers, archive bombs, link
tricks and a full disk. Each case runs train.py against real loopback servers (http.server, a silent TCP server,
moto S3) or a real 2 MB tmpfs, and must end within its deadline with one `error:` line, exit 2, no secret printed,
the previous outputs and the complete cache entries byte-identical and no half-written file left in the cache."""
import contextlib
import os
import socketserver
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import S3_KEYS, assert_fails_cleanly, free_port, run_train, snapshot

import staging
import storage
from test_archives import random_bytes, small_disk, tar_with  # noqa: F401 (small_disk: a fixture)

IO_TIMEOUT = 2  # seconds: --io_timeout for every case
DEADLINE = 45  # seconds: start-up (slow on a shared machine) plus two silent S3 attempts of IO_TIMEOUT
SECRETS = ("hunter2", "SIG-SECRET")  # in URLs below; never to be printed
WITH_SECRETS = "http://reader:hunter2@127.0.0.1:{port}/{path}?X-Amz-Signature=SIG-SECRET"


# ---------------------------------------------------------------- servers that stall

@contextlib.contextmanager
def serving(server_class, handler):
    """A loopback server whose handlers may wait on `server.stop`; at the end they are released and joined."""
    class Server(server_class):
        daemon_threads = False  # server_close() joins every handler thread: none outlives the test

    server = Server(("127.0.0.1", 0), handler)
    server.stop = threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


class Silent(socketserver.BaseRequestHandler):
    """Accepts the connection and never answers."""

    def handle(self):
        self.server.stop.wait()


class Slow(BaseHTTPRequestHandler):
    """/stall/NAME sends 1000 of the 1 MB it announces, then nothing; /drip/NAME one byte every half second."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(1 << 20))
        self.end_headers()
        try:
            if self.path.startswith("/stall/"):
                self.wfile.write(b"\0" * 1000)
                self.wfile.flush()
                self.server.stop.wait()
            while not self.server.stop.wait(0.5):
                self.wfile.write(b"\0")
                self.wfile.flush()
        except OSError:  # the client gave up
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def silent_port():
    with serving(socketserver.ThreadingTCPServer, Silent) as port:
        yield port


@pytest.fixture
def slow_http_port():
    with serving(ThreadingHTTPServer, Slow) as port:
        yield port


# ---------------------------------------------------------------- the cases

class Case:
    """What a case builder may use: its folders, the fixtures it asks for, and the environment it sets."""

    def __init__(self, request, tmp_path, cache):
        self.request, self.tmp, self.cache, self.env = request, tmp_path, cache, {}
        self.data = tmp_path / "data"  # an existing (empty) data folder, for cases about the outputs
        self.data.mkdir()

    def __getattr__(self, fixture):
        return self.request.getfixturevalue(fixture)

    def via_endpoint(self, port, url):
        """`url`, with S3 and OBS pointed at 127.0.0.1:port."""
        self.env = {**S3_KEYS, "S3_ENDPOINT": f"http://127.0.0.1:{port}", "OBS_ENDPOINT": f"http://127.0.0.1:{port}"}
        return url


def signed(port, path):
    """A URL on 127.0.0.1 carrying credentials and a signature."""
    return WITH_SECRETS.format(port=port, path=path)


def served(c, name, data=None):
    """The signed URL of `name` on the conftest http.server, holding `data` when given."""
    base, root = c.http_server
    if data is not None:
        (root / name).write_bytes(data)
    return signed(base.rsplit(":", 1)[1], name)


def in_bucket(c, name, data):
    (c.tmp / name).write_bytes(data)
    storage.FsspecStorage().copy(c.tmp / name, f"s3://{c.bucket}/data/{name}")
    return f"s3://{c.bucket}/data/{name}"


def tgz(c, name, members):
    return tar_with(c.tmp / name, members)


def zip_bomb(c):
    path = c.tmp / "cifar.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("cifar-10-batches-bin/data_batch_1.bin", ZEROS)
    return path


def data(url, *more):
    return ["--data_url", url, *more]


ZEROS = bytes(40 << 20)  # 40 MB, compressed ~1000 times: a bomb
CASES = {
    # name: (argv builder (case) -> list, what the error line must say, with the cache on the small disk?)
    "http: stalls mid-body": (lambda c: data(signed(c.slow_http_port, "stall/cifar.tar.gz")),
                              "no data for 2 s (see --io_timeout)", False),
    "http: one byte every half second": (lambda c: data(signed(c.slow_http_port, "drip/cifar.tar.gz")),
                                         "less than 1 KiB/s for 2 s", False),
    "http: accepts and never answers": (lambda c: data(c.data, "--pretrain_url", signed(c.silent_port, "r.ckpt")),
                                        "r.ckpt?...: no data for 2 s", False),
    "http: 404 on a signed URL": (lambda c: data(served(c, "missing.zip")), "missing.zip?...: HTTP Error 404", False),
    "s3 input: endpoint never answers": (lambda c: data(c.via_endpoint(c.silent_port, "s3://b/data")),
                                         "could not read s3://b/data: no answer for 2 s", False),
    "s3 output: endpoint never answers": (lambda c: data(c.data, "--output_url",
                                                         c.via_endpoint(c.silent_port, "s3://b/out")),
                                          "s3://b/out cannot be reached: no answer for 2 s", False),
    "s3 input: connection refused": (lambda c: data(c.via_endpoint(free_port(), "obs://b/data")),
                                     "could not read obs://b/data: ", False),
    "s3 output: connection refused": (lambda c: data(c.data, "--output_url",
                                                     c.via_endpoint(free_port(), "s3://b/out")),
                                      "output_url s3://b/out cannot be reached", False),
    "zip bomb": (lambda c: data(zip_bomb(c)), "cifar.zip: refusing an archive bomb", False),
    "tar.gz bomb over http": (lambda c: data(served(c, "bomb.tgz", tgz(c, "bomb.tgz", {"z": ZEROS}).read_bytes())),
                              "bomb.tgz: refusing an archive bomb", False),
    "tar symlink chain out": (lambda c: data(tgz(c, "chain.tar.gz", {"d/a": ("symlink", ".."),
                                                                      "d/a/b": ("symlink", ".."), "d/a/b/x": b"x"})),
                              "chain.tar.gz: refusing archive member 'd/a/b'", False),
    "tar hard link out through a link": (lambda c: data(tgz(c, "hard.tar.gz", {"d/up": ("symlink", ".."),
                                                                               "h": ("hardlink", "d/up/../x")})),
                                         "hard.tar.gz: refusing archive member 'h'", False),
    "archive larger than the free cache": (lambda c: data(tgz(c, "big.tar.gz", {"big": random_bytes(3 << 20)})),
                                           "big.tar.gz expands to 3.1 MB, and only", True),
    "http download fills the cache": (lambda c: data(served(c, "big.bin", random_bytes(3 << 20))),
                                      "big.bin?... (see --cache_dir): No space left on device", True),
    "s3 download fills the cache": (lambda c: data(in_bucket(c, "big.bin", random_bytes(3 << 20))),
                                    "data/big.bin (see --cache_dir): No space left on device", True),
    "remote archive whose contents do not fit": (lambda c: data(served(c, "fits.tgz", tgz(
        c, "fits.tgz", {"half": random_bytes(1200 << 10)}).read_bytes())), "fits.tgz expands to 1.2 MB, and only", True),
}


@pytest.fixture
def previous_run(tmp_path):
    """An output folder holding the files of an earlier run, which a failed run must leave alone."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "metrics.json").write_text('[{"epoch": 1, "val_accuracy": 0.5}]\n')
    (folder / "resnet18-best.ckpt").write_bytes(b"weights of the earlier run")
    return folder


@pytest.mark.parametrize("case", sorted(CASES))
def test_transfer_and_cache_faults_fail_cleanly_in_time(case, request, tmp_path, previous_run):
    build, needle, on_small_disk = CASES[case]
    cache = (request.getfixturevalue("small_disk") if on_small_disk else tmp_path) / "cache"
    old = tar_with(tmp_path / "old.tar.gz", {"old/classes.txt": b"cat\ndog\n"})
    staging.stage_in(old, "data_url", cache)  # a complete cache entry the failure must not touch
    c = Case(request, tmp_path, cache)
    argv = build(c)
    before = snapshot(previous_run), snapshot(cache)
    argv = [*argv, "--output_url", previous_run] if "--output_url" not in argv else argv
    start = time.monotonic()
    result = run_train(*argv, "--cache_dir", cache, "--io_timeout", IO_TIMEOUT, "--image_size", 32, "--epochs", 1,
                       timeout=DEADLINE + 15, env={**os.environ, **c.env})
    elapsed = time.monotonic() - start
    assert_fails_cleanly(result, needle)
    assert elapsed < DEADLINE, elapsed
    assert not any(secret in result.stdout + result.stderr for secret in SECRETS), result.stderr
    if on_small_disk:
        assert f"no space left in the cache folder {cache} " in result.stderr and "--cache_dir" in result.stderr
    assert (snapshot(previous_run), snapshot(cache)) == before
    assert not [p for p in cache.rglob("*") if ".partial" in p.name]
