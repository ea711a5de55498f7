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
from conftest import ROOT, TRAINED, read_json

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


def without(tmp_path, *modules):
    """An environment whose Python refuses to import `modules` (a sitecustomize on PYTHONPATH), and the file where
    every attempt is written, so a test can prove the module was never even tried."""
    guard = tmp_path / "guard"
    guard.mkdir()
    attempts = tmp_path / "import-attempts.txt"
    (guard / "sitecustomize.py").write_text(f"""
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {set(modules)!r}:
            with open({str(attempts)!r}, "a") as log:
                log.write(name + "\\n")
            raise ImportError(f"{{name}} is not installed (refused by the test)")
sys.meta_path.insert(0, Refuse())
""")
    return {"PYTHONPATH": os.pathsep.join([str(guard), os.environ.get("PYTHONPATH", "")])}, attempts


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


def tiny_classifier(path, image_size=16, classes=3, batch="batch"):
    """An ONNX graph shaped like train.py's export (NCHW images in, N x classes logits out): mean colour, then a
    matrix; made with the onnx package, no MindSpore."""
    import onnx
    from onnx import TensorProto, helper
    weights = helper.make_tensor("w", TensorProto.FLOAT, [3, classes], np.linspace(-0.05, 0.05, 3 * classes).astype(np.float32))
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["images"], ["colour"], axes=[2, 3], keepdims=0),
         helper.make_node("MatMul", ["colour", "w"], ["logits"])], "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, image_size, image_size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])], [weights])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    return path


@pytest.mark.parametrize("case, labels, message", [
    ("another image size", {"image_size": 32}, "takes 16x16 images, but labels.json says image_size 32"),
    ("more classes named", {"class_names": list("abcd")}, "has 3 outputs but labels.json names 4 classes"),
    ("not a classifier", None, "is not an image classifier as train.py exports"),
])
def test_an_onnx_model_that_does_not_fit_its_labels_is_refused_at_load(tmp_path, case, labels, message):
    from errors import UserError
    model = tiny_classifier(tmp_path / "model.onnx")
    if labels is None:
        from onnx import TensorProto, helper
        import onnx
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(model))
    (tmp_path / "labels.json").write_text(json.dumps({"class_names": ["a", "b", "c"], "image_size": 16,
                                                      **(labels or {})}))
    with pytest.raises(UserError, match=message):
        inference.Predictor.load(model)
    refused = subprocess.run([sys.executable, str(APP), "--model", str(model)], capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert message in refused.stderr


def test_a_fitting_onnx_model_predicts_whole_batches(tmp_path):
    """A graph whose batch axis is 1 (as MindSpore exports before the axis is freed) is run one image at a time;
    a free one takes the batch at once: the same answers."""
    from PIL import Image
    (tmp_path / "labels.json").write_text(json.dumps({"class_names": ["a", "b", "c"], "image_size": 16,
                                                      "data_format": "imagefolder"}))
    images = [Image.fromarray(pixels) for pixels in photographs().values()]
    free = inference.Predictor.load(tiny_classifier(tmp_path / "free.onnx"))
    fixed = inference.Predictor.load(tiny_classifier(tmp_path / "fixed.onnx", batch=1))
    np.testing.assert_allclose(free.probabilities(images), fixed.probabilities(images), rtol=1e-6)
    assert free.probabilities(images).shape == (5, 3)
