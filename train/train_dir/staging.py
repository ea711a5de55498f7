"""Staging the job's files: inputs fetched into a local cache once, outputs written locally and mirrored up.

Every remote read and write goes through `storage.backend()`; http(s) inputs are streamed by `http_get`.
Every transfer ends after `io_timeout` seconds without progress; a full disk, a timeout or an unreachable store ends
the job with one line naming the (redacted) location, and leaves no half-written file in the cache.
"""
import base64
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path, PurePosixPath
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit, urlunsplit

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


def _reason(exc, io_timeout=None):
    """The root cause in one line, without secrets; a timeout says which flag sets it."""
    chain = [exc]
    while chain[-1].__cause__ or (chain[-1].__context__ and not chain[-1].__suppress_context__):
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    if isinstance(exc, TransferStalled):
        return str(exc)
    if io_timeout and any(map(storage.is_timeout, chain)):
        return f"no answer for {io_timeout:g} s (see --io_timeout)"
    root = chain[-1]
    reason = root.reason if isinstance(root, URLError) and not isinstance(root, HTTPError) else root
    text = str(reason).strip().splitlines()
    return storage.redact_text(text[0]) if text else type(chain[-1]).__name__


class TransferStalled(TimeoutError):
    """A download made no progress, or crawled below storage.MIN_RATE, for io_timeout seconds."""


def _without_credentials(url):
    """(url without user:password@, headers carrying them as HTTP basic auth)."""
    parts = urlsplit(url)
    if parts.username is None:
        return url, {}
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    token = base64.b64encode(f"{parts.username}:{parts.password or ''}".encode()).decode()
    return urlunsplit(parts._replace(netloc=host)), {"Authorization": f"Basic {token}"}


class _Watchdog:
    """Raises TransferStalled once the bytes that arrived over the last io_timeout seconds average below MIN_RATE."""

    def __init__(self, io_timeout):
        self.io_timeout = io_timeout
        self.since, self.at_start = time.monotonic(), 0

    def check(self, received):
        elapsed = time.monotonic() - self.since
        if elapsed < self.io_timeout:
            return
        if received - self.at_start < storage.MIN_RATE * elapsed:
            raise TransferStalled(f"less than {storage.MIN_RATE // 1024} KiB/s for {self.io_timeout:g} s "
                                  f"(see --io_timeout)")
        self.since, self.at_start = time.monotonic(), received


def http_get(url, destination, io_timeout=storage.DEFAULT_IO_TIMEOUT):
    """Stream an http(s) `url` into the file `destination`, with a progress bar on a terminal. Raises
    TransferStalled when no data arrives for `io_timeout` seconds or too little for that long, and
    ConnectionError for a body cut short."""
    import urllib.request
    from tqdm import tqdm

    plain, headers = _without_credentials(url)
    watchdog, received = _Watchdog(io_timeout), 0
    try:
        with urllib.request.urlopen(urllib.request.Request(plain, headers=headers), timeout=io_timeout) as response, \
                open(destination, "wb") as out, tqdm(total=response.length, unit="B", unit_scale=True, leave=False,
                                                     disable=not sys.stderr.isatty()) as bar:
            size = response.length
            while True:
                chunk = response.read1(1 << 16)  # whatever one read brings: the watchdog sees a trickle
                if not chunk:
                    break
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
                watchdog.check(received)
    except TransferStalled:
        raise
    except OSError as exc:  # urllib wraps a timeout while connecting in URLError, and raises others bare
        if storage.is_timeout(exc) or storage.is_timeout(getattr(exc, "reason", None)):
            raise TransferStalled(f"no data for {io_timeout:g} s (see --io_timeout)") from None
        raise
    if size is not None and received < size:
        raise ConnectionError(f"the server sent {received} of the {size} bytes it announced")


def _fetch(url, destination, io_timeout):
    """Copy a remote file or folder to `destination` (a folder): http(s) with `http_get`, others with the back end.
    A full disk is passed on as it is, for `_staged` to report."""
    name, where = _basename(url), storage.redact(url)
    try:
        if storage.scheme_of(url) in storage.HTTP_SCHEMES:
            http_get(url, destination / name, io_timeout)
            return destination / name
        store = storage.backend(io_timeout)
        if store.is_directory(url):
            store.copy_parallel(url, destination / name)
        else:
            store.copy(url, destination / name)
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{where} does not exist") from None
    except PermissionError as exc:
        raise UserError(f"{where} cannot be read: {_reason(exc)}") from None
    except Exception as exc:  # urllib, botocore and moxing raise their own types, e.g. for no keys or no endpoint
        if storage.is_disk_full(exc):
            raise
        verb = "download" if storage.scheme_of(url) in storage.HTTP_SCHEMES else "read"
        raise UserError(f"could not {verb} {where}: {_reason(exc, io_timeout)}") from None
    return destination / name


def stage_in(url, what, cache_dir=None, leader=True, io_timeout=storage.DEFAULT_IO_TIMEOUT):
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
        fetched = _fetch(url, partial, io_timeout)
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
    try:
        produced = produce(partial)
        (partial / COMPLETE_MARKER).write_text(produced.name + "\n")
    except BaseException as exc:  # also Ctrl-C: the cache keeps only complete copies
        shutil.rmtree(partial, ignore_errors=True)
        if storage.is_disk_full(exc):
            raise UserError(f"{what}: no space left in the cache folder {target.parent.parent} for {source} "
                            f"(see --cache_dir): {exc.strerror or exc}") from None
        raise
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

    def __init__(self, url, what, cache_dir=None, io_timeout=storage.DEFAULT_IO_TIMEOUT, deletes=True):
        self.url, self.what, self.io_timeout, self.deletes = str(url), what, io_timeout, deletes
        self.remote = None if storage.is_local(url) else self.url.rstrip("/")
        self._pushed, self._push_failed = {}, None
        if self.remote is None:
            self.local = prepare_output(url, what)
            return
        self._store = storage.backend(io_timeout)
        self._check_remote()
        local = Path(cache_dir or default_cache_dir()) / "outputs" / _cache_key(url)
        self.local = prepare_output(local, f"local staging folder for {what}")

    def _check_remote(self):
        scheme, where = storage.scheme_of(self.remote), f"{self.what} {storage.redact(self.remote)}"
        if scheme in storage.HTTP_SCHEMES:
            raise UserError(f"{where}: http(s) locations are read-only")
        bucket = urlsplit(self.remote).netloc
        try:  # is_directory, not exists: s3fs's exists says False for an endpoint that cannot be reached
            if scheme in ("s3", "obs") and not self._store.is_directory(f"{scheme}://{bucket}"):
                raise UserError(f"{where}: bucket {bucket!r} does not exist")
            self._store.make_dirs(self.remote)
        except UserError:
            raise
        except Exception as exc:  # botocore/aiohttp raise their own types for unreachable endpoints
            raise UserError(f"{where} cannot be reached: {_reason(exc, self.io_timeout)}") from None

    def remote_has(self, name):
        """Whether the remote location holds a file `name`, asked within --io_timeout."""
        try:
            return self._store.exists(f"{self.remote}/{name}")
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"{self.what} {storage.redact(self.remote)} cannot be read: "
                            f"{_reason(exc, self.io_timeout)}") from None

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
        try:
            for name in names or ("",):  # "": the whole folder
                remote = f"{self.remote}/{name}".rstrip("/")
                if self._store.is_directory(remote):
                    self._store.copy_parallel(remote, self.local / name)
                elif name and self._store.exists(remote):
                    self._store.copy(remote, self.local / name)
        except UserError:
            raise
        except Exception as exc:
            if storage.is_disk_full(exc):
                raise UserError(f"{self.what}: no space left in {self.local} for the files of "
                                f"{storage.redact(self.remote)} (see --cache_dir): {exc.strerror}") from None
            raise UserError(f"{self.what}: could not read {storage.redact(self.remote)}: "
                            f"{_reason(exc, self.io_timeout)}") from None
        pulled = {rel: info for rel, info in self._local_files().items() if before.get(rel) != info}
        self._pushed.update(pulled)  # already on the remote: not to be pushed back unless they change
        return len(pulled)

    def push(self):
        """Copy new and changed files to the remote; with `deletes`, also delete there the files this job pushed or
        pulled and has deleted since (a checkpoint that dropped out of --keep_checkpoints, a file Aim retired), as
        best it can: a delete that fails is a warning, tried again at the next push. Returns how many were
        copied."""
        if self.remote is None:
            return 0
        if self._push_failed:  # the store already failed after its retries and timeouts: do not wait for it again
            raise UserError(self._push_failed)
        local = self._local_files()
        changed = {rel: info for rel, info in local.items() if self._pushed.get(rel) != info}
        if changed:
            try:
                self._store.copy_parallel(self.local, self.remote, only=list(changed))
            except Exception as exc:
                self._push_failed = (f"{self.what}: could not upload to {storage.redact(self.remote)}: "
                                     f"{_reason(exc, self.io_timeout)}; the outputs are kept in {self.local}")
                raise UserError(self._push_failed) from None
            self._pushed.update(changed)
        for rel in [rel for rel in self._pushed if rel not in local] if self.deletes else []:
            try:
                self._store.remove(f"{self.remote}/{rel}")
                del self._pushed[rel]
            except Exception as exc:  # e.g. a bucket policy that allows writing but not deleting
                print(f"warning: {self.what}: could not delete {rel} (deleted here) from "
                      f"{storage.redact(self.remote)}: {_reason(exc, self.io_timeout)}", file=sys.stderr, flush=True)
        return len(changed)

    def discard(self, *names):
        """Delete these files here; with `deletes`, also at the remote location at the next push."""
        for name in names:
            (self.local / name).unlink(missing_ok=True)
            if self.remote is not None and self.deletes:
                self._pushed[name] = None  # pushed or not, push() deletes there what is gone here (gone: fine)

    def pull_matching(self, pattern):
        """Pull the files directly in the remote folder whose names match `pattern` (fnmatch)."""
        if self.remote is None:
            return 0
        import fnmatch
        try:
            names = [name for name in self._store.list_names(self.remote) if fnmatch.fnmatch(name, pattern)]
        except Exception as exc:
            raise UserError(f"{self.what} {storage.redact(self.remote)} cannot be listed: "
                            f"{_reason(exc, self.io_timeout)}") from None
        return self.pull(*names) if names else 0
