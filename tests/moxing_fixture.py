"""The `moxing_double` fixture: tests/fixtures/moxing_double importable as `moxing`, as Huawei's is inside ModelArts.

Import the fixture into a test module with `from moxing_fixture import moxing_double  # noqa: F401`.
"""
import json
import os
import sys
from pathlib import Path

import pytest
from conftest import free_port

DOUBLE = Path(__file__).resolve().parent / "fixtures" / "moxing_double"


class MoxingDouble:
    def __init__(self, root, log):
        self.root, self.log = root, log

    def calls(self, *names):
        """(call, args) of every call so far, or of those named, in order."""
        if not self.log.exists():
            return []
        records = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [(r["call"], tuple(r["args"])) for r in records if not names or r["call"] in names]


@pytest.fixture
def moxing_double(tmp_path, monkeypatch):
    """obs://BUCKET/... lives in the double's root folder. fsspec's S3 is pointed at a closed port and has no keys,
    so in a new process (train.py) any read or write that bypassed moxing would fail."""
    root, log = tmp_path / "moxing-root", tmp_path / "moxing-calls.jsonl"
    root.mkdir()
    monkeypatch.setenv("MOXING_DOUBLE_ROOT", str(root))
    monkeypatch.setenv("MOXING_DOUBLE_LOG", str(log))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(DOUBLE), os.environ.get("PYTHONPATH")])))
    for name in ("OBS_ENDPOINT", "S3_ENDPOINT", "AWS_ENDPOINT_URL"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{free_port()}")
    for name in ("OBS_ACCESS_KEY_ID", "OBS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.syspath_prepend(str(DOUBLE))
    yield MoxingDouble(root, log)
    for name in ("moxing", "moxing.file"):
        sys.modules.pop(name, None)
