"""Serving without MindSpore: the job's .onnx on onnxruntime, with images prepared by datasets.eval_array (OpenCV and
numpy) instead of mindspore.dataset, checked against training's own validation transform and the .ckpt."""
import json
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import ROOT, TRAINED, read_json, run_train, without

import datasets

sys.path.insert(0, str(ROOT / "inference"))
import predictor as inference  # noqa: E402
from launch import running_app  # noqa: E402

APP = ROOT / "inference" / "app.py"
PROBABILITY_TOLERANCE = 1e-4  # .onnx on onnxruntime against the .ckpt on MindSpore, per class probability


def photographs():
    """The sample photographs scikit-image ships (no download), of different sizes and shapes, and a grey one."""
    from skimage import data
    grey = data.camera()
    return {"astronaut": data.astronaut(), "chelsea": data.chelsea(), "coffee": data.coffee(),
            "rocket": data.rocket(), "camera": np.stack([grey] * 3, axis=-1)}


# (image side, other side, image_size): where mindspore.dataset's float32 arithmetic for the longer side gives one
# pixel less than the exact floor (37 x 48 to a 37 shorter side: 47, not 48), so a copy with exact arithmetic fails.
FLOAT32_SIZES = [(37, 48, 32), (73, 90, 64), (111, 118, 97)]


def sample_images():
    rng = np.random.default_rng(0)
    shapes = [(37, 91), (300, 301), (301, 300), (255, 257), (1000, 3), (3, 5), (480, 640), (17, 17)]
    shapes += [(a, b) for a, b, _ in FLOAT32_SIZES] + [(b, a) for a, b, _ in FLOAT32_SIZES]
    shapes += [tuple(rng.integers(1, 400, size=2)) for _ in range(40)]
    return [*photographs().values(), *(rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes)]


def test_the_float32_sizes_are_the_ones_exact_arithmetic_gets_wrong():
    for short, long, image_size in FLOAT32_SIZES:
        assert round(image_size / datasets.CROP_RATIO) == short
        assert int(np.float32(short) * (np.float32(long) / np.float32(short))) == long - 1


@pytest.mark.parametrize("data_format", ["imagefolder", "cifar10"])
@pytest.mark.parametrize("image_size", [224, 97, 64, 32])
def test_eval_array_equals_the_validation_transform_bit_for_bit(data_format, image_size):
    """Tolerance: none. The same resize (OpenCV's bilinear, which mindspore.dataset runs on CPU), the same crop and
    the same float32 normalisation give the same tensor."""
    from mindspore.dataset.transforms import Compose
    transform = Compose(datasets.eval_transforms(image_size, data_format))
    for pixels in sample_images():
        expected = transform(pixels)
        got = datasets.eval_array(pixels, image_size, data_format)
        assert got.dtype == np.float32 and got.shape == expected.shape == (3, image_size, image_size)
        assert np.array_equal(got, expected), (pixels.shape, np.abs(got - expected).max())


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory):
    """The shared trained model's .onnx, .ckpt and labels.json, with a copy of labels.json that says the model
    takes photographs (resize and centre crop), so that both validation transforms are exercised."""
    folder = tmp_path_factory.mktemp("served")
    for name in ("resnet50-best.onnx", "resnet50-best.ckpt", "labels.json"):
        shutil.copy(trained["out"] / name, folder / name)
    photos = folder / "as-photos"
    photos.mkdir()
    labels = read_json(folder / "labels.json")
    (photos / "labels.json").write_text(json.dumps({**labels, "data_format": "imagefolder"}))
    return folder, photos


def checkpoint_probabilities(folder, labels_path, images):
    """What training's validation would compute: the .ckpt in resnet.py's network, on eval_transforms' tensors."""
    import mindspore as ms
    from mindspore.dataset.transforms import Compose

    import trained_model
    labels = trained_model.read_labels(labels_path)
    transform = Compose(datasets.eval_transforms(labels["image_size"], labels["data_format"]))
    net = trained_model.load_network(folder / "resnet50-best.ckpt", labels)
    batch = np.stack([transform(np.asarray(image)) for image in images])
    return trained_model.softmax(net(ms.Tensor(batch)).asnumpy())


@pytest.mark.slow
@pytest.mark.parametrize("as_photos", [False, True], ids=["cifar-format", "photo-format"])
def test_the_onnx_model_agrees_with_the_checkpoint_on_real_photographs(served, as_photos):
    folder, photos = served
    labels_path = (photos if as_photos else folder) / "labels.json"
    from PIL import Image
    images = [Image.fromarray(pixels) for pixels in photographs().values()]
    expected = checkpoint_probabilities(folder, labels_path, images)
    model = inference.Predictor.load(folder / "resnet50-best.onnx", labels_path)
    got = model.probabilities(images)
    assert got.shape == (len(images), TRAINED["classes"])
    assert (got.argmax(1) == expected.argmax(1)).all()
    np.testing.assert_allclose(got, expected, atol=PROBABILITY_TOLERANCE, rtol=0)
    assert len(set(expected.argmax(1))) > 1 or as_photos  # not a model that says one thing to everything


@pytest.mark.slow
def test_the_onnx_graph_takes_any_batch_size(trained):
    import trained_model
    session, run = trained_model.onnx_session(trained["out"] / "resnet50-best.onnx")
    assert session.get_inputs()[0].shape[0] == "batch"
    batch = np.random.default_rng(0).normal(size=(32, 3, 32, 32)).astype(np.float32)
    one_at_a_time = np.concatenate([run(image[None]) for image in batch])
    np.testing.assert_allclose(run(batch), one_at_a_time, atol=1e-4, rtol=1e-4)
    assert "agrees with the model on 16 validation images" in trained["result"].stdout


@pytest.mark.slow
def test_the_app_serves_the_onnx_without_mindspore_fifty_concurrent_requests(served, trained, tmp_path):
    """Fifty users, each with their own gradio_client, press Classify at once; every answer is the one the
    Predictor gives in this process, and MindSpore was never imported (not even tried)."""
    from gradio_client import Client, handle_file
    folder, _ = served
    env, attempts = without(tmp_path, "mindspore")
    uploads = sorted((trained["out"] / "examples").iterdir())
    local = inference.Predictor.load(folder / "resnet50-best.onnx")
    expected = [local.predict([path], top_k=1)[0][0][0] for path in uploads]
    with running_app(["--model", folder / "resnet50-best.onnx"], env=env) as (url, _):
        start = threading.Barrier(50)

        def user(i):
            client = Client(url, verbose=False)
            start.wait(timeout=300)
            try:
                return client.predict(handle_file(str(uploads[i % len(uploads)])), api_name="/predict")["label"]
            except Exception as exc:  # collected, so a failure shows every error
                return f"{type(exc).__name__}: {exc}"

        with ThreadPoolExecutor(max_workers=50) as pool:
            answers = list(pool.map(user, range(50)))
    assert answers == [expected[i % len(uploads)] for i in range(50)]
    assert not attempts.exists(), attempts.read_text()

    refused = subprocess.run([sys.executable, str(APP), "--model", str(folder / "resnet50-best.ckpt")],
                             capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        "error: resnet50-best.ckpt needs MindSpore (pip install mindspore); without it, serve the job's .onnx with "
        "onnxruntime"]


def tiny_classifier(path, image_size=16, classes=3, batch="batch", channels=3, dtype="FLOAT"):
    """An ONNX graph shaped like train.py's export (NCHW images in, N x classes logits out): mean colour, then a
    matrix; made with the onnx package, no MindSpore."""
    import onnx
    from onnx import TensorProto, helper
    kind = getattr(TensorProto, dtype)
    weights = np.linspace(-0.05, 0.05, channels * classes).astype(onnx.helper.tensor_dtype_to_np_dtype(kind))
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["images"], ["colour"], axes=[2, 3], keepdims=0),
         helper.make_node("MatMul", ["colour", "w"], ["logits"])], "tiny",
        [helper.make_tensor_value_info("images", kind, [batch, channels, image_size, image_size])],
        [helper.make_tensor_value_info("logits", kind, [batch, classes])],
        [helper.make_tensor("w", kind, [channels, classes], weights)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    return path


@pytest.mark.parametrize("case, graph, labels, message", [
    ("another image size", {}, {"image_size": 32}, "takes 16x16 images, but labels.json says image_size 32"),
    ("more classes named", {}, {"class_names": list("abcd")}, "has 3 outputs but labels.json names 4 classes"),
    ("not a classifier", None, {}, "is not an image classifier as train.py exports"),
    ("grey images", {"channels": 1}, {}, "is not an image classifier as train.py exports"),
    ("float16 input", {"dtype": "FLOAT16"}, {}, "is not an image classifier as train.py exports"),
    ("a fixed batch of 4", {"batch": 4}, {}, "takes exactly 4 images at a time; train.py's take any number"),
])
def test_an_onnx_model_that_does_not_fit_its_labels_is_refused_at_load(tmp_path, case, graph, labels, message):
    from errors import UserError
    model = tiny_classifier(tmp_path / "model.onnx", **(graph or {}))
    if graph is None:
        from onnx import TensorProto, helper
        import onnx
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(model))
    (tmp_path / "labels.json").write_text(json.dumps({"class_names": ["a", "b", "c"], "image_size": 16, **labels}))
    with pytest.raises(UserError, match=message):
        inference.Predictor.load(model)
    refused = subprocess.run([sys.executable, str(APP), "--model", str(model)], capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert message in refused.stderr


def test_a_fitting_onnx_model_predicts_whole_batches(tmp_path, monkeypatch):
    """A graph whose batch axis is 1 (as MindSpore exports before the axis is freed) is run one image at a time;
    a free one takes the batch in one call: the same answers."""
    import onnxruntime
    from PIL import Image
    (tmp_path / "labels.json").write_text(json.dumps({"class_names": ["a", "b", "c"], "image_size": 16,
                                                      "data_format": "imagefolder"}))
    images = [Image.fromarray(pixels) for pixels in photographs().values()]
    free = inference.Predictor.load(tiny_classifier(tmp_path / "free.onnx"))
    fixed = inference.Predictor.load(tiny_classifier(tmp_path / "fixed.onnx", batch=1))
    calls, run = [], onnxruntime.InferenceSession.run
    monkeypatch.setattr(onnxruntime.InferenceSession, "run", lambda self, *a, **k: calls.append(1) or run(self, *a, **k))
    got = free.probabilities(images)
    assert len(calls) == 1 and got.shape == (5, 3)
    np.testing.assert_allclose(got, fixed.probabilities(images), rtol=1e-6)
    assert len(calls) == 1 + len(images)
    assert np.ptp(got, axis=0).max() > 1e-4  # the images get different answers


def test_a_sliver_of_an_image_is_refused_before_it_is_resized_to_gigabytes(tmp_path):
    """1 x 1000 pixels, resized to 256 on the shorter side for a 224 crop, would be 256 x 256000 x 3 bytes."""
    from PIL import Image
    (tmp_path / "labels.json").write_text(json.dumps({"class_names": ["a", "b", "c"], "image_size": 224,
                                                      "data_format": "imagefolder"}))
    model = inference.Predictor.load(tiny_classifier(tmp_path / "model.onnx", image_size=224))
    with pytest.raises(inference.BadImage, match=r"too narrow to classify \(1000x1 pixels"):
        model.predict([Image.new("RGB", (1000, 1))])
    assert model.predict([Image.new("RGB", (500, 1))])[0][0][0] in "abc"  # 33 million pixels: still served


def test_the_model_chosen_in_a_folder_is_the_onnx_on_cpu_and_the_checkpoint_on_a_gpu(tmp_path):
    import trained_model
    names = ("resnet50-best.onnx", "resnet50-best.ckpt", "resnet50-epoch3.ckpt", "resnet50-best.mindir",
             "resume.ckpt", "resnet50-last.ckpt")
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert trained_model.choose(tmp_path).name == "resnet50-best.onnx"
    assert trained_model.choose(tmp_path, "GPU").name == "resnet50-best.ckpt"
    assert trained_model.choose(tmp_path, "Ascend").name == "resnet50-best.ckpt"
    (tmp_path / "resnet50-best.ckpt").unlink()
    assert trained_model.choose(tmp_path, "GPU").name == "resnet50-best.mindir"  # the best weights, in any form
    for name in ("resnet50-best.mindir", "resnet50-best.onnx"):
        (tmp_path / name).unlink()
    assert trained_model.choose(tmp_path).name == "resnet50-epoch3.ckpt"  # never the resume state


def test_without_opencv_the_app_says_so_at_start(tmp_path):
    env, attempts = without(tmp_path, "cv2")
    model = tiny_classifier(tmp_path / "model.onnx")
    (tmp_path / "labels.json").write_text(json.dumps({"class_names": ["a", "b", "c"], "image_size": 16}))
    refused = subprocess.run([sys.executable, str(APP), "--model", str(model)], capture_output=True, text=True,
                             timeout=300, env={**os.environ, **env})
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        "error: preparing images for the model needs OpenCV: pip install opencv-python-headless"]
    assert attempts.read_text().split() == ["cv2"]


# ---------------------------------------------------------------- no export outlives the weights it was made from

@pytest.fixture(scope="module")
def small_job(tmp_path_factory):
    from make_demo_data import make_split, write_cifar
    root = tmp_path_factory.mktemp("export")
    return write_cifar(root / "cifar", make_split(64, 2, 0), make_split(32, 2, 1), ["cat", "dog"])


def small_run(data, out, *extra):
    result = run_train("--data_url", data, "--output_url", out, "--arch", "resnet18", "--image_size", 32,
                       "--epochs", 1, "--batch_size", 16, "--aim_system_metrics", "false", *extra, onnx=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_exports_are_made_again_only_when_missing_and_an_overwrite_leaves_none_of_the_replaced_run(small_job,
                                                                                                   tmp_path):
    out = tmp_path / "out"
    small_run(small_job, out)
    onnx = out / "resnet18-best.onnx"
    onnx.unlink()  # as a kill between the MindIR and the ONNX export leaves it
    again = small_run(small_job, out, "--resume", "auto")
    assert "nothing left to train" in again.stdout and "resnet18-best.onnx agrees with the model" in again.stdout
    untouched = onnx.stat().st_mtime_ns
    quiet = small_run(small_job, out, "--resume", "auto")  # everything there: nothing exported again
    assert "agrees with the model" not in quiet.stdout and onnx.stat().st_mtime_ns == untouched

    small_run(small_job, out, "--overwrite", "--export_onnx", "false")  # its first best weights retire the export
    assert not onnx.exists() and (out / "resnet18-best.mindir").is_file()


def test_freeing_the_batch_axis_also_frees_a_reshape_to_a_batch_1_constant(tmp_path):
    """MindSpore up to 2.2 (the platform's image) exports ResNet's flatten as Reshape(x, Constant [1, 2048]): a
    graph that takes only one image until the constant keeps the batch instead."""
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper

    import export
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1, 3])
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["images"], ["pooled"], axes=[2, 3], keepdims=1),
         helper.make_node("Constant", [], ["flat_shape"], value=shape),
         helper.make_node("Reshape", ["pooled", "flat_shape"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["logits"])], "mindspore-2.0-like",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor("w", TensorProto.FLOAT, [3, 2], [1, 0, 0, 1, 1, 1])])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    export.free_batch_axis(path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).random((5, 3, 8, 8), np.float32)
    means = images.mean(axis=(2, 3))
    np.testing.assert_allclose(session.run(None, {"images": images})[0],
                               np.stack([means[:, 0] + means[:, 2], means[:, 1] + means[:, 2]], 1), rtol=1e-5)


@pytest.mark.parametrize("case, message", [
    ("agrees", None),
    ("other weights", "its logits differ from MindSpore's by up to"),
    ("not an ONNX file", "onnxruntime cannot run it: "),
    ("MindSpore fails", "MindSpore could not compute the logits to compare it with: "),
])
def test_the_onnx_export_is_kept_only_when_onnxruntime_reproduces_mindspore_and_a_refusal_names_the_side(
        tmp_path, capsys, case, message):
    """train.check_onnx on a real ONNX file (tiny_classifier) against a MindSpore network computing the same, or
    not: kept when they agree; otherwise removed, with a warning saying whether onnxruntime or MindSpore failed."""
    import mindspore as ms
    import train
    path = tiny_classifier(tmp_path / "model.onnx")
    weights = np.linspace(-0.05, 0.05, 9).astype(np.float32).reshape(3, 3)
    if case == "other weights":
        weights = weights[::-1].copy()
    if case == "not an ONNX file":
        path.write_bytes(b"<html>not a model</html>")
    if case == "MindSpore fails":
        weights = np.ones((4, 3), np.float32)  # 3 colours times 4 rows: MindSpore refuses the product

    class MeanColourClassifier(ms.nn.Cell):
        def __init__(self):
            super().__init__()
            self.weights = ms.Tensor(weights)

        def construct(self, images):
            return ms.ops.matmul(images.mean(axis=(2, 3)), self.weights)

    train.check_onnx(MeanColourClassifier(), path, np.random.default_rng(0).uniform(size=(4, 3, 16, 16)))
    out, err = capsys.readouterr()
    if message is None:
        assert path.is_file() and "model.onnx agrees with the model on 4 validation images" in out and not err
    else:
        assert not path.exists() and err.count("\n") == 1
        assert err.startswith(f"warning: model.onnx was not kept: {message}"), err
