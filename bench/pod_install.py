"""What the inference pod downloads and installs before the app starts: inference/requirements.txt now, against the
same file at an earlier commit, in one invocation (needs PyPI).

    .venv/bin/python bench/pod_install.py --before a061842       # the commit whose pod installed MindSpore
    .venv/bin/python bench/pod_install.py --python /path/to/python3.9

For each requirement file, in a fresh venv of the pod's Python (3.9): `pip download` into an empty folder (the
download: its size and time), then `pip install --no-index` from that folder (the install: its time and the size
it takes on disk). No pip cache is used, as on a new pod. Times depend on this machine's link to PyPI; the sizes
do not, and the ratios are taken within the same invocation.
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = "inference/requirements.txt"


def python_3_9():
    found = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python3.9")))
    return found[-1] if found else shutil.which("python3.9")


def folder_mb(path):
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and not p.is_symlink()) / 1e6


def timed(command):
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "PIP_NO_CACHE_DIR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(command[3:5])} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return time.monotonic() - start


def measure(python, requirements, work):
    venv, wheels = work / "venv", work / "wheels"
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--quiet"]
    download = timed([*pip, "download", "--only-binary", ":all:", "-d", str(wheels), "-r", str(requirements)])
    before = folder_mb(venv)
    install = timed([*pip, "install", "--no-index", "--find-links", str(wheels), "-r", str(requirements)])
    return {"download_mb": folder_mb(wheels), "download_s": download, "install_s": install,
            "installed_mb": folder_mb(venv) - before, "wheels": len(list(wheels.iterdir()))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="a commit whose inference/requirements.txt to compare with")
    parser.add_argument("--python", default=python_3_9(), help="the pod's Python (default: a Python 3.9 here)")
    args = parser.parse_args()
    if not args.python:
        sys.exit("error: no Python 3.9 found: pass --python")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old = tmp / "before.txt"
        old.write_text(subprocess.run(["git", "-C", str(ROOT), "show", f"{args.before}:{REQUIREMENTS}"], check=True,
                                      capture_output=True, text=True).stdout)
        rows = {}
        for name, requirements in ((f"before ({args.before})", old), ("now", ROOT / REQUIREMENTS)):
            print(f"measuring {name} ...", flush=True)
            (tmp / name).mkdir()
            rows[name] = measure(args.python, requirements, tmp / name)
    print(f"\n{REQUIREMENTS} on {subprocess.check_output([args.python, '-V'], text=True).strip()}, no pip cache")
    print(f"{'':<24}{'wheels':>8}{'download MB':>13}{'download s':>12}{'install s':>11}{'on disk MB':>12}")
    for name, row in rows.items():
        print(f"{name:<24}{row['wheels']:>8}{row['download_mb']:>13.0f}{row['download_s']:>12.1f}"
              f"{row['install_s']:>11.1f}{row['installed_mb']:>12.0f}")
    before, now = rows.values()
    print(f"ratio now/before: download {now['download_mb'] / before['download_mb']:.2f}x in size, "
          f"{now['download_s'] / before['download_s']:.2f}x in time; install {now['install_s'] / before['install_s']:.2f}x; "
          f"download + install {(now['download_s'] + now['install_s']) / (before['download_s'] + before['install_s']):.2f}x")


if __name__ == "__main__":
    main()
