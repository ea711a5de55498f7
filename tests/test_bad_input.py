"""The bad-input catalogue: each mistake ends with one `error:` line, a non-zero exit, no traceback, and existing
outputs untouched. Training's command line, data, checkpoints, archives and URLs; job configs (train/run_job.py);
the inference app's model files and its uploads."""
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from conftest import ROOT, assert_fails_cleanly, run_train, snapshot

from make_demo_data import make_split, write_cifar, write_imagefolder
from resnet import create_model


@pytest.fixture
def out(tmp_path):
    """An output folder holding a previous run's file, which a failed run must leave alone."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "metrics.json").write_text('[{"epoch": 1}]\n')
    return folder


def cifar(tmp_path):
    return write_cifar(tmp_path / "cifar", make_split(40, 2, 0), make_split(10, 2, 1), ["a", "b"])


def truncated_cifar(tmp_path):
    folder = cifar(tmp_path)
    batch = folder / "test_batch.bin"
    batch.write_bytes(batch.read_bytes()[:5000])
    return folder


def mismatched_classes(tmp_path):
    root = tmp_path / "canidae"
    write_imagefolder(root, {"train": make_split(8, 2, 0)}, ["dogs", "wolves"])
    write_imagefolder(root, {"val": make_split(4, 2, 1)}, ["cats", "dogs"])
    return root


def not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.ckpt"
    path.write_text("<html>404 Not Found</html>")
    return path


def resnet18_checkpoint(tmp_path):
    path = tmp_path / "resnet18.ckpt"
    ms.save_checkpoint(create_model("resnet18", 2), str(path))
    return path


def foreign_checkpoint(tmp_path):
    path = tmp_path / "vgg16.ckpt"
    ms.save_checkpoint([{"name": "features.0.weight", "data": ms.Tensor(np.zeros((4, 3, 3, 3), np.float32))}],
                       str(path))
    return path


def corrupt_zip(tmp_path):
    path = tmp_path / "cifar.zip"
    path.write_bytes(b"PK\x03\x04 a download cut short")
    return path


def cifar_tarball(tmp_path):
    import tarfile
    folder = cifar(tmp_path)
    with tarfile.open(tmp_path / "cifar.tgz", "w:gz") as tf:
        tf.add(folder, arcname="cifar-10-batches-bin")
    return tmp_path / "cifar.tgz"


def unrecognised(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "readme.txt").write_text("no images here")
    return tmp_path / "stuff"


def empty(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


CASES = {
    # name: (argv builder (tmp_path, out) -> list, what the error line must mention)
    "no data_url": (lambda t, o: ["--output_url", o], "--data_url"),
    "missing data_url": (lambda t, o: ["--data_url", t / "nope", "--output_url", o], "does not exist"),
    "empty data folder": (lambda t, o: ["--data_url", empty(t), "--output_url", o], "no dataset found"),
    "unrecognised data folder": (lambda t, o: ["--data_url", unrecognised(t), "--output_url", o], "no dataset found"),
    "truncated CIFAR file": (lambda t, o: ["--data_url", truncated_cifar(t), "--output_url", o], "test_batch.bin"),
    "train/val class mismatch": (lambda t, o: ["--data_url", mismatched_classes(t), "--output_url", o],
                                 "classes differ"),
    "missing pretrain file": (lambda t, o: ["--data_url", cifar(t), "--output_url", o,
                                            "--pretrain_url", t / "missing.ckpt"], "missing.ckpt does not exist"),
    "pretrain is not a checkpoint": (lambda t, o: ["--data_url", cifar(t), "--output_url", o,
                                                   "--pretrain_url", not_a_checkpoint(t)], "not a readable"),
    "checkpoint of another arch": (lambda t, o: ["--data_url", cifar(t), "--output_url", o,
                                                 "--pretrain_url", resnet18_checkpoint(t)], "does not fit"),
    "non-numeric hyperparameter": (lambda t, o: ["--data_url", cifar(t), "--output_url", o, "--lr", "fast"],
                                   "--lr"),
    "output folder cannot be written": (lambda t, o: ["--data_url", cifar(t), "--output_url",
                                                      o / "metrics.json" / "sub"], "cannot be written"),
    "batch larger than the data": (lambda t, o: ["--data_url", cifar(t), "--output_url", o, "--batch_size", 64],
                                   "fewer than --batch_size"),
    "cache folder cannot be written": (lambda t, o: ["--data_url", cifar_tarball(t), "--output_url", o,
                                                     "--cache_dir", o / "metrics.json" / "cache"],
                                       "cache folder"),
    "unknown layer to train": (lambda t, o: ["--data_url", cifar(t), "--output_url", o, "--trainable", "layer9"],
                               "--trainable"),
    "--freeze with --trainable": (lambda t, o: ["--data_url", cifar(t), "--output_url", o, "--freeze",
                                                "--trainable", "layer4,fc"], "for partial fine-tuning"),
    "checkpoint of no ResNet family": (lambda t, o: ["--data_url", cifar(t), "--output_url", o,
                                                     "--pretrain_url", foreign_checkpoint(t)], "known family"),
    "resume from a plain checkpoint": (lambda t, o: ["--data_url", cifar(t), "--output_url", o, "--arch", "resnet18",
                                                     "--resume", resnet18_checkpoint(t)], "not a resume state"),
    "corrupt archive": (lambda t, o: ["--data_url", corrupt_zip(t), "--output_url", o, "--cache_dir", t / "cache"],
                        "not a readable archive"),
    "unreachable URL": (lambda t, o: ["--data_url", "http://127.0.0.1:9/cifar-10-binary.tar.gz", "--output_url", o,
                                      "--cache_dir", t / "cache"], "could not download"),
    "unavailable device": (lambda t, o: ["--data_url", cifar(t), "--output_url", o, "--device_target", "GPU"],
                           "GPU is not available"),
    "mixed precision on CPU": (lambda t, o: ["--data_url", cifar(t), "--output_url", o, "--amp_level", "O2"],
                               "--amp_level O2 needs GPU or Ascend"),
    "mixup on cached features": (lambda t, o: ["--data_url", cifar(t), "--output_url", o, "--freeze",
                                               "--mixup", "0.2"], "computes the backbone's features once"),
    "a recipe's augmentation on cached features": (lambda t, o: ["--data_url", cifar(t), "--output_url", o,
                                                                 "--freeze", "--recipe=finetune"],
                                                   "(set by --recipe finetune)"),
    "weight average on cached features": (lambda t, o: ["--data_url", cifar(t), "--output_url", o, "--freeze",
                                                        "--ema", "0.99"], "--ema averages the whole network"),
    "unknown recipe": (lambda t, o: ["--data_url", cifar(t), "--output_url", o, "--recipe", "imagenet"],
                       "--recipe"),
    "label smoothing of 1 or more": (lambda t, o: ["--data_url", cifar(t), "--output_url", o,
                                                   "--label_smoothing", "1.5"], "--label_smoothing"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_cleanly(case, tmp_path, out):
    build_argv, needle = CASES[case]
    before = snapshot(out)
    result = run_train(*build_argv(tmp_path, out), "--image_size", 32, "--epochs", 1, timeout=300)
    assert_fails_cleanly(result, needle)
    assert snapshot(out) == before


# ---------------------------------------------------------------- job configs and the inference app

RUN_JOB = ROOT / "train" / "run_job.py"
APP = ROOT / "inference" / "app.py"


def config_file(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_text(text)
    return path


def untrained_model(tmp_path, labels=True):
    import export
    net = create_model("resnet18", 3)
    export.save_checkpoint(net, tmp_path / "resnet18-best.ckpt")
    if labels:
        export.write_labels(tmp_path / "labels.json", ["a", "b", "c"], 32, (0, 0, 0), (1, 1, 1), "resnet18", "x",
                            "cifar10-bin")
    return tmp_path / "resnet18-best.ckpt"


def garbled_model(tmp_path):
    """A model file cut short in transfer, with its labels.json."""
    path = untrained_model(tmp_path)
    path.write_bytes(path.read_bytes()[:1000])
    return path


def garbled_onnx(tmp_path):
    """An ONNX export cut short in transfer, with its labels.json."""
    import export
    untrained_model(tmp_path)
    path = tmp_path / "resnet18-best.onnx"
    export.export_graph(create_model("resnet18", 3), 32, path)
    path.write_bytes(path.read_bytes()[:5000])
    return path


OTHER_CASES = {
    "config that is not JSON": (lambda t: [RUN_JOB, config_file(t, "{ not json")], "must be plain JSON"),
    "config with // comments": (lambda t: [RUN_JOB, config_file(t, '{\n  // the job\n  "SDK": "ModelArts"\n}')],
                                "comments are not JSON"),
    "config missing its fields": (lambda t: [RUN_JOB, config_file(t, '{"SDK": "ModelArts"}')], "missing field"),
    "app: model file missing": (lambda t: [APP, "--model", t / "nothing.ckpt"], "does not exist"),
    "app: model without labels.json": (lambda t: [APP, "--model", untrained_model(t, labels=False)],
                                       "labels.json is missing"),
    "app: not a checkpoint": (lambda t: [APP, "--model", garbled_model(t)], "not a readable"),
    "app: an ONNX file cut short": (lambda t: [APP, "--model", garbled_onnx(t)], "not an ONNX model onnxruntime"),
}


@pytest.mark.parametrize("case", sorted(OTHER_CASES))
def test_bad_job_config_or_model_fails_cleanly(case, tmp_path, out):
    build_argv, needle = OTHER_CASES[case]
    before = snapshot(out)
    result = subprocess.run([sys.executable, *map(str, build_argv(tmp_path))], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert_fails_cleanly(result, needle)
    assert snapshot(out) == before


@pytest.mark.parametrize("message", ["not an image", "corrupt or truncated", "too large"])
def test_bad_upload_gets_its_message_and_the_model_keeps_serving(message, tmp_path):
    """Uploads have no exit code: the app shows the message and keeps answering (tests/test_inference.py checks
    that through the running server); here the predictor's answer to each, then a good image."""
    sys.path.insert(0, str(ROOT / "inference"))
    from predictor import BadImage, Predictor
    from test_inference import bad_uploads, shape_image
    model = Predictor.load(untrained_model(tmp_path))
    with pytest.raises(BadImage, match=message):
        model.predict([bad_uploads(tmp_path)[message]])
    good = tmp_path / "good.png"
    shape_image(np.random.default_rng(0), 1, 48).save(good)
    assert len(model.predict([good], top_k=3)[0]) == 3
