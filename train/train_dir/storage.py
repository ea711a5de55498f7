"""Where files live: URL helpers, and the one storage back end every remote read and write goes through
(Huawei's `moxing.file` inside ModelArts, fsspec everywhere else).

Endpoints and keys for fsspec come from the environment:
- obs://  OBS_ENDPOINT (or S3_ENDPOINT), OBS_ACCESS_KEY_ID / OBS_SECRET_ACCESS_KEY (or the AWS_* names);
- s3://   S3_ENDPOINT or AWS_ENDPOINT_URL when not AWS itself, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
"""
import functools
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit, urlunsplit

from errors import UserError

HTTP_SCHEMES = ("http", "https")
COPY_WORKERS = 8
RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0)  # seconds before each retry of a transient failure


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


def _endpoint(*names):
    for name in names:
        value = os.environ.get(name)
        if value:
            return value if "://" in value else f"https://{value}"
    return None


# ---------------------------------------------------------------- the back end

def backend():
    """The store to use: moxing.file where Huawei's moxing is importable (inside ModelArts), else fsspec.

    (The PyPI package named `moxing` is unrelated: never install it.)"""
    try:
        import moxing
    except ImportError:
        return FsspecStorage()
    mox_file = getattr(moxing, "file", None)
    return MoxingStorage(mox_file) if mox_file else FsspecStorage()


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

    def exists(self, url):
        fs, path = filesystem(url)
        return fs.exists(path)

    def is_directory(self, url):
        fs, path = filesystem(url)
        return fs.isdir(path)

    def make_dirs(self, url):
        fs, path = filesystem(url)
        fs.makedirs(path, exist_ok=True)

    def copy(self, src, dst):
        """Copy one file."""
        src_fs, src_path = filesystem(src)
        dst_fs, dst_path = filesystem(dst)
        _retry(lambda: _copy_file(src_fs, src_path, dst_fs, dst_path), f"copying {redact(src)}")

    def copy_parallel(self, src, dst, only=None):
        """Copy the contents of folder `src` into folder `dst`, several files at a time; `only`, when given, limits
        the copy to those paths relative to `src`."""
        src_fs, src_root = filesystem(src)
        dst_fs, dst_root = filesystem(dst)
        src_root, dst_root = src_root.rstrip("/"), dst_root.rstrip("/")
        relative = only if only is not None else [
            PurePosixPath(f).relative_to(src_root).as_posix() for f in src_fs.find(src_root)]
        _in_parallel(lambda rel: _retry(lambda: _copy_file(src_fs, f"{src_root}/{rel}", dst_fs, f"{dst_root}/{rel}"),
                                        f"copying {rel} to {redact(dst)}"), relative)


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


def filesystem(url):
    """(fsspec filesystem, path within it) for any supported URL."""
    import fsspec
    scheme = scheme_of(url)
    options = {}
    if scheme == "obs":
        fsspec.register_implementation("obs", _obs_filesystem_class(), clobber=True)
    elif scheme == "s3":
        endpoint = _endpoint("S3_ENDPOINT", "AWS_ENDPOINT_URL")
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
    elif scheme == "file":
        url = str(local_path(url))
    try:
        return fsspec.core.url_to_fs(str(url), **options)
    except (ImportError, ValueError) as exc:
        raise UserError(f"unsupported location {redact(url)}: {exc}") from None


def _retry(action, what):
    """Run `action`, retrying transient I/O errors with backoff; a missing or forbidden object is not retried."""
    for delay in RETRY_DELAYS + (None,):
        try:
            return action()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
            raise
        except OSError as exc:
            if delay is None:
                raise
            print(f"warning: {what} failed ({exc}); retrying in {delay:.1f}s", flush=True)
            time.sleep(delay)


def _is_local_fs(fs):
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocols


def _copy_file(src_fs, src, dst_fs, dst):
    """One file, never visible half-written under its final name."""
    if _is_local_fs(dst_fs):
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{dst}.partial"
        src_fs.get_file(src, tmp)
        os.replace(tmp, dst)
    elif _is_local_fs(src_fs):
        dst_fs.put_file(src, dst)  # an S3 PUT or multipart upload becomes visible only once complete
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
