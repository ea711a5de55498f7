"""Whole jobs whose data, weights and outputs live elsewhere: moto S3 (s3:// and obs://) and http.server archives."""
import json
import tarfile
import zipfile

import mindspore as ms
import pytest
from conftest import S3_KEYS, assert_fails_cleanly, run_train

import storage
from make_demo_data import make_split, write_cifar, write_imagefolder
from resnet import create_model

pytestmark = pytest.mark.slow
QUICK = ["--arch", "resnet18", "--image_size", 32, "--epochs", 2, "--batch_size", 16, "--lr", 0.01]
OUTPUTS = {"resnet18-best.ckpt", "resnet18-last.ckpt", "resnet18-best.mindir", "labels.json", "metrics.json",
           "curves.png"}


@pytest.fixture(scope="module")
def pretrained(module_tmp):
    path = module_tmp / "resnet18_imagenet.ckpt"
    ms.set_seed(0)
    ms.save_checkpoint(create_model("resnet18", 1000), str(path))
    return path


def names_in(url):
    fs, path = storage.filesystem(url)
    fs.invalidate_cache()
    return {entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)}


def assert_clean(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_job_reads_and_writes_buckets(bucket, pretrained, tmp_path):
    """Data and weights from obs://, outputs to s3:// and the Aim repo to obs:// (one loopback S3 endpoint serves
    both), then resumed on a fresh machine from both: the job reads and writes each scheme."""
    cifar = write_cifar(tmp_path / "cifar-10-batches-bin", make_split(64, 2, 0), make_split(24, 2, 1), ["cat", "dog"])
    store = storage.FsspecStorage()
    store.copy_parallel(cifar, f"obs://{bucket}/datasets/cifar-10-batches-bin")
    store.copy(pretrained, f"obs://{bucket}/models/resnet18_imagenet.ckpt")
    result = run_train("--data_url", f"obs://{bucket}/datasets/", "--cache_dir", tmp_path / "cache",
                       "--pretrain_url", f"obs://{bucket}/models/resnet18_imagenet.ckpt",
                       "--output_path", f"s3://{bucket}/output/", "--aim_repo", f"obs://{bucket}/aim/",
                       *QUICK)
    assert_clean(result)
    assert "pretrained: loaded" in result.stdout and "head re-initialised" in result.stdout
    assert names_in(f"s3://{bucket}/output") >= OUTPUTS
    assert ".aim" in names_in(f"obs://{bucket}/aim")
    assert store.exists(f"obs://{bucket}/aim/.aim/run_metadata.sqlite")
    store.copy(f"s3://{bucket}/output/metrics.json", tmp_path / "metrics.json")
    assert [r["epoch"] for r in json.loads((tmp_path / "metrics.json").read_text())] == [1, 2]
    assert result.stdout.count("synced") >= 3  # after each epoch and at the end

    # Restarted on a fresh machine (an empty cache), --resume auto continues from the bucket's copy, in the same run.
    resumed = run_train("--data_url", f"obs://{bucket}/datasets/", "--cache_dir", tmp_path / "fresh-cache",
                        "--output_path", f"s3://{bucket}/output/", "--aim_repo", f"obs://{bucket}/aim/",
                        "--resume", "auto", *QUICK, "--epochs", 3)
    assert_clean(resumed)
    assert "resume: continuing after epoch 2 of 3" in resumed.stdout
    (staged,) = [p.parent for p in (tmp_path / "fresh-cache" / "outputs").glob("*/metrics.json")]
    assert {"resume.ckpt", "resnet18-best.ckpt", "resnet18-best.mindir"} <= {p.name for p in staged.iterdir()}
    store.copy(f"s3://{bucket}/output/metrics.json", tmp_path / "metrics.json")
    assert [r["epoch"] for r in json.loads((tmp_path / "metrics.json").read_text())] == [1, 2, 3]

    # A new run from a fresh machine into the same bucket folder, neither resuming nor --overwrite: refused, as for a
    # local folder, with the bucket untouched.
    before = (tmp_path / "metrics.json").read_bytes()  # copied from the bucket above
    again = run_train("--data_url", f"obs://{bucket}/datasets/", "--cache_dir", tmp_path / "third-cache",
                      "--output_path", f"s3://{bucket}/output/", *QUICK)
    assert_fails_cleanly(again, "holds another run's outputs (labels.json, metrics.json, resume.ckpt")
    store.copy(f"s3://{bucket}/output/metrics.json", tmp_path / "metrics-after.json")
    assert (tmp_path / "metrics-after.json").read_bytes() == before

    # The bucket's copy of the Aim repo is a working repo: it lists the job's run.
    store.copy_parallel(f"obs://{bucket}/aim", tmp_path / "aim-copy")
    from aim import Repo
    assert len(Repo(str(tmp_path / "aim-copy")).list_all_runs()) == 1

    # Keys never leak into logs or outputs.
    secret = S3_KEYS["AWS_SECRET_ACCESS_KEY"].encode()
    assert secret not in (result.stdout + result.stderr).encode()
    assert not [p for p in (tmp_path / "aim-copy").rglob("*") if p.is_file() and secret in p.read_bytes()]


def test_job_stores_everything_through_moxing_when_importable(moxing_double, tmp_path):
    """Inside ModelArts: data staged in, outputs pushed and resume state pulled back all go through moxing.file
    (the double, over a local folder); fsspec has no endpoint that works, so it cannot have been used."""
    bucket = moxing_double.root / "bucket"
    write_cifar(bucket / "data" / "cifar-10-batches-bin", make_split(32, 2, 0), make_split(12, 2, 1), ["cat", "dog"])
    job = ["--data_url", "obs://bucket/data/", "--output_url", "obs://bucket/out", *QUICK]
    first = run_train(*job, "--cache_dir", tmp_path / "cache", "--epochs", 1)
    assert_clean(first)
    assert OUTPUTS | {"resume.ckpt", ".aim"} <= {p.name for p in (bucket / "out").iterdir()}
    calls = moxing_double.calls("copy", "copy_parallel")
    assert calls[0][0] == "copy_parallel" and calls[0][1][0] == "obs://bucket/data/"
    pushed = {args[1].removeprefix("obs://bucket/out/") for call, args in calls[1:] if call == "copy"}
    assert OUTPUTS | {"resume.ckpt", ".aim/run_metadata.sqlite"} <= pushed
    assert all(args[1].startswith("obs://bucket/out/") for _, args in calls[1:])

    moxing_double.log.unlink()  # restarted on a fresh machine: an empty cache, everything comes from the bucket
    resumed = run_train(*job, "--cache_dir", tmp_path / "fresh-cache", "--resume", "auto", "--epochs", 2)
    assert_clean(resumed)
    assert "resume: continuing after epoch 1 of 2" in resumed.stdout
    local = tmp_path / "fresh-cache" / "outputs"
    pulls = [(call, args[0]) for call, args in moxing_double.calls("copy", "copy_parallel")
             if args[1].startswith(str(local))]
    assert {("copy", f"obs://bucket/out/{name}") for name in ("resume.ckpt", "metrics.json", "resnet18-best.ckpt")} \
        | {("copy_parallel", "obs://bucket/out/.aim")} <= set(pulls)
    assert [r["epoch"] for r in json.loads((bucket / "out" / "metrics.json").read_text())] == [1, 2]


def test_job_trains_from_a_canidae_style_zip_over_http(http_server, tmp_path):
    base, root = http_server
    layout = write_imagefolder(tmp_path / "src" / "data" / "Canidae",
                               {"train": make_split(48, 2, 0, side=40), "val": make_split(16, 2, 1, side=40)},
                               ["dogs", "wolves"])
    for png in layout.rglob("*.png"):  # the published archive holds ImageNet JPEGs
        from PIL import Image
        Image.open(png).convert("RGB").save(png.with_suffix(".JPEG"), "JPEG")
        png.unlink()
    with zipfile.ZipFile(root / "Canidae_data.zip", "w") as zf:
        for path in sorted((tmp_path / "src").rglob("*")):
            zf.write(path, path.relative_to(tmp_path / "src").as_posix())
    out = tmp_path / "out"
    result = run_train("--data_url", f"{base}/Canidae_data.zip", "--output_url", out,
                       "--cache_dir", tmp_path / "cache", *QUICK)
    assert_clean(result)
    assert "imagefolder" in result.stdout and "48 train / 16 val" in result.stdout
    assert json.loads((out / "labels.json").read_text())["class_names"] == ["dogs", "wolves"]
    assert OUTPUTS <= {p.name for p in out.iterdir()}


def test_job_trains_from_a_cifar_tarball_and_pretrained_weights_over_http(http_server, pretrained, tmp_path):
    base, root = http_server
    cifar = write_cifar(tmp_path / "cifar-10-batches-bin", make_split(64, 2, 0), make_split(24, 2, 1), ["cat", "dog"])
    with tarfile.open(root / "cifar-10-binary.tar.gz", "w:gz") as tf:
        tf.add(cifar, arcname="cifar-10-batches-bin")
    (root / "resnet18_imagenet.ckpt").write_bytes(pretrained.read_bytes())
    out = tmp_path / "out"
    result = run_train("--data_url", f"{base}/cifar-10-binary.tar.gz", "--output_url", out,
                       "--pretrain_url", f"{base}/resnet18_imagenet.ckpt", "--cache_dir", tmp_path / "cache", *QUICK)
    assert_clean(result)
    assert "cifar10-bin" in result.stdout and "pretrained: loaded" in result.stdout
    assert OUTPUTS <= {p.name for p in out.iterdir()}
