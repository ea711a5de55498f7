"""Archive extraction: safe archives extract; an unsafe member refuses the whole archive before anything is written."""
import io
import tarfile
import zipfile

import pytest

import archives
from errors import UserError

def zip_with(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def zip_with_symlink(path, name, target):
    with zipfile.ZipFile(path, "w") as zf:
        info = zipfile.ZipInfo(name)
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, target)
    return path


def tar_with(path, members):
    """members: name -> bytes, or ("symlink"|"hardlink", target)."""
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
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
    "zip symlink out": lambda d: zip_with_symlink(d / "a.zip", "link", "../../etc/passwd"),
    "tar ../": lambda d: tar_with(d / "a.tar.gz", {"ok.txt": b"x", "sub/../../evil.txt": b"x"}),
    "tar absolute": lambda d: tar_with(d / "a.tar.gz", {"/tmp/evil-abs-tar.txt": b"x"}),
    "tar symlink out": lambda d: tar_with(d / "a.tar.gz", {"link": ("symlink", "../../outside"),
                                                           "link/evil.txt": b"x"}),
    "tar absolute symlink": lambda d: tar_with(d / "a.tar.gz", {"link": ("symlink", "/etc")}),
    "tar hardlink out": lambda d: tar_with(d / "a.tar.gz", {"hard": ("hardlink", "../../etc/passwd")}),
}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_malicious_archives_are_refused(case, tmp_path):
    (tmp_path / "archives").mkdir()
    archive = MALICIOUS[case](tmp_path / "archives")
    target = tmp_path / "deep" / "cache" / "target"
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(UserError, match="refusing archive member"):
        archives.extract_archive(archive, target)
    after = sorted(p for p in tmp_path.rglob("*") if p != target and target not in p.parents)
    assert [p for p in after if p not in before and p not in target.parents] == []
    assert not list(target.rglob("*"))
    assert not any(p.exists() for p in (tmp_path / "evil.txt", tmp_path / "deep" / "evil.txt"))
    for absolute in ("/tmp/evil-abs-zip.txt", "/tmp/evil-abs-tar.txt"):
        assert not __import__("os").path.exists(absolute)


def test_safe_archives_extract(tmp_path):
    zip_with(tmp_path / "ok.zip", {"data/x/a.txt": b"1", "data/y/b.txt": b"2"})
    tar_with(tmp_path / "ok.tar.gz", {"top/c.txt": b"3", "top/link": ("symlink", "c.txt")})
    assert (archives.extract_archive(tmp_path / "ok.zip", tmp_path / "z") / "data/y/b.txt").read_bytes() == b"2"
    out = archives.extract_archive(tmp_path / "ok.tar.gz", tmp_path / "t")
    assert (out / "top/c.txt").read_bytes() == b"3" and (out / "top/link").read_bytes() == b"3"


def test_corrupt_archive_is_a_user_error(tmp_path):
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(UserError, match="not a readable archive"):
        archives.extract_archive(tmp_path / "bad.zip", tmp_path / "out")
