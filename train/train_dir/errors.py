"""The ways a job ends early on purpose: each is printed as one `error:` line, with its own non-zero exit code."""
import contextlib
import errno
import os
import sys


class UserError(Exception):
    """Bad input from the user (flags, data, checkpoints, paths): reported without a traceback."""


class OutputError(UserError):
    """A folder the job writes to cannot take a write: its disk is full or read-only, or the folder was deleted.
    Nothing in the program is wrong, so it is reported like a user's mistake (exit 2)."""


class Interrupted(Exception):
    """The job was stopped by a signal (Ctrl-C, or the platform preempting it): while training, between two steps."""

    def __init__(self, signum):
        import signal
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @classmethod
    def raise_for(cls, signum, frame=None):
        """A signal handler: the signal becomes this exception wherever the main thread is, so the job still ends
        with its clean-ups and its error line (SIGTERM's default would kill it mid-write)."""
        raise cls(signum)


class Diverged(Exception):
    """The loss became NaN or infinite: training cannot recover, so the job stops with the last good epoch kept."""


WRITE_FAULTS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied", errno.ENOENT: "the folder was deleted while the job ran"}
# How libraries without an errno (RocksDB under Aim, SQLite) word the same faults.
FAULT_WORDS = {"no space left": errno.ENOSPC, "disk is full": errno.ENOSPC, "quota exceeded": errno.EDQUOT,
               "read-only file system": errno.EROFS, "readonly database": errno.EROFS,
               "permission denied": errno.EACCES, "no such file or directory": errno.ENOENT}
LOW_SPACE = 1 << 20  # bytes: less free than this and a write that failed for no stated reason is put down to it


def one_line(exc, limit=300):
    """`exc`'s message on one line (whitespace runs made one space), at most `limit` characters (None: all), or its
    type's name when it has none: for a warning or an error line that quotes a library's failure."""
    text = " ".join(str(exc).split())[:limit]
    return text or type(exc).__name__


def _stated_fault(exc):
    """The errno of a write fault that `exc` (or an exception it came from) states, or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in WRITE_FAULTS:
            return exc.errno
        text = str(exc).lower()
        for words, code in FAULT_WORDS.items():
            if words in text:
                return code
        exc = exc.__cause__ or exc.__context__
    return None


def folder_fault(folder):
    """The errno of what stops writes into `folder`, found by looking at it (gone, read-only, nearly full), or None."""
    if not os.path.isdir(folder):
        return errno.ENOENT
    if not hasattr(os, "statvfs"):  # Windows
        return None
    info = os.statvfs(folder)
    if info.f_flag & os.ST_RDONLY:
        return errno.EROFS
    return errno.ENOSPC if info.f_bavail * info.f_frsize < LOW_SPACE else None


def write_fault(exc, folder, what):
    """The OutputError for `exc`, raised while writing `what` (e.g. "resnet50-last.ckpt") into `folder`, when a full,
    read-only or vanished disk caused it; None when it did not (a bug, which keeps its traceback)."""
    if not isinstance(exc, Exception) or isinstance(exc, (UserError, Interrupted, Diverged)):
        return None  # a stop signal, or already said
    code = _stated_fault(exc)
    if code == errno.ENOENT and os.path.isdir(folder):
        code = None  # the folder is there: something else is missing
    code = code or folder_fault(folder)
    if code is None:
        return None
    return OutputError(f"cannot write {what} in {folder}: {WRITE_FAULTS[code]}")


@contextlib.contextmanager
def child_stderr_held():
    """Output to file descriptor 2 (where child processes print, e.g. Aim's database migration its traceback on a
    full disk) is held back while the block runs, and shown only if it succeeds: a failure is the job's one line."""
    import tempfile
    try:
        held, saved = tempfile.TemporaryFile(), os.dup(2)
    except OSError:  # no room even for that: let it through
        yield
        return
    sys.stderr.flush()
    os.dup2(held.fileno(), 2)
    try:
        yield
        held.seek(0)
        shown = held.read().decode(errors="replace")
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        held.close()
    sys.stderr.write(shown)


def run_main(main, parse):
    """A job script's entry point, `main(parse())`: one `error:` line and a non-zero exit, never a traceback, for
    user mistakes and outside faults (2), a diverged loss (3) and a stopping signal (128 + its number)."""
    import signal
    signal.signal(signal.SIGTERM, Interrupted.raise_for)  # the platform's preemption: end cleanly, not mid-write
    try:
        main(parse())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Diverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except Interrupted as exc:  # 128 + the signal's number, as a shell reports a process the signal killed
        print(f"error: stopped by {exc}; what was finished before it is kept", file=sys.stderr)
        return 128 + exc.signum
    except OSError as exc:  # a full or read-only disk under a write that export.py does not make
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        print(f"error: cannot write {exc.filename or 'to the disk'}: {WRITE_FAULTS[exc.errno]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0
