"""Archive extraction: safe archives extract; an unsafe member refuses the whole archive before anything is written."""
import errno
import io
import random
import subprocess
import tarfile
import zipfile

import pytest

import archives
from errors import UserError


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MB tmpfs, unmounted after the test."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"no small tmpfs to fill (mount needs root): {mounted.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def random_bytes(size):
    """Incompressible: an honest archive of it is as large as its contents."""
    return random.Random(size).randbytes(size)


def zip_with(path, members, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def zip_with_links(path, links, files=None):
    """links: name -> target, then files: name -> bytes."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, target in links.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, target)
        for name, data in (files or {}).items():
            zf.writestr(name, data)
    return path


def tar_with(path, members):
    """members: name -> bytes, or ("symlink"|"hardlink", target); a list of such pairs may repeat a name."""
    with tarfile.open(path, "w:gz") as tf:
        for name, data in (members.items() if isinstance(members, dict) else members):
            info = tarfile.TarInfo(name)
            if isinstance(data, tuple):
                info.type = tarfile.SYMTYPE if data[0] == "symlink" else tarfile.LNKTYPE
                info.linkname = data[1]
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


MALICIOUS = {
    "zip ../": lambda d: zip_with(d / "a.zip", {"ok.txt": b"x", "../evil.txt": b"x"}),
    "zip absolute": lambda d: zip_with(d / "a.zip", {"/tmp/evil-abs-zip.txt": b"x"}),
    "zip symlink out": lambda d: zip_with_links(d / "a.zip", {"link": "../../etc/passwd"}),
    "tar ../": lambda d: tar_with(d / "a.tar.gz", {"ok.txt": b"x", "sub/../../evil.txt": b"x"}),
    "tar absolute": lambda d: tar_with(d / "a.tar.gz", {"/tmp/evil-abs-tar.txt": b"x"}),
    "tar symlink out": lambda d: tar_with(d / "a.tar.gz", {"link": ("symlink", "../../outside"),
                                                           "link/evil.txt": b"x"}),
    "tar absolute symlink": lambda d: tar_with(d / "a.tar.gz", {"link": ("symlink", "/etc")}),
    "tar hardlink out": lambda d: tar_with(d / "a.tar.gz", {"hard": ("hardlink", "../../etc/passwd")}),
    # each link below stays inside when checked alone; followed through each other, they lead out
    "tar symlink chain": lambda d: tar_with(d / "a.tar.gz", {"d/a": ("symlink", ".."), "d/a/b": ("symlink", ".."),
                                                             "d/a/b/evil.txt": b"x"}),
    "tar hardlink through a link": lambda d: tar_with(d / "a.tar.gz", {"d/up": ("symlink", ".."),
                                                                       "h": ("hardlink", "d/up/../evil.txt")}),
    "tar link redirected later": lambda d: tar_with(d / "a.tar.gz", [("d", ("symlink", "e/f")),
                                                                     ("a", ("symlink", "d/../..")),
                                                                     ("d", ("symlink", "h"))]),
    "tar loop of links": lambda d: tar_with(d / "a.tar.gz", {"a": ("symlink", "b"), "b": ("symlink", "a"),
                                                             "a/x": b"x"}),
    "zip symlink chain": lambda d: zip_with_links(d / "a.zip", {"d/a": "..", "d/a/b": ".."}, {"d/a/b/evil.txt": b"x"}),
}
REFUSED_MEMBER = {"tar symlink chain": "'d/a/b'", "tar hardlink through a link": "'h'",
                  "tar link redirected later": "'a'", "tar loop of links": "'a/x': a loop"}


@pytest.mark.parametrize("data_filter", [True, False], ids=["with tarfile's data filter", "without (Python 3.9)"])
@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_malicious_archives_are_refused(case, data_filter, tmp_path, monkeypatch):
    if not data_filter:  # the check must not lean on the filter, which Python 3.9 before 3.9.17 lacks
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    (tmp_path / "archives").mkdir()
    archive = MALICIOUS[case](tmp_path / "archives")
    target = tmp_path / "deep" / "cache" / "target"
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(UserError, match="refusing archive member") as refused:
        archives.extract_archive(archive, target)
    assert REFUSED_MEMBER.get(case, "") in str(refused.value)
    after = sorted(p for p in tmp_path.rglob("*") if p != target and target not in p.parents)
    assert [p for p in after if p not in before and p not in target.parents] == []
    assert not list(target.rglob("*"))
    assert not any(p.exists() for p in (tmp_path / "evil.txt", tmp_path / "deep" / "evil.txt"))
    for absolute in ("/tmp/evil-abs-zip.txt", "/tmp/evil-abs-tar.txt"):
        assert not __import__("os").path.exists(absolute)


def test_safe_archives_extract(tmp_path):
    zip_with(tmp_path / "ok.zip", {"data/x/a.txt": b"1", "data/y/b.txt": b"2"})
    tar_with(tmp_path / "ok.tar.gz", {"top/c.txt": b"3", "top/link": ("symlink", "c.txt"), "v2/": ("symlink", "top"),
                                      "v2/d.txt": b"4", "hard": ("hardlink", "v2/../top/c.txt")})
    assert (archives.extract_archive(tmp_path / "ok.zip", tmp_path / "z") / "data/y/b.txt").read_bytes() == b"2"
    out = archives.extract_archive(tmp_path / "ok.tar.gz", tmp_path / "t")
    assert (out / "top/c.txt").read_bytes() == b"3" and (out / "top/link").read_bytes() == b"3"
    assert (out / "top/d.txt").read_bytes() == b"4" and (out / "hard").read_bytes() == b"3"  # through links inside


def test_corrupt_archive_is_a_user_error(tmp_path):
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(UserError, match="not a readable archive"):
        archives.extract_archive(tmp_path / "bad.zip", tmp_path / "out")


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_bombs_are_refused_before_anything_is_written(kind, tmp_path):
    zeros = {"data/zeros.bin": bytes(archives.RATIO_FLOOR + (1 << 20))}  # compresses about 1000 times
    archive = zip_with(tmp_path / "a.zip", zeros, zipfile.ZIP_DEFLATED) if kind == "zip" else \
        tar_with(tmp_path / "a.tar.gz", zeros)
    with pytest.raises(UserError, match=f"a.{kind}: refusing an archive bomb: it expands to 17.8 MB, more than 200"):
        archives.extract_archive(archive, tmp_path / "out")
    assert not list((tmp_path / "out").rglob("*"))


def test_small_archives_may_compress_well(tmp_path):
    """Below RATIO_FLOOR any ratio passes: a few MB of text or blank images are no bomb."""
    archive = zip_with(tmp_path / "a.zip", {"blank.bin": bytes(2 << 20)}, zipfile.ZIP_DEFLATED)
    assert (archives.extract_archive(archive, tmp_path / "out") / "blank.bin").stat().st_size == 2 << 20


def test_an_archive_larger_than_the_free_disk_is_refused_before_writing(small_disk, tmp_path):
    archive = tar_with(tmp_path / "a.tar.gz", {"big.bin": random_bytes(3 << 20), "small.txt": b"x"})
    with pytest.raises(OSError, match="a.tar.gz expands to 3.1 MB, and only 2.1 MB are free") as full:
        archives.extract_archive(archive, small_disk / "out")
    assert full.value.errno == errno.ENOSPC and not list((small_disk / "out").rglob("*"))
