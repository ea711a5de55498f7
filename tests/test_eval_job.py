"""eval.py: the trained model judged per class, on the split it validated on, as a job of its own."""

import numpy as np
import pytest
from conftest import TRAIN_DIR, TRAINED, predictions, read_json, run_script, stderr_lines

EVAL_PY = TRAIN_DIR / "eval.py"


def run_eval(*args):
    return run_script(EVAL_PY, *args)


@pytest.mark.slow
def test_eval_reproduces_the_best_validation_accuracy_and_its_per_class_numbers(trained, tmp_path):
    out = tmp_path / "eval"
    result = run_eval("--model_url", trained["files"].best_checkpoint, "--data_url", trained["data"],
                      "--output_url", out, "--aim_repo", tmp_path / "aim")
    assert result.returncode == 0 and stderr_lines(result) == [], result.stderr[-3000:]
    report = read_json(out / "eval.json")
    history = read_json(trained["files"].metrics)
    assert report["subset"] == "val" and report["images"] == TRAINED["val"]
    assert report["accuracy"] == pytest.approx(max(r["val_accuracy"] for r in history), abs=1e-9)

    # An independent confusion matrix, from the best checkpoint's predictions computed here.
    truth, predicted = predictions(trained["files"].best_checkpoint, trained["data"])
    names = read_json(trained["files"].labels)["class_names"]
    for label, name in enumerate(names):
        right = ((truth == label) & (predicted == label)).sum()
        numbers = report["classes"][name]
        assert numbers["support"] == (truth == label).sum()
        assert numbers["recall"] == pytest.approx(right / (truth == label).sum())
        assert numbers["precision"] == pytest.approx(right / max(1, (predicted == label).sum()))
    assert report["macro"]["f1"] == pytest.approx(np.mean([report["classes"][n]["f1"] for n in names]))
    recalls = [report["classes"][n]["recall"] * report["classes"][n]["support"] for n in names]
    assert report["weighted"]["recall"] == pytest.approx(report["accuracy"])  # weighted recall is accuracy
    assert sum(recalls) == pytest.approx(report["accuracy"] * report["images"])
    assert (out / "confusion_matrix.png").stat().st_size > 5000
    assert (out / "worst_mistakes.png").exists() == (report["accuracy"] < 1)

    from test_aim_runs import read_runs
    from aim.storage.context import Context
    (run,) = read_runs(tmp_path / "aim").values()
    tracked = run.get_metric("accuracy", Context({"subset": "val", "job": "eval"})).dataframe()
    assert tracked["value"].tolist() == pytest.approx([report["accuracy"]])


@pytest.mark.slow
def test_eval_of_an_output_folder_judges_its_onnx_with_the_same_numbers(trained, tmp_path):
    """Given the job's output folder, eval.py chooses as the app does (the .onnx, onnxruntime being installed) and
    finds what the checkpoint found, class by class."""
    by_checkpoint = run_eval("--model_url", trained["files"].best_checkpoint, "--data_url", trained["data"],
                             "--output_url", tmp_path / "ckpt", "--aim_repo", tmp_path / "aim")
    by_folder = run_eval("--model_url", trained["out"], "--data_url", trained["data"], "--output_url",
                         tmp_path / "folder", "--aim_repo", tmp_path / "aim")
    assert by_checkpoint.returncode == by_folder.returncode == 0, by_folder.stderr[-3000:]
    onnx, ckpt = read_json(tmp_path / "folder" / "eval.json"), read_json(tmp_path / "ckpt" / "eval.json")
    assert (onnx["model_file"], ckpt["model_file"]) == ("resnet50-best.onnx", "resnet50-best.ckpt")
    assert by_folder.stdout.splitlines()[-1].startswith("eval: resnet50-best.onnx on the val split")
    assert onnx["accuracy"] == ckpt["accuracy"] and onnx["confusion"] == ckpt["confusion"]


@pytest.mark.slow
def test_eval_refuses_a_model_of_other_classes_with_one_line(trained, tmp_path):
    from make_demo_data import make_split, write_cifar
    other = write_cifar(tmp_path / "other", make_split(16, 2, 0), make_split(8, 2, 1), ["x", "y"])
    result = run_eval("--model_url", trained["out"], "--data_url", other, "--output_url", tmp_path / "eval")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = stderr_lines(result)
    assert line.startswith("error: the data's classes ['x', 'y'] are not the model's")
    assert not (tmp_path / "eval" / "eval.json").exists()


def test_eval_of_a_missing_model_is_one_line(tmp_path):
    result = run_eval("--model_url", tmp_path / "nothing.ckpt", "--data_url", tmp_path, "--output_url",
                      tmp_path / "eval")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = stderr_lines(result)
    assert line.startswith("error: model_url") and "does not exist" in line
