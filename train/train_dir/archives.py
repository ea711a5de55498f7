"""Extracting zip and tar(.gz) inputs safely: no member may land, or point, outside the extraction folder."""
import os
import stat
import tarfile
import zipfile
from pathlib import Path

from errors import UserError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")


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
