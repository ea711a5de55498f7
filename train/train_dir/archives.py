"""Extracting zip and tar(.gz) inputs safely, checked before anything is written: no member may land, or point,
outside the extraction folder, also by way of links the archive itself declares; and no archive may expand to more
than MAX_RATIO times its own size (a bomb) or to more than the free disk."""
import errno
import posixpath
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path

from errors import UserError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
MAX_RATIO = 200  # images and binaries compress ~1x, text ~10x; bombs 1000x and more
RATIO_FLOOR = 16 << 20  # bytes any archive may expand to, whatever its ratio
MAX_LINK_HOPS = 40  # as the kernel's limit on links followed in one path
MAX_LINK_TARGET = 4096  # bytes: a zip symlink's target is stored as its content


def is_archive(path):
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def _refuse(name, why):
    return UserError(f"refusing archive member {name!r}: {why}")


def _size(size):
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


class _Layout:
    """The extraction folder as the archive builds it, member by member: where each name lands when the links
    declared before it are followed, as the kernel follows them during extraction. Purely lexical, so it does not
    depend on Python's tarfile filters (missing before 3.9.17) or on what is on disk."""

    def __init__(self):
        self.links = {}  # where a symbolic link lands (relative, links resolved) -> (its target, its member name)

    def resolve(self, path, member):
        """The components of where `path` (relative to the folder) lands; refuses any way out of the folder."""
        parts, pending, hops = [], path.split("/")[::-1], 0
        while pending:
            part = pending.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if not parts:
                    raise _refuse(member, "it leads outside the extraction folder")
                parts.pop()
                continue
            parts.append(part)
            link = self.links.get("/".join(parts))
            if link is not None:
                hops += 1
                if hops > MAX_LINK_HOPS:
                    raise _refuse(member, "a loop of links")
                if link[0].startswith("/"):
                    raise _refuse(member, f"a link to {link[0]!r}, outside the archive")
                parts.pop()  # a link's target is relative to the folder holding the link
                pending.extend(link[0].split("/")[::-1])
        return parts

    def add(self, name, symlink=None, hardlink=None):
        """Check one member: a file or folder, or a link to `symlink` (relative to the link's folder) or to
        `hardlink` (relative to the extraction folder)."""
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
            raise _refuse(name, "absolute path")
        target = symlink if symlink is not None else hardlink
        if target is not None and target.startswith(("/", "\\")):
            raise _refuse(name, f"a link to {target!r}, outside the archive")
        if symlink is None:  # written through any link already at its place
            self.resolve(name, name)
            if hardlink is not None:
                self.resolve(hardlink, name)
            return
        folder, base = posixpath.split(name.rstrip("/"))
        if base in ("", ".", ".."):
            raise _refuse(name, "a link without a name")
        location = self.resolve(folder, name) + [base]  # a link replaces what is at its place
        self.resolve("/".join(location[:-1] + [symlink]), name)
        self.links["/".join(location)] = (symlink, name)

    def check_links(self):
        """Links declared later can redirect earlier ones: every link must still lead inside at the end."""
        for location, (_, name) in self.links.items():
            self.resolve(location, name)


def _check_size(archive, target, total):
    """Refuse a bomb, and an archive the disk cannot hold (as a full disk: OSError ENOSPC)."""
    size = archive.stat().st_size
    if total > max(MAX_RATIO * size, RATIO_FLOOR):
        raise UserError(f"refusing an archive bomb: it expands to {_size(total)}, more than {MAX_RATIO} times its "
                        f"own {_size(size)}")
    free = shutil.disk_usage(target).free
    if total > free:
        raise OSError(errno.ENOSPC, f"{archive.name} expands to {_size(total)}, and only {_size(free)} are free")


def _zip_members(zf):
    layout, total = _Layout(), 0
    for info in zf.infolist():
        symlink = None
        if stat.S_ISLNK(info.external_attr >> 16):
            if info.file_size > MAX_LINK_TARGET:
                raise _refuse(info.filename, "a link with an overlong target")
            symlink = zf.read(info).decode()
        layout.add(info.filename, symlink=symlink)
        total += info.file_size
    layout.check_links()
    return total


def _tar_members(tf):
    layout, total = _Layout(), 0
    for member in tf.getmembers():
        if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
            raise _refuse(member.name, "not a file, folder or link")
        layout.add(member.name, symlink=member.linkname if member.issym() else None,
                   hardlink=member.linkname if member.islnk() else None)
        total += member.size if member.isfile() else 0
    layout.check_links()
    return total


def extract_archive(archive, target):
    """Extract a zip or tar(.gz) into `target` after checking every member and the total size; an unsafe archive
    extracts nothing."""
    archive, target = Path(archive), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                _check_size(archive, target, _zip_members(zf))
                zf.extractall(target)
        else:
            with tarfile.open(archive) as tf:
                _check_size(archive, target, _tar_members(tf))
                if hasattr(tarfile, "data_filter"):
                    tf.extractall(target, filter="data")
                else:
                    tf.extractall(target)  # members checked above (Python without extraction filters)
    except UserError as exc:
        raise UserError(f"{archive.name}: {exc}") from None
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, UnicodeDecodeError) as exc:
        raise UserError(f"{archive.name} is not a readable archive ({exc})") from None
    return target
