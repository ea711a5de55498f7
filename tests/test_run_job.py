"""The shipped Xihe configs, the local runner that executes them as the platform would, and the model fetcher."""
import json
import os
import subprocess
import sys

import mindspore as ms
import pytest
from conftest import ROOT, aim_process, get_json

import run_job
import xihe_form
from make_demo_data import make_split, write_cifar
from resnet import create_model

RUNNER = ROOT / "train" / "run_job.py"
SHIPPED = ["config.json", "config_aim.json", "configs/canidae_fixed_feature.json", "configs/eval.json",
           "configs/predict.json"]
FETCH_MODEL = ROOT / "inference" / "fetch_model.py"


def run_runner(*args, timeout=600):
    return subprocess.run([sys.executable, str(RUNNER), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def shipped(name):
    return json.loads((ROOT / name).read_text())


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_are_valid_xihe_jobs(name):
    config = shipped(name)
    assert set(run_job.REQUIRED) <= set(config) and "hyperparameters" not in config
    assert config["code_dir"] == "train/train_dir/" and config["boot_file"] in ("train.py", "eval.py", "predict.py")
    assert config["frameworks"]["framework_version"] == "mindspore_2.2.10-cann_7.0.RC1-py_3.9-euler_2.8.3"
    assert all(isinstance(h["value"], str) for h in config["hypeparameters"])
    assert xihe_form.problems(config) == []  # the server's rules
    assert all(xihe_form.hub_input(e["input_url"]) for e in config["inputs"])  # inputs from the hub, no downloads
    run_job.validate(config)  # names are flags train.py knows, code_dir and boot_file exist
    result = run_runner(name, "--form")
    assert result.returncode == 0 and not [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert f"name:         {config['job_name']}" in result.stdout
    inputs = [arg for entry in config["inputs"] for arg in ("--input", f"{entry['name']}=/{entry['name']}")]
    checked = run_runner(name, "--check", *inputs)
    assert checked.returncode == 0, checked.stderr
    assert [line for line in checked.stderr.splitlines() if line.strip()] == \
        [f"warning: {warning}" for warning in xihe_form.warnings(config)]  # Canidae's YOUR_NAME only


def test_the_form_is_filled_in_field_by_field():
    result = run_runner("configs/canidae_fixed_feature.json", "--form")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:4] == [
        "name:         resnet50-canidae-fixed-feature",
        "description:  Dogs vs wolves (Canidae, from ImageNet): train only the head on a frozen ImageNet ResNet50",
        "code_dir:     train/train_dir/", "boot_file:    train.py"]
    assert "    freeze = true" in result.stdout
    assert "    key data_url: owner YOUR_NAME, name canidae, file Canidae_data.zip" in result.stdout
    assert "    key pretrain_url: owner YOUR_NAME, name resnet50_imagenet, file resnet50_224_new.ckpt" in result.stdout
    assert "output:       on" in result.stdout and "aim:          off" in result.stdout
    # The placeholder is the user's to fill in: valid, with a warning for each input that names it.
    assert result.stderr.count("names YOUR_NAME: upload it to your own Xihe account") == 2


def test_aim_config_wires_an_aim_repo_output():
    outputs = {o["name"]: o["output_dir"] for o in shipped("config_aim.json")["outputs"]}
    assert set(outputs) == {"output_path", "aim_repo"} and outputs["aim_repo"] != outputs["output_path"]


def test_runner_passes_everything_as_the_platform_does(tmp_path):
    result = run_runner("config_aim.json", "--input", "data_url=/data/cifar", "--hub", tmp_path, "--check",
                        "--input", "pretrain_url=https://host/w.ckpt", "--set", "epochs=3", "--set", "seed=9",
                        "--work", tmp_path / "work")
    assert result.returncode == 0, result.stderr
    command = result.stdout.split("running: ", 1)[1].split()
    assert command[0].endswith("train/train_dir/train.py")
    assert "--epochs=3" in command and "--seed=9" in command and "--batch_size=32" in command
    assert "--data_url=/data/cifar" in command and "--pretrain_url=https://host/w.ckpt" in command
    assert f"--output_path={tmp_path / 'work' / 'train' / 'output'}" in command
    assert f"--aim_repo={tmp_path / 'work' / 'train' / 'aim'}" in command
    assert "pip-requirements.txt" in result.stdout and "not installed" in result.stdout


def test_check_shows_urls_redacted_and_writes_nothing(tmp_path):
    (tmp_path / "earlier.log").write_text("a previous job's log")
    before = sorted(tmp_path.rglob("*"))
    result = subprocess.run([sys.executable, str(RUNNER), ROOT / "config_aim.json", "--check",  # default --work
                             "--input", "data_url=obs://bucket/cifar/", "--input",
                             "pretrain_url=https://me:s3cr3t@host/w.ckpt?X-Amz-Signature=s3cr3t"],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--pretrain_url=https://host/w.ckpt?..." in result.stdout
    assert "--data_url=obs://bucket/cifar/" in result.stdout
    assert "s3cr3t" not in result.stdout + result.stderr
    assert f"--aim_repo={tmp_path / 'job-work'}" in result.stdout
    assert sorted(tmp_path.rglob("*")) == before  # not even the output folders


def test_hub_paths_resolve_under_hub(tmp_path):
    (tmp_path / "hub" / "datasets" / "drizzlezyk" / "cifar10").mkdir(parents=True)
    model = tmp_path / "hub" / "models" / "MindSpore" / "ResNet50_model" / "resnet50_224_new.ckpt"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"x")
    result = run_runner("config.json", "--hub", tmp_path / "hub", "--check")
    assert result.returncode == 0, result.stderr
    assert f"--pretrain_url={model}" in result.stdout


def write_config(tmp_path, text=None, **changes):
    config = shipped("config.json")
    config.update(changes)
    path = tmp_path / "nested" / "my_config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text is not None else json.dumps(config, indent=2))
    return path


def renamed_hyperparameters(tmp_path):
    config = shipped("config.json")
    config["hyperparameters"] = config.pop("hypeparameters")
    return write_config(tmp_path, json.dumps(config))


MISTAKES = {
    "JSON that does not parse": (lambda t: write_config(t, text='{\n  "SDK": "ModelArts",\n  "job_name": x\n}'),
                                 ["my_config.json:3:", "plain JSON"]),
    "missing boot_file": (lambda t: write_config(t, boot_file="main.py"), ["boot_file 'main.py' does not exist"]),
    "hyperparameters spelling": (renamed_hyperparameters, ['"hypeparameters" (sic)', "rename"]),
    "unknown input name": (lambda t: write_config(t, inputs=[{"name": "dataset_url",
                                                              "input_url": "datasets/drizzlezyk/cifar10/"}]),
                           ["input 'dataset_url'", "did you mean 'data_url'"]),
    "non-string value": (lambda t: write_config(t, hypeparameters=[{"name": "epochs", "value": 10}]),
                         ["hypeparameters[0].value must be a string", '"10"']),
    "missing code_dir": (lambda t: write_config(t, code_dir="train/trainDir/"), ["code_dir 'train/trainDir/'"]),
    "hyperparameter typo": (lambda t: write_config(t, hypeparameters=[{"name": "epoch", "value": "1"}]),
                            ["did you mean 'epochs'"]),
    "duplicate name": (lambda t: write_config(t, hypeparameters=[{"name": "data_url", "value": "/x"}]),
                       ["'data_url' is used more than once"]),
    "missing field": (lambda t: write_config(t, text=json.dumps({k: v for k, v in shipped("config.json").items()
                                                                 if k != "log_url"})), ["missing field 'log_url'"]),
    "docs form with // comments": (lambda t: write_config(t, text=DOCS_FORM), ["//", "--strip-comments"]),
}
DOCS_FORM = """{
"SDK": "ModelArts",               //training platform
"code_dir": "train/train_dir/",   //code folder, see https://xihe.mindspore.cn/docs
"boot_file": "train.py",
"outputs": [{"output_dir": "train/output/", "name": "output_path"}],
"hypeparameters": [{"name": "epochs", "value": "1"}],
"frameworks": {"framework_type": "Ascend-Powered-Engine",
    "framework_version": "mindspore_2.2.10-cann_7.0.RC1-py_3.9-euler_2.8.3",},
"train_instance_type": "modelarts.kat1.xlarge.public",
"log_url": "train/log/",
"env_variables": {},
"job_description": "a // inside a string is not a comment",
"inputs": [{"input_url": "datasets/drizzlezyk/cifar10/", "name": "data_url"}],
"job_name": "docs-form"   // the job's name
}
"""


@pytest.mark.parametrize("case", sorted(MISTAKES))
def test_config_mistakes_give_one_line_with_a_hint(case, tmp_path):
    build, needles = MISTAKES[case]
    result = run_runner(build(tmp_path), "--check", "--input", "data_url=/d", "--input", "pretrain_url=/p")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert all(needle in lines[0] for needle in needles), lines[0]


def test_docs_form_runs_with_strip_comments_and_a_warning(tmp_path):
    result = run_runner(write_config(tmp_path, text=DOCS_FORM), "--check", "--strip-comments", "--input",
                        "data_url=/data/")
    assert result.returncode == 0, result.stderr
    assert "warning:" in result.stderr and "line(s) 2, 3, 14" in result.stderr
    assert "--data_url=/data/" in result.stdout


def changed(**hyper):
    config = shipped("config.json")
    config["hypeparameters"] = [{"name": k, "value": v} for k, v in hyper.items()]
    return config


def with_input(url):
    config = shipped("config.json")
    config["inputs"] = [{"name": "data_url", "input_url": url}]
    return config


SERVER_RULES = {  # name: (what to change in config.json, what the one error line must say)
    "job name too short": ({"job_name": "cifa"}, "job_name 'cifa' is 4 characters; the platform allows 5-50"),
    "job name with a dot": ({"job_name": "resnet.v2"}, "job_name 'resnet.v2': only letters, digits, '_' and '-'"),
    "description over 100 bytes": ({"job_description": "é" * 51}, "job_description is 102 bytes"),
    "description that grows when escaped": ({"job_description": "a & b " * 16}, "bytes once HTML-escaped"),
    "code_dir with a dot": ({"code_dir": "train/train_dir.v2/"}, "code_dir 'train/train_dir.v2/': only letters"),
    "code_dir over 50": ({"code_dir": "train/" + "d" * 45 + "/"}, "code_dir 'train/ddd"),
    "boot_file outside code_dir": ({"boot_file": "../x.py"}, "boot_file '../x.py': folders of letters"),
    "hyperparameter key over 20": (changed(a_very_long_hyperparameter="1"),
                                   "hypeparameter key 'a_very_long_hyperparameter' is 26 characters"),
    "hyperparameter value over 40": (changed(experiment="e" * 41), "the value of hypeparameter 'experiment'"),
    "job name with a final newline": ({"job_name": "resnet50-cifar10\n"}, "only letters, digits, '_' and '-'"),
    "description with NUL characters": ({"job_description": "d" * 98 + "\0"}, "is 101 bytes once HTML-escaped"),
    "boot_file over 50 with a leading /": ({"boot_file": "/" + "a" * 47 + ".py"}, "is 51 characters"),
    "an input without a key": ({"inputs": [{"name": "", "input_url": "datasets/drizzlezyk/cifar10/"}]},
                               "the key of input '' is 0 characters; the platform allows 1-20"),
    "env value over 40": ({"env_variables": {"GLOG_v": "3" * 41}}, "the value of env_variables 'GLOG_v'"),
    "input downloaded from the internet": (with_input("https://host/cifar.zip"), "is not a hub path"),
    "input owned by root": (with_input("datasets/root/cifar10/"), "owner 'root' is not a Xihe user name"),
    "input repository name too short": (with_input("datasets/drizzlezyk/c10/"), "dataset 'c10' is not a Xihe repo"),
    "input file over 50": (with_input("datasets/drizzlezyk/cifar10/" + "f" * 51), "the file of input 'data_url'"),
    "an output the form has no switch for": ({"outputs": [{"name": "train_url", "output_dir": "out/"}]},
                                             "output 'train_url': the platform has two outputs"),
    "a framework version not offered": ({"frameworks": {"framework_type": "Ascend-Powered-Engine",
                                                        "framework_version": "mindspore_2.3.0"}},
                                        "compute Ascend-Powered-Engine / modelarts.kat1.xlarge.public / mindspore_2.3"),
    "GPU flavor with the Ascend engine": ({"train_instance_type": "modelarts.p3.large.public"},
                                          "is not one the platform offers"),
}


@pytest.mark.parametrize("case", sorted(SERVER_RULES))
def test_each_server_rule_is_checked_with_its_own_line_and_nothing_written(case, tmp_path):
    change, needle = SERVER_RULES[case]
    config = change if "SDK" in change else {**shipped("config.json"), **change}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    before = sorted(tmp_path.rglob("*"))
    for mode in ("--check", "--form"):
        result = subprocess.run([sys.executable, str(RUNNER), path, mode, "--input", "data_url=/d", "--input",
                                 "pretrain_url=/p"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert sorted(tmp_path.rglob("*")) == before


def test_what_the_platform_accepts_but_mangles_is_a_warning(tmp_path):
    config = {**shipped("config.json"), "boot_file": "a/../train.py"}  # cleaned by the server, as here
    config["hypeparameters"] = [{"name": "experiment", "value": "cats&dogs"}]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    result = run_runner(path, "--check", "--input", "data_url=/d", "--input", "pretrain_url=/p")
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line == ("warning: the value of hypeparameter 'experiment' holds '&', which the platform passes on "
                    "HTML-escaped (&amp;): the job will not get what you wrote")
    assert "train/train_dir/train.py --experiment=cats&dogs" in result.stdout


def test_every_broken_rule_gets_a_line(tmp_path):
    config = {**shipped("config.json"), "job_name": "x.y", "job_description": "d" * 101}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    result = run_runner(path, "--form")
    assert result.returncode == 2
    assert [line.split(":")[0] for line in result.stderr.splitlines()] == ["error"] * 3  # short, a dot, too long


def test_fetch_model_places_files_by_basename(tmp_path):
    out = tmp_path / "job-output"
    out.mkdir()
    (out / "resnet50-best.onnx").write_bytes(b"graph")
    (out / "labels.json").write_text('{"class_names": ["a"]}')
    (out / "metrics.json").write_text("[]")
    paths = json.loads((ROOT / "inference" / "config.json").read_text())["model_path"]
    sys.path.insert(0, str(ROOT / "inference"))
    import fetch_model
    written = fetch_model.fetch(paths, source=out, target=tmp_path)
    assert sorted(p.name for p in written) == ["labels.json", "metrics.json", "resnet50-best.onnx"]
    assert (tmp_path / "resnet50-best.onnx").read_bytes() == b"graph"
    mine = tmp_path / "config.json"
    mine.write_text(json.dumps({"model_path": [p.replace("YOUR_NAME", "alice") for p in paths]}))
    result = subprocess.run([sys.executable, str(FETCH_MODEL), "--from", tmp_path / "empty", "--config", mine],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: model file") and "Traceback" not in result.stderr


def test_the_shipped_placeholder_is_named_by_the_fetcher_and_the_app(tmp_path):
    """inference/config.json ships with YOUR_NAME: the pod would fail to download it; say what to change."""
    fetched = subprocess.run([sys.executable, str(FETCH_MODEL), "--from", tmp_path], capture_output=True, text=True)
    assert fetched.returncode == 2 and "Traceback" not in fetched.stderr
    (line,) = fetched.stderr.splitlines()
    assert line.startswith("error: ") and "still names YOUR_NAME: put your Xihe user name" in line
    pod = tmp_path / "inference"  # the pod's clone, before (or after a failed) download: config.json, no model
    pod.mkdir()
    (pod / "config.json").write_text((ROOT / "inference" / "config.json").read_text())
    sys.path.insert(0, str(ROOT / "inference"))
    import predictor
    from errors import UserError
    with pytest.raises(UserError, match=r"no model .* still names YOUR_NAME: put your Xihe user name"):
        predictor.find_model(pod)


# ---------------------------------------------------------------- whole jobs through the runner

@pytest.fixture(scope="module")
def job_inputs(module_tmp):
    root = module_tmp
    data = write_cifar(root / "cifar-10-batches-bin", make_split(64, 2, 0), make_split(24, 2, 1), ["cat", "dog"])
    weights = root / "resnet18.ckpt"
    ms.save_checkpoint(create_model("resnet18", 1000), str(weights))
    return data, weights


SMALL = ["--set", "epochs=1", "--set", "image_size=32", "--set", "batch_size=16", "--set", "arch=resnet18"]


def run_shipped(config, job_inputs, work, *overrides):
    """A shipped config through the runner, on local inputs, with small overrides."""
    data, weights = job_inputs
    return run_runner(config, "--input", f"data_url={data}", "--input", f"pretrain_url={weights}", "--work", work,
                      *overrides)


@pytest.mark.slow
def test_shipped_config_runs_locally(job_inputs, tmp_path):
    work = tmp_path / "work"
    result = run_shipped("config.json", job_inputs, work, *SMALL)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    outputs = {p.name for p in (work / "train" / "output").iterdir()}
    assert {"resnet18-best.ckpt", "resnet18-best.mindir", "metrics.json", "labels.json", ".aim"} <= outputs
    log = (work / "train" / "log" / "resnet50-cifar10.log").read_text()
    assert "epoch 1/1" in log and "pretrained: loaded" in log


@pytest.mark.slow
def test_runner_propagates_the_exit_code(job_inputs, tmp_path):
    result = run_shipped("config.json", job_inputs, tmp_path / "work", "--set", "lr=fast")
    assert result.returncode == 2
    assert "invalid" in (tmp_path / "work" / "train" / "log" / "resnet50-cifar10.log").read_text()


@pytest.mark.slow
def test_aim_config_run_is_served_by_aim_up(job_inputs, tmp_path):
    work = tmp_path / "work"
    result = run_shipped("config_aim.json", job_inputs, work, *SMALL)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    aim_folder = work / "train" / "aim"
    assert (aim_folder / ".aim").is_dir() and not (work / "train" / "output" / ".aim").exists()
    run_hash = result.stdout.split("Aim run ", 1)[1].split()[0]

    # What Xihe's evaluation image does: aim up --repo <the aim_repo output folder>
    with aim_process("up", "--repo", aim_folder) as port:
        base = f"http://127.0.0.1:{port}/api"
        assert "cifar10-finetune" in [e["name"] for e in get_json(f"{base}/experiments/")]
        info = get_json(f"{base}/runs/{run_hash}/info/", timeout=30)
        assert info["props"]["experiment"]["name"] == "cifar10-finetune"


def test_runner_sets_env_cwd_and_tees_the_log(tmp_path):
    config = {**shipped("config.json"), "code_dir": "tests/fixtures/echo_job/", "boot_file": "echo.py",
              "job_name": "echo-job", "env_variables": {"JOB_FLAG": "on", "EXIT_WITH": "3", "PYTHONPATH": "/opt/libs"},
              "inputs": [{"name": "data_url", "input_url": "datasets/drizzlezyk/cifar10/"}]}
    path = tmp_path / "echo.json"
    path.write_text(json.dumps(config))
    result = run_runner(path, "--work", tmp_path / "work", "--set", "epochs=2", "--input", "data_url=/data/")
    assert result.returncode == 3  # the boot file's exit code
    seen = json.loads(result.stdout.splitlines()[2])
    code_dir = str(ROOT / "tests" / "fixtures" / "echo_job")
    assert seen["JOB_FLAG"] == "on" and seen["cwd"] == code_dir
    assert seen["pythonpath"].split(os.pathsep)[:2] == [code_dir, "/opt/libs"]  # the config's after code_dir
    assert "--epochs=2" in seen["argv"] and "--data_url=/data/" in seen["argv"]
    log = (tmp_path / "work" / "train" / "log" / "echo-job.log").read_text()
    assert '"JOB_FLAG": "on"' in log and "to stderr" in log
