"""Walking a data folder safely: breadth first and sorted, hidden folders skipped, every symlinked folder followed
at most once (a link to `.` or `..` ends no walk), and folders that hold a training job's outputs left out, so a job
never reads its own or an earlier run's outputs back as training images."""
import os
import sys
from pathlib import Path

from run_state import AIM_FOLDER, LABELS, METRICS

NAMED = 5  # skipped files and links named in a warning; the rest are counted


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


class Walker:
    """Folders below a root, breadth first and sorted (a deterministic choice), hidden ones skipped. A symlinked
    folder is followed once per real folder and never back into one already searched or one above the root, so a
    link to `.` or `..` ends no walk; folders holding a training job's outputs (and `exclude`) are skipped."""

    def __init__(self, exclude=()):
        self.exclude = {os.path.realpath(p) for p in exclude if p}
        self.loops, self.outputs = [], []

    def walk(self, root, note_outputs=True):
        """(folder, subfolder names, file names), like os.walk; `note_outputs`: report output folders skipped."""
        for folder, _, dirs, files in self._walk(root, note_outputs):
            yield folder, dirs, [entry.name for entry in files]

    def _walk(self, root, note_outputs):
        """(folder, its real path, subfolder names, file entries): each real path is known from the folder's own
        without a system call, unless a link is on the way."""
        real_root = os.path.realpath(root)
        seen = {real_root, *map(str, Path(real_root).parents)}
        level = [(Path(root), real_root)]
        while level:
            next_level = []
            for folder, real in level:
                try:
                    entries = sorted(os.scandir(folder), key=lambda e: e.name)
                except OSError:
                    continue
                dirs = [(e, self._real(e, real)) for e in entries if not e.name.startswith(".") and e.is_dir()]
                dirs = [(e, r) for e, r in dirs if self._follow(Path(e.path), r, seen, note_outputs)]
                yield folder, real, [e.name for e, _ in dirs], [e for e in entries if e.is_file()]
                next_level += [(folder / e.name, r) for e, r in dirs]
            level = next_level

    @staticmethod
    def _real(entry, parent_real):
        return os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(parent_real, entry.name)

    def _follow(self, path, real, seen, note_outputs):
        if real in seen:
            self.loops.append(f"{path} -> {os.readlink(path) if path.is_symlink() else real}")
            return False
        seen.add(real)
        if real in self.exclude:
            return False
        if holds_outputs(path):
            if note_outputs:
                self.outputs.append(path)
            return False
        return True

    def files(self, root, extensions, real=False):
        """Every file below `root` (root included) whose name ends with one of `extensions`, sorted; with `real`,
        (path, real path) pairs (what a link leads to: the same file reached twice has one real path)."""
        return [(folder / e.name, self._real(e, real_folder)) if real else folder / e.name
                for folder, real_folder, _, entries in self._walk(root, True) for e in entries
                if e.name.lower().endswith(extensions) and not e.name.startswith(".")]

    def report(self, log=warn):
        """One warning for the links not followed, one for the output folders skipped."""
        if self.loops:
            log(f"not following {len(self.loops)} symlink(s) that lead back to a folder already searched or to one "
                f"that holds it (a loop): {named(self.loops)}")
        if self.outputs:
            log(f"ignoring {len(self.outputs)} folder(s) in the data that hold a training job's outputs "
                f"({LABELS} with checkpoints or {METRICS}, or an Aim repo), not images to train on: "
                f"{named(self.outputs)}")


def holds_outputs(folder):
    """Whether `folder` holds what a training job writes: labels.json beside checkpoints or metrics, or an Aim
    repo. (A dataset may ship a labels.json of its own, so that alone does not count.)"""
    labels = (folder / LABELS).is_file() and ((folder / METRICS).is_file() or any(folder.glob("*.ckpt")))
    return labels or (folder / AIM_FOLDER).is_dir()


def named(items):
    return ", ".join(map(str, items[:NAMED])) + (f" and {len(items) - NAMED} more" if len(items) > NAMED else "")
