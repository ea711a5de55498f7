"""predict.py: a folder of new images labelled in batches, as the app's Predictor labels them one by one."""
import csv
import json
import sys

import numpy as np
import pytest
from conftest import ROOT, TRAIN_DIR, run_script, stderr_lines
from PIL import Image

PREDICT_PY = TRAIN_DIR / "predict.py"


def run_predict(*args):
    return run_script(PREDICT_PY, *args)


@pytest.mark.slow
def test_a_thousand_images_get_the_predictors_top_1_and_a_corrupt_one_is_listed(trained, tmp_path):
    from make_demo_data import make_split
    photos = tmp_path / "photos"
    pictures, _ = make_split(1000, 4, 11)
    for i, picture in enumerate(pictures):
        folder = photos / f"batch{i // 250}"  # a tree, as a user's folders are
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(folder / f"{i:04d}.png")
    (photos / "batch0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "out"
    result = run_predict("--model_url", trained["files"].best_checkpoint, "--data_url", photos, "--output_url", out,
                         "--top_k", 3, "--batch_size", 100)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = stderr_lines(result)
    assert line.startswith("warning: 1 image file(s) could not be read") and "batch0/broken.jpg" in line
    assert (out / "unreadable.txt").read_text() == "batch0/broken.jpg\n"

    with open(out / "predictions.csv", newline="") as table:
        rows = list(csv.DictReader(table))
    jsonl = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == len(jsonl) == 1000 and [r["path"] for r in rows] == [j["path"] for j in jsonl]
    assert len({r["path"] for r in rows}) == 1000
    first = rows[0]
    assert set(first) == {"path", "label_1", "probability_1", "label_2", "probability_2", "label_3", "probability_3"}
    assert float(first["probability_1"]) >= float(first["probability_2"]) >= float(first["probability_3"])

    sys.path.insert(0, str(ROOT / "inference"))
    from predictor import Predictor
    model = Predictor.load(trained["files"].best_checkpoint)
    paths = [photos / r["path"] for r in rows]
    expected = [p[0][0] for start in range(0, 1000, 100) for p in model.predict(paths[start:start + 100], top_k=1)]
    assert [r["label_1"] for r in rows] == expected
    probabilities = [p[0][1] for p in model.predict(paths[:50], top_k=1)]
    np.testing.assert_allclose([float(r["probability_1"]) for r in rows[:50]], probabilities, atol=1e-5)


def test_a_missing_model_is_one_line(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"x")
    result = run_predict("--model_url", tmp_path / "nothing.ckpt", "--data_url", tmp_path, "--output_url", tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = stderr_lines(result)
    assert line.startswith("error: model_url") and "does not exist" in line


def test_a_sliver_is_listed_as_unreadable_not_resized_to_gigabytes(tmp_path):
    """1 x 40000 pixels is a few hundred bytes of PNG; resized to 37 on its shorter side for a 32 crop it would be
    37 x 1480000 x 3 bytes. It is listed; a photo of the same kind goes through."""
    import predict
    sliver, photo = tmp_path / "sliver.png", tmp_path / "photo.png"
    Image.new("RGB", (40000, 1), "white").save(sliver)
    Image.new("RGB", (300, 200), "white").save(photo)
    source = predict._Decoded([sliver, photo], 8, {"image_size": 32, "data_format": "imagefolder"})
    assert source[0][1] == -1 and source[1][1] == 1 and source[1][0].shape == (200, 300, 3)
    as_cifar = predict._Decoded([sliver], 8, {"image_size": 32, "data_format": "cifar10"})  # resized whole: fine
    assert as_cifar[0][1] == 0
