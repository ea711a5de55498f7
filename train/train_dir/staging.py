"""Staging the job's files: inputs fetched into a local cache once, outputs written locally and mirrored up.

Every remote read and write goes through `storage.backend()`; http(s) inputs are fetched with `download`.
"""
import hashlib
import os
import shutil
import time
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import storage
from archives import extract_archive, is_archive
from errors import UserError

COMPLETE_MARKER = ".complete"
STAGING_WAIT = 4 * 3600  # seconds a worker waits for the leader's download


def default_cache_dir():
    """ModelArts mounts a large local disk at /cache; elsewhere use the user's cache folder."""
    if os.path.isdir("/cache") and os.access("/cache", os.W_OK):
        return Path("/cache/resnet-job")
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "resnet-job"


def _cache_key(url):
    return hashlib.sha256(storage.redact(url).encode()).hexdigest()[:16]


def _basename(url):
    return PurePosixPath(urlsplit(str(url)).path.rstrip("/")).name or "download"


def _reason(exc):
    """The root cause in one line (`download` wraps urllib's error in a generic RuntimeError)."""
    while exc.__cause__ or exc.__context__:
        exc = exc.__cause__ or exc.__context__
    reason = getattr(exc, "reason", None) or exc
    text = str(reason).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _fetch(url, destination):
    """Copy a remote file or folder to `destination` (a folder): http(s) with `download`, others with the back end."""
    name = _basename(url)
    if storage.scheme_of(url) in storage.HTTP_SCHEMES:
        from download import download
        try:
            download(url, str(destination / name), kind="file", progressbar=True, replace=True, verbose=False,
                     timeout=30)
        except Exception as exc:  # urllib and `download` raise many types; all mean "could not fetch"
            raise UserError(f"could not download {storage.redact(url)}: {_reason(exc)}") from None
        return destination / name
    store = storage.backend()
    try:
        if store.is_directory(url):
            store.copy_parallel(url, destination / name)
        else:
            store.copy(url, destination / name)
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{storage.redact(url)} does not exist") from None
    except PermissionError as exc:
        raise UserError(f"{storage.redact(url)} cannot be read: {_reason(exc)}") from None
    except Exception as exc:  # botocore and moxing raise their own types, e.g. for no keys or no endpoint
        raise UserError(f"could not read {storage.redact(url)}: {_reason(exc)}") from None
    return destination / name


def stage_in(url, what, cache_dir=None, leader=True):
    """A local path for an input: local files are used in place, remote ones are fetched into the cache once,
    and archives are extracted there (safely). A half-finished fetch is never taken for a finished one.

    With several workers on a machine only the `leader` fetches; the others wait for its completion marker."""
    url = str(url)
    cache = Path(cache_dir or default_cache_dir())
    if storage.is_local(url):
        path = storage.local_path(url)
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

    return _staged(cache / "inputs" / _cache_key(url), what, storage.redact(url), fetch, leader)


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
    path = storage.local_path(url)
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
        self.remote = None if storage.is_local(url) else self.url.rstrip("/")
        self._pushed = {}
        if self.remote is None:
            self.local = prepare_output(url, what)
            return
        self._store = storage.backend()
        self._check_remote()
        local = Path(cache_dir or default_cache_dir()) / "outputs" / _cache_key(url)
        self.local = prepare_output(local, f"local staging folder for {what}")

    def _check_remote(self):
        scheme, where = storage.scheme_of(self.remote), f"{self.what} {storage.redact(self.remote)}"
        if scheme in storage.HTTP_SCHEMES:
            raise UserError(f"{where}: http(s) locations are read-only")
        bucket = urlsplit(self.remote).netloc
        try:
            if scheme in ("s3", "obs") and not self._store.exists(f"{scheme}://{bucket}"):
                raise UserError(f"{where}: bucket {bucket!r} does not exist")
            self._store.make_dirs(self.remote)
        except UserError:
            raise
        except Exception as exc:  # botocore/aiohttp raise their own types for unreachable endpoints
            raise UserError(f"{where} cannot be reached: {_reason(exc)}") from None

    def _local_files(self):
        """relative path -> (size, mtime) of every finished file in the local folder."""
        files = {}
        for path in sorted(self.local.rglob("*")):
            if path.is_file() and ".partial" not in path.name:
                info = path.stat()
                files[path.relative_to(self.local).as_posix()] = (info.st_size, info.st_mtime_ns)
        return files

    def pull(self, *names):
        """Copy these files or folders (or, with no names, everything) from the remote into the local folder, where
        the remote has them: a restarted job on a fresh disk. Returns how many files were copied."""
        if self.remote is None:
            return 0
        before = self._local_files()
        for name in names or ("",):  # "": the whole folder
            remote = f"{self.remote}/{name}".rstrip("/")
            if self._store.is_directory(remote):
                self._store.copy_parallel(remote, self.local / name)
            elif name and self._store.exists(remote):
                self._store.copy(remote, self.local / name)
        pulled = {rel: info for rel, info in self._local_files().items() if before.get(rel) != info}
        self._pushed.update(pulled)  # already on the remote: not to be pushed back unless they change
        return len(pulled)

    def push(self):
        """Copy new and changed files to the remote; returns how many were copied."""
        if self.remote is None:
            return 0
        changed = {rel: info for rel, info in self._local_files().items() if self._pushed.get(rel) != info}
        if changed:
            self._store.copy_parallel(self.local, self.remote, only=list(changed))
            self._pushed.update(changed)
        return len(changed)
