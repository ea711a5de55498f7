"""What the cloud job installs: train/train_dir/pip-requirements.txt on the platform's MindSpore 2.2 / Python 3.9 image."""
import os
import re
import subprocess
import sys

import pytest
from conftest import TRAIN_DIR

REQUIREMENTS = TRAIN_DIR / "pip-requirements.txt"


def requirement_names():
    lines = [line.split("#")[0].strip() for line in REQUIREMENTS.read_text().splitlines()]
    return {re.split(r"[<>=!~\[; ]", line)[0].lower(): line for line in lines if line}


def test_never_pins_mindspore_and_keeps_numpy_below_2():
    names = requirement_names()
    assert "mindspore" not in names and not any(n.startswith("mindspore") for n in names)
    assert "<2" in names["numpy"]
    assert {"aim", "fsspec", "s3fs", "download", "tqdm", "matplotlib"} <= set(names)


@pytest.mark.network
@pytest.mark.skipif(os.environ.get("RUN_NETWORK_TESTS") != "1",
                    reason="asks PyPI (not loopback): run with RUN_NETWORK_TESTS=1, as `make check-cloud` does")
@pytest.mark.parametrize("platform", ["x86_64-manylinux_2_28", "aarch64-manylinux_2_28"])
def test_resolves_for_python_3_9(platform):
    """The toolchain notes' recipe: uv resolves for another Python version without that interpreter."""
    result = subprocess.run([sys.executable, "-m", "uv", "pip", "compile", str(REQUIREMENTS), "--python-version",
                             "3.9", "--python-platform", platform, "--no-header", "--quiet"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    resolved = dict(line.split("==") for line in result.stdout.splitlines() if "==" in line and not line.startswith(" "))
    assert resolved["aim"] == "3.29.1" and resolved["numpy"].startswith("1.")
    assert "mindspore" not in resolved
