"""inference/: the predictor and the Gradio app, against a model trained here on shapes whose colour is random, so
that a grey or recoloured upload is still a fair question."""
import io
import shutil
import struct
import subprocess
import sys
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import ARTIFACTS, CHROMIUM_ARGS, ROOT, run_train
from PIL import Image, ImageDraw

from make_demo_data import draw_shape, write_cifar

sys.path.insert(0, str(ROOT / "inference"))
import predictor as inference  # noqa: E402
from launch import running_app  # noqa: E402

pytestmark = pytest.mark.slow
APP = ROOT / "inference" / "app.py"
SHAPES = ["circle", "square", "triangle"]


def shape_image(rng, label, side=32):
    """A shape of random colour (greys included) on a dark noisy background."""
    pixels = np.clip(rng.integers(0, 60, size=3) + rng.normal(0, 12, size=(side, side, 3)), 0, 255)
    image = Image.fromarray(pixels.astype(np.uint8))
    colour = tuple(int(c) for c in rng.integers(120, 256, size=3))
    size = rng.uniform(0.5, 0.8) * side
    x0, y0 = rng.uniform(0, side - size, size=2)
    draw_shape(ImageDraw.Draw(image), SHAPES[label], (x0, y0, x0 + size, y0 + size), colour)
    return image


def shape_split(count, seed, side=32):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(count) % len(SHAPES))
    return np.stack([np.asarray(shape_image(rng, int(label), side)) for label in labels]), labels


@pytest.fixture(scope="module")
def model(module_tmp):
    root = module_tmp
    data = write_cifar(root / "cifar", shape_split(768, 0), shape_split(240, 1), SHAPES)
    out = root / "out"
    result = run_train("--data_url", data, "--output_url", out, "--arch", "resnet18", "--image_size", 32,
                       "--epochs", 8, "--batch_size", 32, "--lr", 0.05, "--aim_system_metrics", "false", onnx=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def app(model):
    with running_app(env={"MODEL_PATH": str(model / "resnet18-best.ckpt")}) as served:
        yield served


def upload(tmp_path, name, image, **save):
    path = tmp_path / name
    image.save(path, **save)
    return path


def variants(tmp_path, seed):
    """(file, true class) for each upload kind: PNG, JPEG, RGBA PNG, greyscale PNG, larger than training's 32px."""
    rng = np.random.default_rng(seed)
    files = []
    for label, shape in enumerate(SHAPES):
        image = shape_image(rng, label, side=64)
        files += [(upload(tmp_path, f"{shape}.png", image), shape),
                  (upload(tmp_path, f"{shape}.jpg", image, quality=92), shape),
                  (upload(tmp_path, f"{shape}-rgba.png", image.convert("RGBA")), shape),
                  (upload(tmp_path, f"{shape}-grey.png", image.convert("L")), shape)]
    return files


def predict(client, path):
    from gradio_client import handle_file
    return client.predict(handle_file(str(path)), api_name="/predict")


def test_predicts_the_right_class_for_png_jpeg_rgba_and_greyscale(app, tmp_path):
    _, client = app
    for path, shape in variants(tmp_path, seed=5):
        result = predict(client, path)
        assert result["label"] == shape, (path.name, result)
        confidences = {c["label"]: c["confidence"] for c in result["confidences"]}
        assert set(confidences) == set(SHAPES) and sum(confidences.values()) == pytest.approx(1, abs=1e-6)


def test_fifty_concurrent_requests_all_answered(app, tmp_path):
    """50 users, each with their own client, press Classify at the same moment. (One shared gradio_client Client
    with 50 submits sometimes loses a job on its own side, a CancelledError in gradio_client 2.7: not the app.)"""
    from gradio_client import Client, handle_file
    url, _ = app
    files = variants(tmp_path, seed=9)
    expected = [files[i % len(files)] for i in range(50)]
    start = threading.Barrier(len(expected))

    def user(upload):
        client = Client(url, verbose=False)
        start.wait(timeout=300)
        try:
            return client.predict(handle_file(str(upload)), api_name="/predict")["label"]
        except Exception as exc:  # collected, so a failure shows every error, not just the first
            return f"{type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max_workers=len(expected)) as pool:
        outcomes = list(pool.map(user, [path for path, _ in expected]))
    assert outcomes == [shape for _, shape in expected]


def bomb_png(path, side=30000):
    """A tiny PNG whose header claims side x side pixels: what a decompression bomb looks like to a reader."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", side, side)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def bad_uploads(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    good = tmp_path / "good.png"
    shape_image(np.random.default_rng(0), 0, 64).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    return {"not an image": text, "corrupt or truncated": truncated, "too large": bomb_png(tmp_path / "bomb.png")}


def test_bad_uploads_get_a_message_and_the_server_keeps_answering(app, tmp_path):
    from gradio_client.exceptions import AppError
    _, client = app
    for message, path in bad_uploads(tmp_path).items():
        with pytest.raises(AppError, match=message):
            predict(client, path)
    (path, shape), *_ = variants(tmp_path, seed=5)
    assert predict(client, path)["label"] == shape


def test_ckpt_mindir_and_onnx_agree(model, tmp_path):
    ckpt = inference.Predictor.load(model / "resnet18-best.ckpt")
    images = [path for path, _ in variants(tmp_path, seed=3)]
    a = ckpt.probabilities(images)
    for graph in ("resnet18-best.mindir", "resnet18-best.onnx"):
        b = inference.Predictor.load(model / graph).probabilities(images)
        assert (a.argmax(1) == b.argmax(1)).all(), graph
        np.testing.assert_allclose(a, b, atol=1e-4, err_msg=graph)
    assert [top[0][0] for top in ckpt.predict(images, top_k=2)] == [SHAPES[i] for i in a.argmax(1)]


def test_loading_a_model_caps_onednn_at_avx2_as_training_does(model):
    """Without the cap, MindSpore's oneDNN runs a reference convolution on AVX-512 hosts: serving 10-30x slower
    (the tests set it for themselves, which hid that the app did not)."""
    import os
    import platform
    env = {key: value for key, value in os.environ.items() if key != "ONEDNN_MAX_CPU_ISA"}
    code = ("import os, sys; sys.path.insert(0, sys.argv[1]); from predictor import Predictor; "
            "Predictor.load(sys.argv[2]); print(os.environ.get('ONEDNN_MAX_CPU_ISA'))")
    result = subprocess.run([sys.executable, "-c", code, str(ROOT / "inference"), str(model / "resnet18-best.ckpt")],
                            capture_output=True, text=True, timeout=300, env=env)
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    assert result.stdout.split()[-1:] == (["AVX2"] if x86 else ["None"]), result.stderr[-2000:]


def test_the_pod_way_model_files_fetched_into_inference_then_python3_app_py(model, tmp_path):
    """As Xihe's pod: a clone, the model_path files copied into inference/ by basename, `python3 app.py` there."""
    clone = tmp_path / "clone"
    shutil.copytree(ROOT / "inference", clone / "inference", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "train" / "train_dir", clone / "train" / "train_dir",
                    ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, str(ROOT / "inference"))
    import fetch_model
    shutil.copytree(model, tmp_path / "hub" / "me" / "shapes")  # the user's model repository on the hub
    paths = [f"me/shapes/{name}" for name in ("resnet18-best.ckpt", "labels.json", "metrics.json")]
    paths += [f"me/shapes/examples/{p.name}" for p in (model / "examples").iterdir()]
    fetch_model.fetch(paths, hub=tmp_path / "hub", target=clone / "inference")
    with running_app(app=clone / "inference" / "app.py", cwd=clone / "inference") as (url, client):
        from gradio_client import handle_file
        result = client.predict(handle_file(str(clone / "inference" / "square.png")), api_name="/predict")
        assert result["label"] == "square"
        import urllib.request
        with urllib.request.urlopen(url, timeout=60) as page:
            assert page.status == 200


def test_the_platform_layout_and_a_missing_model(model, tmp_path):
    folder = tmp_path / "inference"
    folder.mkdir()
    with pytest.raises(inference.UserError, match="no model"):
        inference.find_model(folder)
    for name in ("resnet18-best.onnx", "resnet18-best.mindir", "resnet18-best.ckpt", "labels.json"):
        shutil.copy(model / name, folder / name)
    assert inference.find_model(folder).name == "resnet18-best.onnx"  # onnxruntime is installed: fastest first
    (folder / "resnet18-best.onnx").unlink()
    assert inference.find_model(folder).name == "resnet18-best.ckpt"  # then a .ckpt before a .mindir
    (folder / "labels.json").unlink()
    with pytest.raises(inference.UserError, match="labels.json is missing"):
        inference.Predictor.load(folder / "resnet18-best.ckpt")
    result = subprocess.run([sys.executable, str(APP), "--model", str(tmp_path / "nothing.ckpt")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: model file {tmp_path / 'nothing.ckpt'} does not exist"]


def test_the_ui_in_chromium(app, chromium, tmp_path):
    url, _ = app
    from playwright.sync_api import sync_playwright
    (path, shape), *_ = variants(tmp_path, seed=5)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(url, wait_until="networkidle", timeout=60000)
            assert "Best validation accuracy" in page.inner_text("body")
            page.locator("input[type=file]").first.set_input_files(str(path))
            page.get_by_role("button", name="Classify").click()
            label = page.locator("[data-testid=label-output-value]")
            label.wait_for(timeout=60000)
            page.wait_for_function("s => document.querySelector('[data-testid=label-output-value]')"
                                   ".innerText.includes(s)", arg=shape, timeout=60000)
            assert shape in label.inner_text()
            page.screenshot(path=str(ARTIFACTS / "inference-ui.png"))
        finally:
            browser.close()
    assert (ARTIFACTS / "inference-ui.png").stat().st_size > 10000
