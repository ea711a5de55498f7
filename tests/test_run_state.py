"""The output folder's one owner: where a run writes, what it pushes, and what `--resume auto` pulls back."""
from types import SimpleNamespace

import run_state
import runtime


def job_args(output_url, cache_dir, aim_repo=None, arch="resnet18"):
    return SimpleNamespace(output_url=str(output_url), aim_repo=aim_repo, cache_dir=str(cache_dir), arch=arch,
                           io_timeout=10.0)


def test_names_of_the_output_files(tmp_path):
    files = run_state.RunFiles(tmp_path, "resnet50")
    assert (files.best_checkpoint.name, files.last_checkpoint.name, files.best_mindir.name) == \
        ("resnet50-best.ckpt", "resnet50-last.ckpt", "resnet50-best.mindir")
    assert {files.labels.name, files.metrics.name, files.resume.name} == \
        {run_state.LABELS, run_state.METRICS, run_state.RESUME}
    assert all(path.parent == tmp_path for path in (files.labels, files.curves, files.examples, files.train_samples))


def test_the_aim_repo_lives_in_the_output_folder_unless_given(tmp_path):
    outputs = run_state.Outputs(job_args(tmp_path / "out", tmp_path / "cache"), runtime.Workers())
    assert outputs.aim_repo == outputs.files.folder == tmp_path / "out" and outputs.aim_mirror is None
    server = run_state.Outputs(job_args(tmp_path / "out-too", tmp_path / "cache", "aim://127.0.0.1:53800"),
                               runtime.Workers())
    assert server.aim_repo == "aim://127.0.0.1:53800"
    other_rank = run_state.Outputs(job_args(tmp_path / "out2", tmp_path / "cache"), runtime.Workers(1, 2, 1))
    assert other_rank.aim_repo is None and other_rank.files.folder == tmp_path / "cache" / "rank-1"
    assert not (tmp_path / "out2").exists()


def test_resume_auto_on_a_fresh_disk_pulls_the_state_and_the_aim_repo_from_the_bucket(bucket, tmp_path):
    url = f"s3://{bucket}/job/output"
    first = run_state.Outputs(job_args(url, tmp_path / "first-machine"), runtime.Workers())
    files = first.files
    wanted = {files.resume: b"state", files.metrics: b"[]", files.best_checkpoint: b"best",
              files.folder / ".aim" / "run_metadata.sqlite": b"aim", files.folder / ".aim" / "seqs" / "chunk": b"s"}
    unwanted = {files.last_checkpoint: b"last", files.curves: b"png"}
    for path, data in {**wanted, **unwanted}.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    first.push()

    restarted = run_state.Outputs(job_args(url, tmp_path / "second-machine"), runtime.Workers())
    assert not restarted.files.resume.exists()
    restarted.pull_for_resume()
    for path, data in wanted.items():
        assert (restarted.files.folder / path.relative_to(files.folder)).read_bytes() == data
    for path in unwanted:  # only what resuming needs comes back down
        assert not (restarted.files.folder / path.relative_to(files.folder)).exists()
    assert restarted.mirror.push() == 0  # pulled files are not pushed back unchanged
