"""Staging files in and out of the job, on any storage.

The calls ModelArts code makes through Huawei's `moxing.file` (copy_parallel, copy, exists, make_dirs,
list_directory, remove), with moxing's semantics, backed by fsspec: local paths, file://, s3://, obs://
(S3-compatible) and memory://, plus read-only http(s)://. Inside ModelArts, where the real moxing is importable,
it is used instead.

Endpoints and keys come from the environment:
- obs://  OBS_ENDPOINT (or S3_ENDPOINT), OBS_ACCESS_KEY_ID / OBS_SECRET_ACCESS_KEY (or the AWS_* names);
- s3://   S3_ENDPOINT or AWS_ENDPOINT_URL when not AWS itself, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
"""
import functools
import hashlib
import os
import shutil
import stat
import tarfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit, urlunsplit

from errors import UserError

HTTP_SCHEMES = ("http", "https")
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
COMPLETE_MARKER = ".complete"
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


# ---------------------------------------------------------------- fsspec back end

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


def _moxing_file():
    """moxing.file inside ModelArts; None elsewhere.

    (The PyPI package named `moxing` is unrelated: never install it.)"""
    try:
        import moxing
    except ImportError:
        return None
    return getattr(moxing, "file", None)


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


# ---------------------------------------------------------------- the moxing.file calls

def exists(url):
    mox = _moxing_file()
    if mox:
        return mox.exists(str(url))
    fs, path = filesystem(url)
    return fs.exists(path)


def make_dirs(url):
    mox = _moxing_file()
    if mox:
        return mox.make_dirs(str(url))
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


def list_directory(url):
    """Names directly inside a folder, sorted."""
    mox = _moxing_file()
    if mox:
        return sorted(mox.list_directory(str(url)))
    fs, path = filesystem(url)
    return sorted(PurePosixPath(entry.rstrip("/")).name for entry in fs.ls(path, detail=False)
                  if entry.rstrip("/") != path.rstrip("/"))


def remove(url, recursive=False):
    mox = _moxing_file()
    if mox:
        return mox.remove(str(url), recursive=recursive)
    fs, path = filesystem(url)
    fs.rm(path, recursive=recursive)


def copy(src, dst):
    """Copy one file."""
    mox = _moxing_file()
    if mox:
        return mox.copy(str(src), str(dst))
    src_fs, src_path = filesystem(src)
    dst_fs, dst_path = filesystem(dst)
    _retry(lambda: _copy_file(src_fs, src_path, dst_fs, dst_path), f"copying {redact(src)}")


def copy_parallel(src, dst, only=None):
    """Copy the contents of folder `src` into folder `dst` (moxing's semantics), several files at a time.

    `only`, when given, limits the copy to those paths relative to `src`. Returns the relative paths copied.
    """
    mox = _moxing_file()
    if mox and only is None:
        return mox.copy_parallel(str(src), str(dst))
    src_fs, src_root = filesystem(src)
    dst_fs, dst_root = filesystem(dst)
    src_root, dst_root = src_root.rstrip("/"), dst_root.rstrip("/")
    relative = only if only is not None else [
        PurePosixPath(f).relative_to(src_root).as_posix() for f in src_fs.find(src_root)]

    def one(rel):
        _retry(lambda: _copy_file(src_fs, f"{src_root}/{rel}", dst_fs, f"{dst_root}/{rel}"),
               f"copying {rel} to {redact(dst)}")

    with ThreadPoolExecutor(COPY_WORKERS) as pool:
        list(pool.map(one, relative))
    return relative


# ---------------------------------------------------------------- archives

def is_archive(path):
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def _inside(root, target):
    root, target = os.path.realpath(root), os.path.realpath(target)
    return target == root or target.startswith(root + os.sep)


def _check_member(root, name, link_target=None, hard_link=False):
    """Refuse a member that would be written, or would point, outside `root`."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UserError(f"refusing archive member {name!r}: absolute path")
    destination = os.path.join(root, name)
    if not _inside(root, destination):
        raise UserError(f"refusing archive member {name!r}: it would be written outside the extraction folder")
    if link_target is not None:
        base = root if hard_link else os.path.dirname(destination)
        if os.path.isabs(link_target) or not _inside(root, os.path.join(base, link_target)):
            raise UserError(f"refusing archive member {name!r}: a link to {link_target!r}, outside the archive")


def extract_archive(archive, target):
    """Extract a zip or tar(.gz) into `target` after checking every member; an unsafe archive extracts nothing."""
    archive, target = Path(archive), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                members = zf.infolist()
                for info in members:
                    is_link = stat.S_ISLNK(info.external_attr >> 16)
                    _check_member(str(target), info.filename, zf.read(info).decode() if is_link else None)
                zf.extractall(target)
        else:
            with tarfile.open(archive) as tf:
                members = tf.getmembers()
                for member in members:
                    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
                        raise UserError(f"refusing archive member {member.name!r}: not a file, folder or link")
                    _check_member(str(target), member.name, member.linkname if member.issym() or member.islnk()
                                  else None, hard_link=member.islnk())
                if hasattr(tarfile, "data_filter"):
                    tf.extractall(target, filter="data")
                else:
                    tf.extractall(target)  # members checked above (Python without extraction filters)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, UnicodeDecodeError) as exc:
        raise UserError(f"{archive.name} is not a readable archive ({exc})") from None
    return target


# ---------------------------------------------------------------- staging

def default_cache_dir():
    """ModelArts mounts a large local disk at /cache; elsewhere use the user's cache folder."""
    if os.path.isdir("/cache") and os.access("/cache", os.W_OK):
        return Path("/cache/resnet-job")
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "resnet-job"


def _cache_key(url):
    return hashlib.sha256(redact(url).encode()).hexdigest()[:16]


def _basename(url):
    return PurePosixPath(urlsplit(str(url)).path.rstrip("/")).name or "download"


def _fetch(url, destination):
    """Copy a remote file or folder to `destination` (a folder): http(s) with `download`, others with fsspec."""
    name = _basename(url)
    if scheme_of(url) in HTTP_SCHEMES:
        from download import download
        try:
            download(url, str(destination / name), kind="file", progressbar=True, replace=True, verbose=False,
                     timeout=30)
        except Exception as exc:  # urllib and `download` raise many types; all mean "could not fetch"
            raise UserError(f"could not download {redact(url)}: {_reason(exc)}") from None
        return destination / name
    fs, path = filesystem(url)
    try:
        if fs.isdir(path):
            copy_parallel(url, destination / name)
        else:
            copy(url, destination / name)
    except FileNotFoundError:
        raise UserError(f"{redact(url)} does not exist") from None
    except PermissionError as exc:
        raise UserError(f"{redact(url)} cannot be read: {_reason(exc)}") from None
    except OSError as exc:
        raise UserError(f"could not read {redact(url)}: {_reason(exc)}") from None
    return destination / name


def _reason(exc):
    """The root cause in one line (`download` wraps urllib's error in a generic RuntimeError)."""
    while exc.__cause__ or exc.__context__:
        exc = exc.__cause__ or exc.__context__
    reason = getattr(exc, "reason", None) or exc
    text = str(reason).strip().splitlines()
    return text[0] if text else type(exc).__name__


def stage_in(url, what, cache_dir=None, leader=True):
    """A local path for an input: local files are used in place, remote ones are fetched into the cache once,
    and archives are extracted there (safely). A half-finished fetch is never taken for a finished one.

    With several workers on a machine only the `leader` fetches; the others wait for its completion marker."""
    url = str(url)
    cache = Path(cache_dir or default_cache_dir())
    if is_local(url):
        path = local_path(url)
        if not path.exists():
            raise UserError(f"{what} {path} does not exist")
        if not (path.is_file() and is_archive(path)):
            return path
        info = path.stat()
        key = _cache_key(f"{path.resolve()}:{info.st_size}:{info.st_mtime_ns}")
        return _staged(cache / "extracted" / key, what, str(path),
                       lambda partial: extract_archive(path, partial / "extracted"), leader)

    def fetch(partial):
        fetched = _fetch(url, partial)
        if not (fetched.is_file() and is_archive(fetched)):
            return fetched
        extract_archive(fetched, partial / "extracted")
        fetched.unlink()
        return partial / "extracted"

    return _staged(cache / "inputs" / _cache_key(url), what, redact(url), fetch, leader)


STAGING_WAIT = 4 * 3600  # seconds a worker waits for the leader's download


def _staged(target, what, source, produce, leader=True):
    """`produce(partial_folder)` once per target; the marker, written last, names what it produced."""
    marker = target / COMPLETE_MARKER
    if not leader:
        deadline = time.monotonic() + STAGING_WAIT
        while not marker.exists():
            if time.monotonic() > deadline:
                raise UserError(f"{what}: gave up waiting for another worker to stage {source} into {target}")
            time.sleep(1)
    if marker.exists():
        print(f"{what}: using the cached copy of {source} in {target}")
        return target / marker.read_text().strip()
    print(f"{what}: staging {source} into {target}")
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
    except OSError as exc:
        raise UserError(f"cache folder {target.parent} cannot be written (see --cache_dir): "
                        f"{exc.strerror or exc}") from None
    produced = produce(partial)
    (partial / COMPLETE_MARKER).write_text(produced.name + "\n")
    os.replace(partial, target)
    return target / produced.name


def prepare_output(url, what="output folder"):
    """Create a local output folder and prove it is writable before any work is done."""
    path = local_path(url)
    probe = path / ".write-test"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be written: {exc.strerror or exc}") from None
    return path


class OutputMirror:
    """A local folder the job writes into; for a remote `url`, `push()` copies what changed there.

    Outputs are written locally first so that a slow or failing upload never corrupts them, and pushed after every
    epoch and at the end, so a preempted job keeps what it made.
    """

    def __init__(self, url, what, cache_dir=None):
        self.url, self.what = str(url), what
        self.remote = None if is_local(url) else self.url.rstrip("/")
        if self.remote is None:
            self.local = prepare_output(url, what)
        else:
            self._check_remote()
            local = Path(cache_dir or default_cache_dir()) / "outputs" / _cache_key(url)
            self.local = prepare_output(local, f"local staging folder for {what}")
        self._pushed = {}

    def _check_remote(self):
        if scheme_of(self.remote) in HTTP_SCHEMES:
            raise UserError(f"{self.what} {redact(self.remote)}: http(s) locations are read-only")
        fs, path = filesystem(self.remote)
        bucket = path.split("/", 1)[0]
        try:
            if scheme_of(self.remote) in ("s3", "obs") and not fs.exists(bucket):
                raise UserError(f"{self.what} {redact(self.remote)}: bucket {bucket!r} does not exist")
            fs.makedirs(path, exist_ok=True)
        except UserError:
            raise
        except Exception as exc:  # botocore/aiohttp raise their own types for unreachable endpoints
            raise UserError(f"{self.what} {redact(self.remote)} cannot be reached: {_reason(exc)}") from None

    def pull(self, *names):
        """Copy these files (or, with no names, everything) from the remote into the local folder, where the remote
        has them: a restarted job on a fresh disk. Returns how many files were copied."""
        if self.remote is None:
            return 0
        if not names:
            if not exists(self.remote):
                return 0
            copy_parallel(self.remote, self.local)
        for name in names:
            if exists(f"{self.remote}/{name}"):
                copy(f"{self.remote}/{name}", self.local / name)
        pulled = [p for p in self.local.rglob("*") if p.is_file()] if not names else \
            [self.local / n for n in names if (self.local / n).is_file()]
        for path in pulled:  # already on the remote: not to be pushed back unless they change
            info = path.stat()
            self._pushed[path.relative_to(self.local).as_posix()] = (info.st_size, info.st_mtime_ns)
        return len(pulled)

    def push(self):
        """Copy new and changed files to the remote; returns how many were copied."""
        if self.remote is None:
            return 0
        changed = {}
        for path in sorted(self.local.rglob("*")):
            if path.is_file() and ".partial" not in path.name:
                info = path.stat()
                rel = path.relative_to(self.local).as_posix()
                if self._pushed.get(rel) != (info.st_size, info.st_mtime_ns):
                    changed[rel] = (info.st_size, info.st_mtime_ns)
        if changed:
            copy_parallel(self.local, self.remote, only=list(changed))
            self._pushed.update(changed)
        return len(changed)
