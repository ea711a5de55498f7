"""Where files live: URL helpers, and the one storage back end every remote read and write goes through
(Huawei's `moxing.file` inside ModelArts, fsspec everywhere else).

Endpoints and keys for fsspec come from the environment:
- obs://  OBS_ENDPOINT (or S3_ENDPOINT), OBS_ACCESS_KEY_ID / OBS_SECRET_ACCESS_KEY (or the AWS_* names);
- s3://   S3_ENDPOINT or AWS_ENDPOINT_URL when not AWS itself, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.

Every transfer has a deadline, `io_timeout` (--io_timeout): S3/OBS requests that get no answer for that long are tried
once more and then fail (staging.http_get bounds http(s) downloads the same way).
"""
import errno
import functools
import os
import re
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit, urlunsplit

from errors import UserError

HTTP_SCHEMES = ("http", "https")
COPY_WORKERS = 8
RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0)  # seconds before each retry of a transient failure
DEFAULT_IO_TIMEOUT = 60.0  # seconds a transfer may make no progress (--io_timeout)
MIN_RATE = 1024  # bytes/s: slower than this for io_timeout seconds counts as stalled
S3_ATTEMPTS = 2  # botocore attempts per request: a silent endpoint fails after about 2 x io_timeout
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


# ---------------------------------------------------------------- URLs

def scheme_of(url):
    url = str(url)
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def is_local(url):
    return scheme_of(url) == "file"


def local_path(url):
    return Path(str(url).removeprefix("file://")).expanduser()


def redact(url):
    """A URL fit for logs and Aim: no user:password, no query string (pre-signed URLs carry signatures there)."""
    url = str(url)
    if is_local(url):
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "..." if parts.query else "", ""))


def redact_text(text):
    """`text` (an error message) with every URL in it redacted."""
    return re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+", lambda m: redact(m.group(0)), str(text))


def is_timeout(exc):
    """Whether `exc` is a timeout, whoever raised it (socket, asyncio, aiohttp, botocore, fsspec)."""
    return isinstance(exc, (TimeoutError, socket.timeout)) or any("Timeout" in c.__name__ for c in type(exc).__mro__)


def is_disk_full(exc):
    return isinstance(exc, OSError) and exc.errno in DISK_FULL


def _endpoint(*names):
    for name in names:
        value = os.environ.get(name)
        if value:
            return value if "://" in value else f"https://{value}"
    return None


# ---------------------------------------------------------------- the back end

def backend(io_timeout=DEFAULT_IO_TIMEOUT):
    """The store to use: moxing.file where Huawei's moxing is importable (inside ModelArts), else fsspec.

    (The PyPI package named `moxing` is unrelated: never install it. moxing keeps its own timeouts.)"""
    try:
        import moxing
    except ImportError:
        return FsspecStorage(io_timeout)
    mox_file = getattr(moxing, "file", None)
    return MoxingStorage(mox_file) if mox_file else FsspecStorage(io_timeout)


def _in_parallel(action, items):
    with ThreadPoolExecutor(COPY_WORKERS) as pool:
        list(pool.map(action, items))


class MoxingStorage:
    """moxing.file's own calls; it retries and handles OBS itself."""

    def __init__(self, mox_file):
        self.file = mox_file

    def exists(self, url):
        return self.file.exists(str(url))

    def is_directory(self, url):
        return self.file.is_directory(str(url))

    def make_dirs(self, url):
        self.file.make_dirs(str(url))

    def copy(self, src, dst):
        """Copy one file."""
        self.file.copy(str(src), str(dst))

    def remove(self, url):
        """Delete one file (gone already is fine)."""
        if self.file.exists(str(url)):
            self.file.remove(str(url), recursive=False)

    def list_names(self, url):
        """The names of the files and folders directly in folder `url` (none when it does not exist)."""
        if not self.file.is_directory(str(url)):
            return []
        return [name.rstrip("/").rsplit("/", 1)[-1] for name in self.file.list_directory(str(url))]

    def copy_parallel(self, src, dst, only=None):
        """Copy the contents of folder `src` into folder `dst`; `only`, when given, limits the copy to those paths
        relative to `src` (moxing has no such option: they are copied one by one, several at a time)."""
        if only is None:
            self.file.copy_parallel(str(src), str(dst))
            return
        src, dst = str(src).rstrip("/"), str(dst).rstrip("/")
        _in_parallel(lambda rel: self.copy(f"{src}/{rel}", f"{dst}/{rel}"), only)


class FsspecStorage:
    """moxing.file's calls with moxing's semantics on fsspec: local paths, file://, s3://, obs:// (S3-compatible),
    memory:// and read-only http(s)://. Transient errors are retried; a local file never shows half-written."""

    def __init__(self, io_timeout=DEFAULT_IO_TIMEOUT):
        self.io_timeout = io_timeout

    def exists(self, url):
        fs, path = filesystem(url, self.io_timeout)
        return fs.exists(path)

    def is_directory(self, url):
        fs, path = filesystem(url, self.io_timeout)
        return fs.isdir(path)

    def make_dirs(self, url):
        fs, path = filesystem(url, self.io_timeout)
        fs.makedirs(path, exist_ok=True)

    def list_names(self, url):
        """The names of the files and folders directly in folder `url` (none when it does not exist: a bucket
        has no empty folders)."""
        fs, path = filesystem(url, self.io_timeout)
        try:
            entries = _retry(lambda: fs.ls(path, detail=False, refresh=True), f"listing {redact(url)}")
        except FileNotFoundError:
            return []
        return [entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries]

    def remove(self, url):
        """Delete one file (gone already is fine)."""
        fs, path = filesystem(url, self.io_timeout)
        try:
            _retry(lambda: fs.rm(path), f"deleting {redact(url)}")
        except FileNotFoundError:
            pass

    def copy(self, src, dst):
        """Copy one file."""
        src_fs, src_path = filesystem(src, self.io_timeout)
        dst_fs, dst_path = filesystem(dst, self.io_timeout)
        _retry(lambda: _copy_file(src_fs, src_path, dst_fs, dst_path, self.io_timeout), f"copying {redact(src)}")

    def copy_parallel(self, src, dst, only=None):
        """Copy the contents of folder `src` into folder `dst`, several files at a time; `only`, when given, limits
        the copy to those paths relative to `src`."""
        src_fs, src_root = filesystem(src, self.io_timeout)
        dst_fs, dst_root = filesystem(dst, self.io_timeout)
        src_root, dst_root = src_root.rstrip("/"), dst_root.rstrip("/")
        relative = only if only is not None else [
            PurePosixPath(f).relative_to(src_root).as_posix() for f in src_fs.find(src_root)]
        _in_parallel(lambda rel: _retry(lambda: _copy_file(src_fs, f"{src_root}/{rel}", dst_fs, f"{dst_root}/{rel}",
                                                           self.io_timeout), f"copying {rel} to {redact(dst)}"),
                     relative)


@functools.lru_cache(maxsize=None)
def _obs_filesystem_class():
    """Defined once, so fsspec's instance cache can reuse OBS filesystems between calls."""
    import s3fs

    class ObsFileSystem(s3fs.S3FileSystem):
        """Huawei OBS through its S3-compatible API."""
        protocol = ("obs",)

        def __init__(self, *args, **kwargs):
            endpoint = _endpoint("OBS_ENDPOINT", "S3_ENDPOINT")
            if endpoint:
                kwargs.setdefault("client_kwargs", {}).setdefault("endpoint_url", endpoint)
            kwargs.setdefault("key", os.environ.get("OBS_ACCESS_KEY_ID") or os.environ.get("AWS_ACCESS_KEY_ID"))
            kwargs.setdefault("secret", os.environ.get("OBS_SECRET_ACCESS_KEY")
                              or os.environ.get("AWS_SECRET_ACCESS_KEY"))
            super().__init__(*args, **kwargs)

    return ObsFileSystem


@functools.lru_cache(maxsize=None)
def _s3_session():
    """One botocore session for every S3/OBS filesystem, without `Expect: 100-continue` on uploads: aiohttp waits
    for the 100 with no timeout, so an endpoint that never answers would hold an upload forever."""
    from aiobotocore.session import AioSession
    from botocore.handlers import add_expect_header
    session = AioSession()
    session.unregister("before-call.s3", add_expect_header)
    return session


def _timeouts(scheme, io_timeout):
    """fsspec options that bound every request of `scheme` by `io_timeout` seconds without progress."""
    if scheme in ("s3", "obs"):
        return {"session": _s3_session(),
                "config_kwargs": {"connect_timeout": io_timeout, "read_timeout": io_timeout,
                                  "retries": {"total_max_attempts": S3_ATTEMPTS, "mode": "standard"}}}
    if scheme in HTTP_SCHEMES:
        import aiohttp
        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(sock_connect=io_timeout, sock_read=io_timeout)}}
    return {}


def filesystem(url, io_timeout=DEFAULT_IO_TIMEOUT):
    """(fsspec filesystem, path within it) for any supported URL."""
    import fsspec
    scheme = scheme_of(url)
    options = _timeouts(scheme, io_timeout)
    if scheme == "obs":
        fsspec.register_implementation("obs", _obs_filesystem_class(), clobber=True)
    elif scheme == "s3":
        endpoint = _endpoint("S3_ENDPOINT", "AWS_ENDPOINT_URL")
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
    elif scheme == "file":
        url = str(local_path(url))
    try:
        fs, path = fsspec.core.url_to_fs(str(url), **options)
    except (ImportError, ValueError) as exc:
        raise UserError(f"unsupported location {redact(url)}: {redact_text(exc)}") from None
    if scheme in ("s3", "obs"):
        fs.retries = 1  # s3fs would repeat botocore's attempts 5 times over: the deadline would be 10 x io_timeout
    return fs, path


def _retry(action, what):
    """Run `action`, retrying transient I/O errors with backoff; a missing or forbidden object, a full disk and a
    timeout (which already waited io_timeout, twice) are not retried."""
    for delay in RETRY_DELAYS + (None,):
        try:
            return action()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
            raise
        except OSError as exc:
            if delay is None or is_disk_full(exc) or is_timeout(exc) or exc.errno == errno.EROFS:
                raise
            print(f"warning: {what} failed ({redact_text(exc)}); retrying in {delay:.1f}s", flush=True)
            time.sleep(delay)


def _is_local_fs(fs):
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocols


def _copy_file(src_fs, src, dst_fs, dst, io_timeout=DEFAULT_IO_TIMEOUT):
    """One file, never visible half-written under its final name."""
    if _is_local_fs(dst_fs):
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{dst}.partial"
        try:
            src_fs.get_file(src, tmp)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)  # a full disk or a timeout leaves no half file behind
            raise
        os.replace(tmp, dst)
    elif _is_local_fs(src_fs):  # an S3 PUT or multipart upload becomes visible only once complete
        # aiohttp has no write timeout: a last-resort deadline (fsspec cancels the upload), at MIN_RATE on average
        deadline = {"timeout": S3_ATTEMPTS * io_timeout + os.path.getsize(src) / MIN_RATE} \
            if getattr(dst_fs, "async_impl", False) else {}
        dst_fs.put_file(src, dst, **deadline)
    else:
        with src_fs.open(src, "rb") as reader:
            writer = dst_fs.open(dst, "wb")
            try:
                shutil.copyfileobj(reader, writer, 8 << 20)
            except BaseException:
                if hasattr(writer, "discard"):  # drop the upload rather than commit a partial object
                    writer.discard()
                raise
            writer.close()
