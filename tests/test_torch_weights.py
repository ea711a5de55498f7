"""--pretrain_url takes PyTorch's ResNet weights (torchvision's .pth, timm's Hugging Face folders, .safetensors, .bin)
and our network computes what PyTorch's does with them.

The weights and the reference logits come from torchvision's and timm's own code (tests/torch_models.py, in its own
interpreter); reading a .pth here uses PyTorch's restricted unpickler, as train.py does. The name table that checks
the carried-over weights is written out here, apart from the mapping under test.
"""
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from conftest import TRAIN_DIR, read_json, run_script, run_train, stderr_lines, without
from make_demo_data import make_demo_data

from checkpoints import load_pretrained, read_pretrained
from errors import UserError
from resnet import create_model


@pytest.fixture(scope="module")
def torch_files(module_tmp):
    """The weight files torch_models.py writes, with the inputs and PyTorch's logits."""
    folder = module_tmp / "torch"
    result = subprocess.run([sys.executable, str(Path(__file__).parent / "torch_models.py"), str(folder)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def our_logits(path, arch, classes, images, log=None):
    weights = read_pretrained(path)
    net = create_model(arch, classes, weights.padding)
    load_pretrained(net, weights, log=log or (lambda _: None))
    net.set_train(False)
    return net(ms.Tensor(images)).asnumpy()


@pytest.mark.parametrize("weights, model, arch, classes, family_note", [
    ("torchvision-resnet50.pth", "torchvision-resnet50", "resnet50", 10, ""),
    ("hf-timm-resnet50", "timm-resnet50", "resnet50", 10, " of resnet50 random"),  # config.json + .safetensors
    ("hf-timm-resnet50/model.safetensors", "timm-resnet50", "resnet50", 10, ""),
    ("hf-timm-resnet34-bin", "timm-resnet34", "resnet34", 7, " of resnet34 random"),  # config.json + .bin
    ("torchvision-resnet18.safetensors", "torchvision-resnet18", "resnet18", 1000, ""),
    ("wrapped-resnet18.pth", "torchvision-resnet18", "resnet18", 1000, ""),  # {"state_dict": {"module.conv1...
    ("tutorial-style.pth", "torchvision-resnet18", "resnet18", 1000, ""),  # {"model_state_dict": ..., "epoch": 3}
])
def test_our_network_computes_what_pytorch_computes(torch_files, weights, model, arch, classes, family_note):
    inputs, expected = np.load(torch_files / "inputs.npz"), np.load(torch_files / "logits.npz")
    messages = []
    for size in ("224", "75"):
        theirs = expected[f"{model}/{size}"]
        ours = our_logits(torch_files / weights, arch, classes, inputs[size], log=messages.append)
        assert np.abs(theirs).max() > 1  # logits of a few units: an error would show
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4, err_msg=f"{weights} at {size}x{size}")
    assert f"(torchvision/timm checkpoint{family_note}, pytorch padding)" in messages[0]
    assert "head loaded" in messages[0]


def test_the_max_pool_padding_is_what_makes_them_equal(torch_files):
    """MindSpore's families pad the stem's max pool "same"; with that the logits differ, so the test above can fail."""
    inputs, expected = np.load(torch_files / "inputs.npz"), np.load(torch_files / "logits.npz")
    weights = read_pretrained(torch_files / "torchvision-resnet18.pth")
    assert weights.padding == "pytorch"
    net = create_model("resnet18", 1000, "explicit")
    load_pretrained(net, dataclasses.replace(weights, padding="explicit"), log=lambda _: None)
    net.set_train(False)
    assert np.abs(net(ms.Tensor(inputs["224"])).asnumpy() - expected["torchvision-resnet18/224"]).max() > 1e-2


@pytest.mark.parametrize("name, message", [
    ("hostile.pth", "holds Python objects besides tensors.*not unpickled.*state_dict"),
    ("whole-model.pth", "holds Python objects besides tensors.*not unpickled.*state_dict"),
    ("hostile-legacy.pth", r"is a pickle that PyTorch's restricted unpickler does not read \(Unsupported operand "
                           r"\d+\), and it is not unpickled otherwise, as that could run any code$"),
])
def test_pickles_that_hold_code_or_objects_are_refused_and_never_run(torch_files, name, message):
    marker = torch_files / "PWNED"
    with pytest.raises(UserError, match=message):
        read_pretrained(torch_files / name)
    assert not marker.exists()


@pytest.mark.parametrize("weights, arch, message", [
    ("timm-resnet18d.safetensors", "resnet18", r"torchvision/timm network that does not fit this architecture: \d+ "
                                               r"of its backbone tensors have no place here.*resnet50d"),
    ("torchvision-resnet18.pth", "resnet50", "holds resnet18 weights.*add --arch resnet18"),
    ("hf-timm-resnet34-bin", "resnet50", "holds resnet34 weights.*add --arch resnet34"),
])
def test_weights_of_another_network_are_refused_by_name(torch_files, weights, arch, message):
    pretrained = read_pretrained(torch_files / weights)
    with pytest.raises(UserError, match=message):
        load_pretrained(create_model(arch, 10, pretrained.padding), pretrained, log=lambda _: None)


def hf_folder(tmp_path, torch_files, config, weights="torchvision-resnet18.safetensors", name="model.safetensors"):
    folder = tmp_path / "hf"
    folder.mkdir()
    shutil.copy(torch_files / weights, folder / name)
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return folder


@pytest.mark.parametrize("make, message", [
    (lambda tmp, files: hf_folder(tmp, files, {"architecture": "resnet50d"}),
     "config.json names resnet50d, not one of this code's ResNets"),
    (lambda tmp, files: hf_folder(tmp, files, {"architectures": ["ResNetForImageClassification"]}),
     "describes a transformers model \\(ResNetForImageClassification\\); only torchvision's and timm's"),
    (lambda tmp, files: hf_folder(tmp, files, "{not json"), "config.json is not valid JSON"),
    (lambda tmp, files: hf_folder(tmp, files, {}, name="weights.npz"), "is a folder without model.safetensors or "
                                                                       "pytorch_model.bin"),
    (lambda tmp, files: truncated(tmp, files / "torchvision-resnet18.safetensors"),
     "is not a readable safetensors file"),
    (lambda tmp, files: truncated(tmp, files / "torchvision-resnet18.pth"), "is not a readable PyTorch file"),
    (lambda tmp, files: hf_folder(tmp, files, {"architecture": ["resnet18"]}), "is not timm's config.json"),
    (lambda tmp, files: hf_folder(tmp, files, {"architecture": "resnet18", "pretrained_cfg": "in1k"}),
     "is not timm's config.json"),
    (lambda tmp, files: hf_folder(tmp, files, {"pretrained_cfg": {"mean": [0.5, 0.5, 0.5, 0.5]}}),
     r"pretrained_cfg.mean is not three numbers \(\[0.5, 0.5, 0.5, 0.5\]\)"),
    (lambda tmp, files: written(tmp / "page.pth", b"<!DOCTYPE html><html>model card</html>"),
     "page.pth is a web page, not PyTorch weights \\(for Hugging Face, download the file's resolve/ URL"),
    (lambda tmp, files: written(tmp / "renamed.bin", (files / "torchvision-resnet18.safetensors").read_bytes()),
     "renamed.bin is a safetensors file, not PyTorch weights: name it renamed.safetensors"),
    (lambda tmp, files: files / "with-a-string.pth", r"is not a state dict of tensors: it holds note \(str\)$"),
])
def test_broken_or_foreign_weights_get_one_clear_error(torch_files, tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        read_pretrained(make(tmp_path, torch_files))


def test_a_hugging_face_folder_in_a_bucket_and_a_file_over_http_load_like_local_ones(torch_files, bucket,
                                                                                     http_server, tmp_path):
    """As the platform passes them: an obs:// folder (config.json + model.safetensors), a .pth over http(s)."""
    import staging
    import storage
    storage.FsspecStorage().copy_parallel(torch_files / "hf-timm-resnet50", f"s3://{bucket}/timm/resnet50.a1_in1k")
    base, served = http_server
    shutil.copy(torch_files / "torchvision-resnet18.pth", served / "resnet18-f37072fd.pth")
    inputs, expected = np.load(torch_files / "inputs.npz"), np.load(torch_files / "logits.npz")
    for url, arch, classes, model in ((f"obs://{bucket}/timm/resnet50.a1_in1k/", "resnet50", 10, "timm-resnet50"),
                                      (f"{base}/resnet18-f37072fd.pth", "resnet18", 1000, "torchvision-resnet18")):
        local = staging.stage_in(url, "pretrain_url", tmp_path / "cache")
        messages = []
        np.testing.assert_allclose(our_logits(local, arch, classes, inputs["75"], log=messages.append),
                                   expected[f"{model}/75"], rtol=0, atol=1e-4, err_msg=url)
        assert "(torchvision/timm checkpoint" in messages[0]


def written(path, data):
    path.write_bytes(data)
    return path


def truncated(tmp_path, source):
    target = tmp_path / source.name
    target.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    return target


# ---------------------------------------------------------------- fine-tuning jobs

def ours_of_torchvision(name):
    """torchvision's parameter name -> ours, spelled out independently of checkpoints.py."""
    name = re.sub(r"^bn1\.", "norm.", name)
    name = re.sub(r"^(layer\d\.\d+)\.bn(\d)\.", r"\1.norm\2.", name)
    name = name.replace(".downsample.", ".down_sample.")
    if re.search(r"(norm\d?|down_sample\.1)\.(weight|bias|running_mean|running_var)$", name):
        name = re.sub(r"\.weight$", ".gamma", name)
        name = re.sub(r"\.bias$", ".beta", name)
        name = re.sub(r"\.running_mean$", ".moving_mean", name)
        name = re.sub(r"\.running_var$", ".moving_variance", name)
    return name


@pytest.fixture(scope="module")
def learnable(module_tmp):
    """Four colour-and-shape classes at 32x32: 320 train and 80 val images."""
    return make_demo_data(module_tmp / "shapes", train=320, val=80, num_classes=4, seed=11)[0]


QUICK = ["--arch", "resnet18", "--image_size", 32, "--batch_size", 32, "--aim_system_metrics", "false"]


@pytest.mark.slow
def test_fine_tuning_a_frozen_torchvision_backbone_carries_every_weight_and_learns(torch_files, learnable, tmp_path):
    """The job reads the .pth with PyTorch (installed here), trains a head on the frozen backbone, and the saved
    network holds torchvision's weights bit for bit, with a head that learned the classes."""
    from safetensors.numpy import load_file
    out = tmp_path / "out"
    result = run_train("--data_url", learnable, "--output_url", out, "--pretrain_url",
                       torch_files / "torchvision-resnet18.pth", "--freeze", "--epochs", 12, "--lr", 0.05, *QUICK)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(torchvision/timm checkpoint, pytorch padding); 100/100 backbone, head re-initialised" in result.stdout
    torchvision_weights = load_file(str(torch_files / "torchvision-resnet18.safetensors"))  # the same tensors
    saved = ms.load_checkpoint(str(out / "resnet18-best.ckpt"))
    backbone = {ours_of_torchvision(n): v for n, v in torchvision_weights.items()
                if not n.startswith("fc.") and not n.endswith("num_batches_tracked")}
    assert len(backbone) == 100
    for name, value in backbone.items():
        assert np.array_equal(saved[name].asnumpy(), value), name
    assert str(saved["resnet_padding"]) == "pytorch"
    history = read_json(out / "metrics.json")
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert max(r["val_accuracy"] for r in history) >= 0.5  # twice chance; 0.65 measured (a random backbone)


@pytest.mark.slow
def test_without_pytorch_the_pth_is_refused_with_the_command_and_its_conversion_trains(torch_files, learnable,
                                                                                       tmp_path):
    """The cloud images have no PyTorch: the job names the conversion, torch_weights.py makes the .safetensors
    (with PyTorch, on a laptop), and the job fine-tunes the whole network from it with no PyTorch at all, exporting an
    ONNX graph checked against MindSpore."""
    env, attempts = without(tmp_path, "torch")
    pth = tmp_path / "resnet18-imagenet.pth"
    shutil.copy(torch_files / "torchvision-resnet18.pth", pth)
    refused = run_train("--data_url", learnable, "--output_url", tmp_path / "refused", "--pretrain_url", pth,
                        "--epochs", 1, *QUICK, env=env)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert stderr_lines(refused)[-1] == (
        f"error: {pth} is a PyTorch pickle, and reading one safely needs PyTorch, which is not installed here: "
        f"convert it once where PyTorch is, with `python torch_weights.py resnet18-imagenet.pth` (writes "
        f"resnet18-imagenet.safetensors), and pass the .safetensors file instead")
    assert not list((tmp_path / "refused").rglob("*.*"))  # nothing written

    converted = run_script(TRAIN_DIR / "torch_weights.py", pth)
    assert converted.returncode == 0, converted.stderr[-2000:]
    assert converted.stdout.strip() == f"wrote 122 tensors to {pth.with_suffix('.safetensors')}"

    attempts.unlink()
    out = tmp_path / "out"
    result = run_train("--data_url", learnable, "--output_url", out, "--pretrain_url",
                       pth.with_suffix(".safetensors"), "--epochs", 2, "--lr", 0.01, *QUICK, env=env, onnx=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not attempts.exists()  # PyTorch was not even tried
    assert "(torchvision/timm checkpoint, pytorch padding); 100/100 backbone" in result.stdout
    assert re.search(r"export: resnet18-best.onnx agrees with the model on \d+ validation images", result.stdout)
    assert len(read_json(out / "metrics.json")) == 2
    labels = read_json(out / "labels.json")
    assert labels["padding"] == "pytorch"
    # Resuming must build the same network: without the weights that set its padding, it is refused
    resumed = run_train("--data_url", learnable, "--output_url", out, "--resume", "auto", "--epochs", 3, *QUICK,
                        env=env)
    assert resumed.returncode == 2 and stderr_lines(resumed)[-1] == (
        f"error: {out / 'resume.ckpt'} is of a network padded 'pytorch' (as the weights it started from were "
        f"trained), this job's is padded 'same': resume it with the same --pretrain_url")
    assert len(read_json(out / "metrics.json")) == 2 and read_json(out / "labels.json") == labels


def test_converting_a_folder_keeps_its_config_and_nothing_is_ever_overwritten(torch_files, tmp_path):
    folder = tmp_path / "resnet34.a1_in1k"  # a dot in the name: the default target stays inside the folder
    shutil.copytree(torch_files / "hf-timm-resnet34-bin", folder)
    converted = run_script(TRAIN_DIR / "torch_weights.py", folder)
    assert converted.returncode == 0, converted.stderr[-2000:]
    assert converted.stdout.strip() == f"wrote 218 tensors to {folder / 'model.safetensors'}"
    (folder / "pytorch_model.bin").unlink()  # as on a machine without PyTorch: the folder is read from the new file
    inputs, expected = np.load(torch_files / "inputs.npz"), np.load(torch_files / "logits.npz")
    messages = []
    np.testing.assert_allclose(our_logits(folder, "resnet34", 7, inputs["75"], log=messages.append),
                               expected["timm-resnet34/75"], rtol=0, atol=1e-4)
    assert "(torchvision/timm checkpoint of resnet34 random, pytorch padding)" in messages[0]
    before = (folder / "model.safetensors").read_bytes()
    for args, message in (([folder], "model.safetensors exists already"),
                          ([torch_files / "torchvision-resnet18.pth", torch_files / "torchvision-resnet18.pth"],
                           "the converted weights are safetensors: name the file *.safetensors"),
                          ([torch_files / "torchvision-resnet18.pth", folder / "model.safetensors"],
                           "exists already")):
        refused = run_script(TRAIN_DIR / "torch_weights.py", *args)
        assert refused.returncode == 2 and message in stderr_lines(refused)[-1], refused.stderr
    assert (folder / "model.safetensors").read_bytes() == before


def test_bfloat16_safetensors_are_converted_to_float32(torch_files, tmp_path):
    from safetensors.numpy import load_file
    source = tmp_path / "resnet18-bf16.safetensors"
    shutil.copy(torch_files / "resnet18-bf16.safetensors", source)
    converted = run_script(TRAIN_DIR / "torch_weights.py", source)
    assert converted.returncode == 0, converted.stderr[-2000:]
    arrays = load_file(str(tmp_path / "resnet18-bf16-float32.safetensors"))
    assert arrays["conv1.weight"].dtype == np.float32
    original = load_file(str(torch_files / "torchvision-resnet18.safetensors"))["conv1.weight"]
    np.testing.assert_allclose(arrays["conv1.weight"], original, rtol=1 / 128, atol=1e-6)  # bfloat16's 8 bits
    assert read_pretrained(tmp_path / "resnet18-bf16-float32.safetensors").padding == "pytorch"


def test_an_archived_hugging_face_folder_is_found_inside_its_archive(torch_files, tmp_path):
    import tarfile

    import staging
    with tarfile.open(tmp_path / "resnet50.a1_in1k.tar.gz", "w:gz") as archive:
        archive.add(torch_files / "hf-timm-resnet50", arcname="resnet50.a1_in1k")
    staged = staging.stage_in(tmp_path / "resnet50.a1_in1k.tar.gz", "pretrain_url", tmp_path / "cache")
    assert read_pretrained(staged).config["architecture"] == "resnet50"


def test_converting_refuses_what_it_cannot_read_safely_and_leaves_no_partial_file(torch_files, tmp_path):
    hostile = tmp_path / "hostile.pth"
    shutil.copy(torch_files / "hostile.pth", hostile)
    result = run_script(TRAIN_DIR / "torch_weights.py", hostile)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "holds Python objects besides tensors" in stderr_lines(result)[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile.pth"] and not (torch_files / "PWNED").exists()
    missing = run_script(TRAIN_DIR / "torch_weights.py", tmp_path / "nothing.pth")
    assert missing.returncode == 2 and stderr_lines(missing)[-1] == f"error: {tmp_path / 'nothing.pth'} does not exist"


def test_weights_normalised_otherwise_get_a_warning_and_imagenets_none(torch_files, capsys):
    import train
    train.warn_if_normalised_otherwise(read_pretrained(torch_files / "hf-timm-resnet34-bin"))  # mean/std 0.5
    train.warn_if_normalised_otherwise(read_pretrained(torch_files / "hf-timm-resnet50"))  # ImageNet's
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" was trained")[0] for line in lines] == [f"warning: {torch_files / 'hf-timm-resnet34-bin'}"] * 2
    assert "normalised with mean [0.5, 0.5, 0.5]" in lines[0] and "normalised with std [0.5, 0.5, 0.5]" in lines[1]
