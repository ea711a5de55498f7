"""Staging files in and out of the job.

For now inputs and outputs are local folders; remote locations (obs://, s3://, http(s) archives) come with the
storage layer.
"""
from pathlib import Path

from errors import UserError

REMOTE_SCHEMES = ("obs://", "s3://", "http://", "https://", "memory://")


def stage_in(url, what):
    """A local path for an input, or a clear error when it does not exist."""
    if url.startswith(REMOTE_SCHEMES):
        raise UserError(f"{what} {url}: remote locations are not supported yet; copy the data to a local folder")
    path = Path(url.removeprefix("file://")).expanduser()
    if not path.exists():
        raise UserError(f"{what} {path} does not exist")
    return path


def prepare_output(url, what="output folder"):
    """Create the output folder and prove it is writable before any work is done."""
    if url.startswith(REMOTE_SCHEMES):
        raise UserError(f"{what} {url}: remote locations are not supported yet; use a local folder")
    path = Path(url.removeprefix("file://")).expanduser()
    probe = path / ".write-test"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be written: {exc.strerror or exc}") from None
    return path
