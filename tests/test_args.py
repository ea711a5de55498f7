"""The command line as the platform uses it: aliases, --k=v, string values and booleans, unknown flags."""
import os

import numpy as np
import pytest

import runtime
import train_step
from args import parse_args
from errors import UserError


def parse(*argv):
    warnings = []
    args = parse_args(list(argv), warn=warnings.append)
    return args, warnings


@pytest.mark.parametrize("flag", ["--data_url", "--data_path"])
def test_data_aliases(flag):
    assert parse(flag, "/d")[0].data_url == "/d"


@pytest.mark.parametrize("flag", ["--pretrain_url", "--pretrain_path"])
def test_pretrain_aliases(flag):
    assert parse("--data_url", "/d", flag, "/p.ckpt")[0].pretrain_url == "/p.ckpt"


@pytest.mark.parametrize("flag", ["--output_url", "--output_path", "--train_url"])
def test_output_aliases(flag):
    assert parse("--data_url", "/d", f"{flag}=/out")[0].output_url == "/out"


@pytest.mark.parametrize("other", ["--output_url", "--train_url"])
def test_the_platforms_output_path_wins_with_a_warning(other):
    args, warnings = parse("--data_url", "/d", other, "s3://b/mine?token=secret", "--output_path", "/platform/out")
    assert args.output_url == "/platform/out"
    assert warnings == [f"warning: writing the outputs to --output_path /platform/out, not to {other} s3://b/mine?..."]
    args, warnings = parse("--data_url", "/d", other, "/same", "--output_path=/same")
    assert args.output_url == "/same" and warnings == []
    args, warnings = parse("--data_url", "/d", "--output_url", "/a", "--train_url", "/b")
    assert args.output_url == "/a" and warnings == ["warning: writing the outputs to --output_url /a, not to "
                                                    "--train_url /b"]
    assert parse("--data_url", "/d")[0].output_url == "output" and not hasattr(args, "output_path")
    args, warnings = parse("--data_url", "/d", "--output_url", "/good", "--output_path=")  # empty: names nothing
    assert args.output_url == "/good" and warnings == []
    args, warnings = parse("--data_url", "/d", "--output_url", "obs://b/out", "--output_path", "obs://b/out/")
    assert args.output_url == "obs://b/out/" and warnings == []  # the same folder


def test_equals_and_space_forms_give_typed_values():
    args, _ = parse("--data_url=/d", "--epochs=30", "--lr", "0.05", "--batch_size=64", "--warmup_epochs=0.5",
                    "--aim_repo=/aim", "--device_target=cpu", "--arch=ResNet18")
    assert (args.epochs, args.lr, args.batch_size, args.warmup_epochs) == (30, 0.05, 64, 0.5)
    assert (args.aim_repo, args.device_target, args.arch) == ("/aim", "CPU", "resnet18")


def test_defaults_suit_fine_tuning():
    args, _ = parse("--data_url", "/d")
    assert (args.arch, args.image_size, args.lr, args.momentum, args.freeze) == ("resnet50", 224, 0.001, 0.9, False)
    assert args.aim_repo is None and args.pretrain_url is None and args.num_classes is None


@pytest.mark.parametrize("text,value", [("true", True), ("True", True), ("1", True), ("false", False),
                                        ("FALSE", False), ("0", False)])
def test_string_booleans(text, value):
    assert parse("--data_url", "/d", f"--freeze={text}")[0].freeze is value
    assert parse("--data_url", "/d", "--freeze", text)[0].freeze is value


def test_bare_boolean_flag_means_true():
    assert parse("--data_url", "/d", "--freeze")[0].freeze is True


def test_unknown_flags_warn_once_and_are_ignored():
    args, warnings = parse("--data_url", "/d", "--init_method", "tcp://1.2.3.4:5", "--num_gpus=1", "--epochs", "3")
    assert args.epochs == 3
    assert len(warnings) == 1
    assert "--init_method" in warnings[0] and "--num_gpus=1" in warnings[0]


def test_the_largest_values_a_real_job_uses_are_accepted():
    args, _ = parse("--data_url=/d", "--epochs=10000", "--warmup_epochs=10000", "--image_size=4096",
                    "--num_classes=100000", "--feature_views=100", "--seed=4294967295", "--lr=1e-9")
    assert (args.epochs, args.image_size, args.num_classes, args.seed) == (10000, 4096, 100000, 2**32 - 1)


def test_unknown_flags_show_urls_redacted():
    _, warnings = parse("--data_url=/d", "--data_ur=https://me:pw@host/d.zip?sig=abc", "s3://k:pw@b/x?t=abc")
    assert "--data_ur=https://host/d.zip?..." in warnings[0] and "s3://b/x?..." in warnings[0]
    assert "pw" not in warnings[0] and "abc" not in warnings[0]


def test_no_abbreviations_of_known_flags():
    # A platform flag such as --data must not be taken for --data_url.
    args, warnings = parse("--data_url", "/d", "--data", "/other")
    assert args.data_url == "/d" and warnings


@pytest.mark.parametrize("argv,needle", [
    (["--data_url", "/d", "--epochs", "ten"], "--epochs"),
    (["--data_url", "/d", "--lr=abc"], "--lr"),
    (["--data_url", "/d", "--epochs=0"], "--epochs"),
    (["--data_url", "/d", "--freeze=maybe"], "--freeze"),
    (["--data_url", "/d", "--arch", "vgg16"], "--arch"),
    (["--data_url", "/d", "--device_target", "TPU"], "--device_target"),
    (["--epochs", "3"], "--data_url"),
    (["--data_url", "/d", "--warmup_epochs=nan"], "--warmup_epochs: must be a finite number"),
    (["--data_url", "/d", "--lr=-inf"], "--lr: must be a finite number"),
    (["--data_url", "/d", "--momentum", "1e999"], "--momentum: must be a finite number"),
    (["--data_url", "/d", "--epochs=10001"], "--epochs: must be <= 10000 (the per-step learning-rate schedule"),
    (["--data_url", "/d", "--image_size=4097"], "--image_size: must be <= 4096"),
    (["--data_url", "/d", "--feature_views=101"], "--feature_views: must be <= 100"),
    (["--data_url", "/d", "--seed=4294967296"], "--seed: must be <= 4294967295"),
    (["--data_url", "/d", "--io_timeout=1e9"], "--io_timeout: must be <= 86400"),
])
def test_bad_values_give_one_error_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0]


@pytest.mark.parametrize("requested,available,chosen", [
    ("auto", ["CPU"], "CPU"),
    ("auto", ["GPU", "CPU"], "GPU"),
    ("auto", ["CPU", "Ascend"], "Ascend"),
    ("CPU", ["Ascend", "CPU"], "CPU"),
    ("GPU", ["GPU", "CPU"], "GPU"),
])
def test_device_choice(requested, available, chosen):
    assert runtime.choose_device(requested, available) == chosen


@pytest.mark.parametrize("flag, device, exports, warns", [
    (None, "Ascend", True, False), (True, "Ascend", True, False), (False, "Ascend", False, False),
    (None, "CPU", False, False), (None, "GPU", False, False), (False, "CPU", False, False),
    (True, "CPU", False, True), (True, "GPU", False, True),
])
def test_air_is_exported_on_ascend_by_default_and_asked_for_elsewhere_is_one_warning(flag, device, exports, warns,
                                                                                     capsys):
    assert parse_args(["--data_url", "d", *([] if flag is None else ["--export_air", str(flag)])]).export_air is flag
    assert runtime.exports_air(flag, device) is exports
    err = capsys.readouterr().err.splitlines()
    assert err == ([f"warning: --export_air: AIR export needs an Ascend device (this job runs on {device}); no .air "
                    f"is written"] if warns else [])


def test_unavailable_device_is_a_user_error():
    with pytest.raises(UserError, match="GPU is not available"):
        runtime.choose_device("GPU", ["CPU"])


def test_this_machine_detects_cpu_only():
    assert runtime.available_devices() == ["CPU"]
    with pytest.raises(UserError, match="Ascend"):
        runtime.setup_device("Ascend")


def test_cpu_isa_cap_respects_the_user():
    env = {}
    runtime.tune_cpu_env(env)
    assert env == {"ONEDNN_MAX_CPU_ISA": "AVX2"} or os.uname().machine not in ("x86_64", "AMD64")
    env = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}
    runtime.tune_cpu_env(env)
    assert env["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE"


def test_cosine_schedule_with_warmup():
    lr = train_step.cosine_lr(0.1, epochs=4, steps_per_epoch=10, warmup_epochs=1)
    assert len(lr) == 40 and lr.dtype == np.float32
    assert np.all(np.diff(lr[:10]) > 0) and lr[9] == pytest.approx(0.1)
    assert np.all(np.diff(lr[10:]) < 0) and lr[10] == pytest.approx(0.1) and lr[-1] < 0.001
    assert train_step.cosine_lr(0.1, 2, 5)[0] == pytest.approx(0.1)  # no warmup: starts at the peak
