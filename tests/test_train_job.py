"""The whole job, run as `python train.py ...`: it learns, writes every output, and logs a readable Aim run."""
import re
import subprocess

import mindspore as ms
import numpy as np
import pytest
from conftest import ROOT, TRAINED, predictions, read_json, run_train

import datasets
import train_step
from resnet import create_model
from run_state import AIM_FOLDER, RunFiles
from tutorial_resnet import TutorialResNet50

pytestmark = pytest.mark.slow
STEPS = TRAINED["train"] // TRAINED["batch_size"]


def evaluate(net, data):
    """Accuracy of `net` over a val pipeline, computed here rather than by the training code."""
    net.set_train(False)
    correct = total = 0
    for images, labels in data.create_tuple_iterator(output_numpy=True):
        correct += int((net(ms.Tensor(images)).asnumpy().argmax(1) == labels).sum())
        total += len(labels)
    return correct / total


@pytest.fixture(scope="module")
def aim_run(trained):
    from aim import Repo
    from aim.sdk.index_manager import RepoIndexManager
    repo = Repo(str(trained["out"]))
    hashes = repo.list_all_runs()
    for run_hash in hashes:
        RepoIndexManager.get_index_manager(repo).index(run_hash)
    return hashes, repo.get_run(hashes[0])


def test_every_output_is_written(trained):
    out, files = trained["out"], trained["files"]
    for path in (files.best_checkpoint, files.last_checkpoint, files.best_mindir, files.best_onnx, files.labels,
                 files.metrics):
        assert path.stat().st_size > 0, path
    for picture in (files.curves, files.train_samples, files.val_predictions):
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", picture
    assert (out / AIM_FOLDER).is_dir()
    assert not list(out.glob(".*partial*")), "temporary files left behind"


def test_the_onnx_export_was_checked_and_agrees_with_the_checkpoint(trained):
    """onnxruntime on the exported graph against the best checkpoint in MindSpore, on validation images."""
    import mindspore as ms
    import onnxruntime
    from resnet import create_model
    assert re.search(r"export: resnet50-best.onnx agrees with the model on 16 validation images \(largest "
                     r"difference \S+, tolerance 0.0001\)", trained["result"].stdout)
    net = create_model("resnet50", TRAINED["classes"])
    ms.load_param_into_net(net, ms.load_checkpoint(str(trained["files"].best_checkpoint)))
    net.set_train(False)
    _, inputs, _ = datasets.preview_batch(datasets.find_data(trained["data"]), "val", 32, 40)
    session = onnxruntime.InferenceSession(str(trained["files"].best_onnx), providers=["CPUExecutionProvider"])
    ours = np.concatenate([session.run(None, {session.get_inputs()[0].name: x[None]})[0] for x in inputs])
    theirs = net(ms.Tensor(inputs)).asnumpy()
    assert (ours.argmax(1) == theirs.argmax(1)).all()
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=1e-4)


def test_labels_json_describes_the_model(trained):
    labels = read_json(trained["files"].labels)
    assert labels["class_names"] == ["red_circle", "blue_square", "red_square", "blue_circle"]
    assert (labels["image_size"], labels["arch"]) == (32, "resnet50")
    assert labels["mean"] == pytest.approx(datasets.IMAGENET_MEAN)
    assert labels["std"] == pytest.approx(datasets.IMAGENET_STD)


def test_metrics_json_has_one_entry_per_epoch(trained):
    history = read_json(trained["files"].metrics)
    assert [r["epoch"] for r in history] == list(range(1, TRAINED["epochs"] + 1))
    for r in history:
        assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds", "images_per_second"} <= set(r)
        assert np.isfinite([r["train_loss"], r["val_loss"]]).all() and 0 <= r["val_accuracy"] <= 1
        # seconds is the whole epoch; images_per_second counts only the training steps
        step_seconds = STEPS * TRAINED["batch_size"] / r["images_per_second"]
        assert 0 < step_seconds < r["seconds"]


def test_the_network_learns(trained):
    history = read_json(trained["files"].metrics)
    chance = 1 / TRAINED["classes"]
    assert max(r["val_accuracy"] for r in history) >= chance + 0.2, history
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_best_checkpoint_scores_what_metrics_json_says(trained):
    history = read_json(trained["files"].metrics)
    net = create_model("resnet50", TRAINED["classes"])
    ms.load_param_into_net(net, ms.load_checkpoint(str(trained["files"].best_checkpoint)))
    val = datasets.create_dataset(datasets.find_data(trained["data"]), "val", 32, batch_size=50)
    assert evaluate(net, val) == pytest.approx(max(r["val_accuracy"] for r in history), abs=1e-6)


def test_macro_f1_is_that_of_the_last_weights_on_the_val_split(trained, aim_run):
    """Recomputed here from the last checkpoint's predictions, with F1 = 2PR / (P + R) per class."""
    from aim.storage.context import Context
    truth, predicted = predictions(trained["files"].last_checkpoint, trained["data"])
    scores = []
    for label in set(truth) | set(predicted):
        right = ((truth == label) & (predicted == label)).sum()
        precision = right / max(1, (predicted == label).sum())
        recall = right / max(1, (truth == label).sum())
        scores.append(0.0 if right == 0 else 2 * precision * recall / (precision + recall))
    history = read_json(trained["files"].metrics)
    assert history[-1]["val_macro_f1"] == pytest.approx(np.mean(scores), abs=1e-6)
    _, run = aim_run
    tracked = run.get_metric("macro_f1", Context({"subset": "val"})).dataframe()
    assert tracked["value"].tolist() == pytest.approx([r["val_macro_f1"] for r in history])


def test_mindir_export_predicts_like_the_checkpoint(trained):
    net = create_model("resnet50", TRAINED["classes"])
    ms.load_param_into_net(net, ms.load_checkpoint(str(trained["files"].best_checkpoint)))
    net.set_train(False)
    graph = ms.nn.GraphCell(ms.load(str(trained["files"].best_mindir)))
    image = ms.Tensor(np.random.default_rng(0).normal(size=(1, 3, 32, 32)).astype(np.float32))
    np.testing.assert_allclose(graph(image).asnumpy(), net(image).asnumpy(), rtol=1e-4, atol=1e-4)


def test_console_prints_one_line_per_epoch(trained):
    out = trained["result"].stdout
    lines = [line for line in out.splitlines() if line.startswith("epoch ") and "val_accuracy" in line]
    assert len(lines) == TRAINED["epochs"]
    assert all("train_loss" in line and "img/s" in line for line in lines)
    assert f"aim up --repo {trained['out']}" in out
    assert "on CPU (fp32 (amp O0), loss scale off, dataset sink off)" in out  # the configuration it chose
    assert "Traceback" not in trained["result"].stderr


def test_aim_run_reads_back_with_names_contexts_and_steps(trained, aim_run):
    hashes, run = aim_run
    assert len(hashes) == 1 and run.experiment == "pytest"
    hparams = run["hparams"]
    assert (hparams["epochs"], hparams["batch_size"], hparams["lr"], hparams["arch"]) == (5, 32, 0.01, "resnet50")
    assert hparams["train_size"] == TRAINED["train"] and hparams["device"] == "CPU"
    assert hparams["class_names"] == ["red_circle", "blue_square", "red_square", "blue_circle"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert hparams["mindspore"] == ms.__version__ and hparams["git_commit"] == head

    def series(name, subset):
        from aim.storage.context import Context
        metric = run.get_metric(name, Context({"subset": subset}))
        assert metric is not None, (name, subset)
        return metric.dataframe()

    total_steps = STEPS * TRAINED["epochs"]
    for name in ("loss", "lr"):
        assert series(name, "train")["step"].tolist() == list(range(1, total_steps + 1))
    lr = series("lr", "train")["value"].to_numpy()
    np.testing.assert_allclose(lr, train_step.cosine_lr(0.01, TRAINED["epochs"], STEPS, 1), rtol=1e-6)
    epochs = list(range(1, TRAINED["epochs"] + 1))
    for name, subset in (("epoch_loss", "train"), ("accuracy", "train"), ("loss", "val"), ("accuracy", "val")):
        assert series(name, subset)["step"].tolist() == epochs
    history = read_json(trained["files"].metrics)
    np.testing.assert_allclose(series("accuracy", "val")["value"], [r["val_accuracy"] for r in history])
    np.testing.assert_allclose(series("accuracy", "train")["value"], [r["train_accuracy"] for r in history])
    np.testing.assert_allclose(series("epoch_loss", "train")["value"], [r["train_loss"] for r in history], rtol=1e-6)


def test_freeze_keeps_the_pretrained_backbone_bit_identical(small_data, tmp_path):
    ms.set_seed(0)
    pretrained = tmp_path / "tutorial.ckpt"
    ms.save_checkpoint(TutorialResNet50(num_classes=1000), str(pretrained))
    out = tmp_path / "out"
    result = run_train("--data_url", small_data[0], "--output_url", out, "--pretrain_url", pretrained,
                       "--freeze=true", "--image_size", 32, "--epochs", 2, "--batch_size", 16, "--lr", 0.05)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "head re-initialised" in result.stdout
    before = ms.load_checkpoint(str(pretrained))
    after = ms.load_checkpoint(str(RunFiles(out, "resnet50").last_checkpoint))
    backbone = [name for name in before if not name.startswith("fc.")]
    assert backbone and all(name in after for name in backbone)
    for name in backbone:
        assert np.array_equal(before[name].asnumpy(), after[name].asnumpy()), name
    assert after["fc.weight"].shape == (4, 2048)
    history = read_json(RunFiles(out, "resnet50").metrics)
    assert history[-1]["train_loss"] < history[0]["train_loss"]  # the head did train


def test_aim_run_has_captioned_predictions_confusion_matrix_and_class_accuracy(trained, aim_run):
    import re
    from aim.storage.context import Context
    _, run = aim_run
    epochs = list(range(1, TRAINED["epochs"] + 1))
    names = read_json(trained["files"].labels)["class_names"]
    _, inputs, labels = datasets.preview_batch(datasets.find_data(trained["data"]), "val", 32, 16)

    steps, batches = run.get_image_sequence("val_predictions", Context({"subset": "val"})).values.sparse_list()
    assert steps == epochs and all(len(batch) == 16 for batch in batches)
    pairs = [re.fullmatch(r"true: (\w+) / predicted: (\w+)", image.caption).groups() for image in batches[-1]]
    assert [names.index(true) for true, _ in pairs] == labels.tolist()
    # The last epoch's captions are what the last checkpoint predicts for those images.
    net = create_model("resnet50", TRAINED["classes"])
    ms.load_param_into_net(net, ms.load_checkpoint(str(trained["files"].last_checkpoint)))
    net.set_train(False)
    predicted = net(ms.Tensor(inputs)).asnumpy().argmax(1)
    assert [names.index(p) for _, p in pairs] == predicted.tolist()

    steps, figures = run.get_image_sequence("confusion_matrix", Context({"subset": "val"})).values.sparse_list()
    assert steps == epochs and min(figures[-1].to_pil_image().size) > 200

    # Per-class accuracy, weighted by class sizes, is the overall accuracy.
    val_labels = datasets.find_data(trained["data"]).val[1]
    history = read_json(trained["files"].metrics)
    weighted = 0.0
    for label, name in enumerate(names):
        series = run.get_metric("class_accuracy", Context({"subset": "val", "class": name})).dataframe()
        assert series["step"].tolist() == epochs
        weighted += series["value"].iloc[-1] * (val_labels == label).sum() / len(val_labels)
    assert weighted == pytest.approx(history[-1]["val_accuracy"], abs=1e-6)

    steps, samples = run.get_image_sequence("train_samples", Context({})).values.sparse_list()
    assert steps == [0] and "labels" in samples[0].caption
    for name in ("images_per_second", "epoch_seconds"):
        assert len(run.get_metric(name, Context({"subset": "train"})).dataframe()) > 0


def test_class_folders_train_on_a_saved_split_that_resume_and_later_runs_keep(tmp_path):
    """A user's photos, one folder per class and no val/: split once, kept in split.json; images added before the
    job is resumed are left out, so none of its validation images is ever trained on; --split reuses it."""
    from PIL import Image

    from make_demo_data import make_split, write_imagefolder
    photos = write_imagefolder(tmp_path / "photos", {"": make_split(80, 2, 0)}, ["circle", "square"])
    out = tmp_path / "out"
    flags = ["--arch", "resnet18", "--image_size", 32, "--batch_size", 16, "--aim_system_metrics", "false"]
    first = run_train("--data_url", photos, "--output_url", out, "--epochs", 1, *flags)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "64 train / 16 val images (class folders split now)" in first.stdout
    assert "classes: circle 40, square 40" in first.stdout
    split = read_json(out / "split.json")
    assert len(split["val"]) == 16 and not set(split["train"]) & set(split["val"])
    assert {path.split("/")[0] for path in split["val"]} == {"circle", "square"}

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(photos / "circle" / "added.png")
    resumed = run_train("--data_url", photos, "--output_url", out, "--epochs", 2, "--resume", "auto", *flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume: continuing after epoch 1 of 2" in resumed.stdout
    assert "leaving out 1 image(s)" in resumed.stderr and "circle/added.png" in resumed.stderr
    assert read_json(out / "split.json") == split

    # A later run given the split validates on the same images; class weights come from its training part.
    for extra in range(24):  # squares added since: left out, as the saved split does not list them
        Image.fromarray(np.full((32, 32, 3), extra, np.uint8)).save(photos / "square" / f"extra{extra}.png")
    again = run_train("--data_url", photos, "--output_url", tmp_path / "again", "--epochs", 1,
                      "--split", out / "split.json", "--class_weights", "auto", *flags)
    assert again.returncode == 0, again.stderr[-3000:]
    assert read_json(tmp_path / "again" / "split.json") == split
    assert "leaving out 25 image(s)" in again.stderr
    assert "class weights: circle 1.000, square 1.000" in again.stdout  # 32 and 32: the formula is unit-tested
    assert "val_macro_f1" in read_json(tmp_path / "again" / "metrics.json")[0]

    # --resume PATH (a state from elsewhere) takes the split beside it, too.
    moved = run_train("--data_url", photos, "--output_url", tmp_path / "moved", "--epochs", 3,
                      "--resume", out / "resume.ckpt", *flags)
    assert moved.returncode == 0, moved.stderr[-3000:]
    assert "resume: continuing after epoch 2 of 3" in moved.stdout
    assert read_json(tmp_path / "moved" / "split.json") == split


def test_a_test_split_beside_val_is_evaluated_once_at_the_end_with_the_best_weights(tmp_path):
    from aim.storage.context import Context

    from make_demo_data import make_split, write_imagefolder
    from test_aim_runs import read_runs
    data = write_imagefolder(tmp_path / "shapes", {"train": make_split(96, 2, 0), "val": make_split(24, 2, 1),
                                                   "test": make_split(30, 2, 2)}, ["circle", "square"])
    out = tmp_path / "out"
    result = run_train("--data_url", data, "--output_url", out, "--epochs", 2, "--arch", "resnet18", "--image_size",
                       32, "--batch_size", 16, "--aim_system_metrics", "false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "96 train / 24 val images, 30 test images kept for the end" in result.stdout
    history, report = read_json(out / "metrics.json"), read_json(out / "test.json")
    best = max(history, key=lambda r: r["val_accuracy"])["epoch"]
    assert report["images"] == 30 and report["best_epoch"] == best and sum(map(sum, report["confusion"])) == 30

    net = create_model("resnet18", 2)  # recomputed here: the best checkpoint on test/, through the val transform
    ms.load_param_into_net(net, ms.load_checkpoint(str(out / "resnet18-best.ckpt")))
    source = datasets.find_data(data)
    assert evaluate(net, datasets.create_dataset(source, "test", 32, batch_size=10)) == \
        pytest.approx(report["accuracy"], abs=1e-6)
    assert result.stdout.count("test: accuracy") == 1

    (run,) = read_runs(out).values()
    tracked = run.get_metric("accuracy", Context({"subset": "test"})).dataframe()
    assert tracked["step"].tolist() == [best] and tracked["value"].tolist() == pytest.approx([report["accuracy"]])

    # Stopped after the last epoch, before the test: the restart has nothing to train, but tests.
    (out / "test.json").unlink()
    restarted = run_train("--data_url", data, "--output_url", out, "--epochs", 2, "--resume", "auto", "--arch",
                          "resnet18", "--image_size", 32, "--batch_size", 16, "--aim_system_metrics", "false")
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "nothing left to train" in restarted.stdout and read_json(out / "test.json") == report


def test_mindspores_compile_cache_leaves_the_job_whole_and_its_numbers_unchanged(small_data, tmp_path):
    """With MS_COMPILER_CACHE_ENABLE=1 the job ends as without it (MindSpore's listing of the script's imports reset
    sys.stderr, and Aim's close failed with a traceback before the export), and a second job, with the first's
    graphs cached, learns exactly the same numbers."""
    import os
    env = {**os.environ, "MS_COMPILER_CACHE_ENABLE": "1", "MS_COMPILER_CACHE_PATH": str(tmp_path / "graphs")}
    histories = []
    for job in ("first", "cached"):
        out = tmp_path / job
        result = run_train("--data_url", small_data[0], "--output_url", out, "--arch", "resnet18", "--image_size", 32,
                           "--epochs", 1, "--batch_size", 16, "--aim_system_metrics", "false", env=env)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert "done: best val_accuracy" in result.stdout and RunFiles(out, "resnet18").best_mindir.is_file()
        histories.append([{k: v for k, v in r.items() if "second" not in k} for r in read_json(out / "metrics.json")])
    assert list((tmp_path / "graphs").rglob("*.mindir"))  # the second job had a cache to read
    assert histories[0] == histories[1]
