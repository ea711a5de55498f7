"""Run a Xihe training-job config locally, the way the platform runs it, after checking it the way the platform
would (and a little stricter, so mistakes show here rather than after a cloud job fails).

    python train/run_job.py config.json --input data_url=demo/data --input pretrain_url=weights.ckpt \\
        --set epochs=1 --work job-work

- `code_dir` resolves against the repository root; the boot file runs there, with the runner's Python.
- Every hyperparameter is passed as `--name=value` (a string, as the platform does); `--set` overrides or adds one.
- Each input is passed as `--<name>=<path or URL>`: Xihe hub paths (`datasets/owner/name/path`, `models/...`) are
  resolved under `--hub DIR`, or replaced with `--input NAME=URL`.
- Each output is passed as `--<name>=<work>/<output_dir>`; the log goes to `<work>/<log_url>/<job_name>.log`.
- `env_variables` are set (a `PYTHONPATH` after code_dir's; not `PYTHONHOME`). Every URL printed is redacted.
- Nothing is installed: the platform would install `<code_dir>/pip-requirements.txt` first. `--check` writes nothing.
"""
import argparse
import difflib
import functools
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_DIR = ROOT / "train" / "train_dir"
if __name__ == "__main__":  # --check writes nothing, not even bytecode caches in code_dir
    sys.dont_write_bytecode = True
sys.path.insert(0, str(TRAIN_DIR))
from storage import redact  # noqa: E402  the job's own rule for what a log may show of a URL
sys.path.remove(str(TRAIN_DIR))
import xihe_form  # noqa: E402

REQUIRED = {  # field: type, as in the platform's job config
    "SDK": str, "job_name": str, "code_dir": str, "boot_file": str, "inputs": list, "outputs": list,
    "hypeparameters": list, "frameworks": dict, "train_instance_type": str, "log_url": str,
    "env_variables": dict, "job_description": str,
}
JSON_TYPES = {str: "string", list: "array", dict: "object"}
NOT_HONOURED = {"PYTHONHOME": "it would point this machine's Python at the image's standard library"}


class ConfigError(Exception):
    """Mistakes in the config: each reported as one line with a hint."""

    def __init__(self, *lines):
        super().__init__("\n".join(lines))
        self.lines = lines


URL = re.compile(r"[A-Za-z][\w+.-]*://[^\s\"']+")


def scrubbed(text):
    """`text` with every URL in it redacted as the job redacts them: no user:password, no query string."""
    return URL.sub(lambda match: redact(match.group()), str(text))


def warn(message):
    print(f"warning: {scrubbed(message)}", file=sys.stderr, flush=True)


def inside(base, relative, what, where):
    """`base/relative`, refused when it would leave `base`: `../`, an absolute path, a link pointing out."""
    path = base / relative
    if not path.resolve().is_relative_to(base.resolve()):
        raise ConfigError(f"{what} {relative!r} would leave {where} ({base}); give a path inside it")
    return path


# ---------------------------------------------------------------- reading

COMMENT = re.compile(r'("(?:\\.|[^"\\])*")|//[^\n]*')
TRAILING_COMMA = re.compile(r'("(?:\\.|[^"\\])*")|,(\s*[}\]])')


def strip_comments(text):
    """The docs' annotated form: `//` comments and trailing commas removed, strings untouched."""
    text = COMMENT.sub(lambda m: m.group(1) or "", text)
    return TRAILING_COMMA.sub(lambda m: m.group(1) or m.group(2), text)


def read_config(path, allow_comments=False):
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    lines_with_comments = [i for i, line in enumerate(text.splitlines(), 1)
                           if "//" in COMMENT.sub(lambda m: '""' if m.group(1) else m.group(0), line)]
    if lines_with_comments:
        if not allow_comments:
            raise ConfigError(f"{path}:{lines_with_comments[0]}: `//` comments are not JSON and the platform "
                              f"rejects them; delete them (the docs only annotate the fields), or pass "
                              f"--strip-comments to run this copy locally")
        warn(f"{path}: ignoring `//` comments on line(s) {', '.join(map(str, lines_with_comments))}; "
             f"remove them before submitting")
        text = strip_comments(text)
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: {exc.msg} (the file must be plain JSON)") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object {{...}}")
    return config


# ---------------------------------------------------------------- validation

def _entries(config, field, value_key):
    entries = config[field]
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != {"name", value_key}:
            raise ConfigError(f"{field}[{i}] must be {{\"name\": ..., \"{value_key}\": ...}}, got {json.dumps(entry)}")
        for key in ("name", value_key):
            if not isinstance(entry[key], str):
                raise ConfigError(f"{field}[{i}].{key} must be a string (the platform passes strings, e.g. "
                                  f"\"{entry[key]}\"), got {json.dumps(entry[key])}")
    return entries


PARSERS = {"train.py": "get_args_parser", "eval.py": "get_eval_args_parser",  # boot file -> its flags in args.py
           "predict.py": "get_predict_args_parser"}


@functools.lru_cache(maxsize=None)
def known_flags(code_dir, boot_file):
    """The flag names the boot file's parser accepts (train/train_dir/args.py), or None for another boot file."""
    if boot_file.name not in PARSERS or not (code_dir / "args.py").exists():
        return None
    sys.path.insert(0, str(code_dir))
    os.environ.setdefault("GLOG_v", "3")
    try:
        import args
        parser = getattr(args, PARSERS[boot_file.name])()
    except Exception:  # a foreign args.py: no name checks, the boot file will complain itself
        return None
    finally:
        sys.path.remove(str(code_dir))
    return {opt.lstrip("-") for action in parser._actions for opt in action.option_strings}


def _check_names(kind, names, flags):
    for name in names:
        if flags is not None and name not in flags:
            close = difflib.get_close_matches(name, sorted(flags), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "see the boot file's --help"
            raise ConfigError(f"{kind} {name!r} is not a flag the boot file understands; {hint}")


def validate(config):
    """Check the config as the platform would, and that its names are flags the boot file knows; returns
    (code_dir, boot_file) as paths."""
    if "hyperparameters" in config and "hypeparameters" not in config:
        raise ConfigError("the field is spelled \"hypeparameters\" (sic) on the platform; rename \"hyperparameters\"")
    for field, kind in REQUIRED.items():
        if field not in config:
            raise ConfigError(f"missing field {field!r} (see the README's config field table)")
        if not isinstance(config[field], kind):
            raise ConfigError(f"field {field!r} must be a JSON {JSON_TYPES[kind]}, got {json.dumps(config[field])}")
    inputs = _entries(config, "inputs", "input_url")
    outputs = _entries(config, "outputs", "output_dir")
    hyper = _entries(config, "hypeparameters", "value")
    names = [e["name"] for e in inputs + outputs + hyper]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"name {duplicates[0]!r} is used more than once across inputs, outputs and hypeparameters "
                          f"(each becomes one --flag)")
    for key, value in config["env_variables"].items():
        if not isinstance(value, str):
            raise ConfigError(f"env_variables.{key} must be a string, got {json.dumps(value)}")
        if not key or "=" in key or "\0" in key + value:
            raise ConfigError(f"env_variables {key!r} cannot be set (an empty name, '=' in it or a NUL character)")
    broken = xihe_form.problems(config)  # the server's own rules: every one that is broken, a line each
    if broken:
        raise ConfigError(*broken)
    for warning in xihe_form.warnings(config):
        warn(warning)

    # The platform joins both onto the repository's own folder, so a leading '/' stays inside it.
    code_dir = inside(ROOT, config["code_dir"].lstrip("/"), "code_dir", "the repository").resolve()
    if not code_dir.is_dir():
        raise ConfigError(f"code_dir {config['code_dir']!r} does not exist in the repository ({ROOT})")
    boot_file = inside(code_dir, xihe_form.go_clean(config["boot_file"]).lstrip("/"), "boot_file", "code_dir")
    if not boot_file.is_file():
        raise ConfigError(f"boot_file {config['boot_file']!r} does not exist in code_dir {config['code_dir']!r}")

    flags = known_flags(code_dir, boot_file)
    for kind, entries in (("input", inputs), ("output", outputs), ("hypeparameter", hyper)):
        _check_names(kind, [e["name"] for e in entries], flags)

    return code_dir, boot_file


# ---------------------------------------------------------------- running

def _pairs(values, option):
    pairs = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name or "://" in name:
            raise ConfigError(f"{option} takes NAME=VALUE, got {item!r}")
        pairs[name] = value
    return pairs


def resolve_input(name, url, hub):
    if xihe_form.hub_input(url):
        if hub is None:
            raise ConfigError(f"input {name!r} is the Xihe hub path {url!r}; pass --input {name}=PATH_OR_URL, "
                              f"or --hub DIR holding {url}")
        local = Path(hub) / url
        if not local.exists():
            raise ConfigError(f"input {name!r}: {local} does not exist under --hub {hub}")
        return str(local)
    return url


def build_command(config, code_dir, boot_file, work, inputs, overrides, hub):
    hyper = {e["name"]: e["value"] for e in config["hypeparameters"]}
    hyper.update(overrides)
    _check_names("--set", list(overrides), known_flags(code_dir, boot_file))
    unknown_inputs = sorted(set(inputs) - {e["name"] for e in config["inputs"]})
    if unknown_inputs:
        raise ConfigError(f"--input {unknown_inputs[0]!r} is not an input of this config "
                          f"({', '.join(e['name'] for e in config['inputs']) or 'none'}); "
                          f"use --set for hyperparameters")
    argv = [sys.executable, str(boot_file)]
    argv += [f"--{name}={value}" for name, value in hyper.items()]
    for entry in config["inputs"]:
        value = inputs.get(entry["name"]) or resolve_input(entry["name"], entry["input_url"], hub)
        argv.append(f"--{entry['name']}={value}")
    folders = [inside(work, e["output_dir"], f"outputs[{i}].output_dir", "--work").resolve()
               for i, e in enumerate(config["outputs"])]
    argv += [f"--{entry['name']}={folder}" for entry, folder in zip(config["outputs"], folders)]
    return argv, folders


def job_env(config, code_dir):
    """This environment with the config's variables; PYTHONPATH: code_dir, the config's, then this machine's."""
    wanted = config["env_variables"]
    for name in sorted(NOT_HONOURED.keys() & wanted.keys()):
        warn(f"env_variables.{name} is not set for a local run: {NOT_HONOURED[name]}")
    paths = [str(code_dir), wanted.get("PYTHONPATH"), os.environ.get("PYTHONPATH")]
    return {**os.environ, **{k: v for k, v in wanted.items() if k not in NOT_HONOURED},
            "PYTHONPATH": os.pathsep.join(filter(None, paths))}


def _tee(source, sinks):
    for line in iter(source.readline, ""):
        for sink in sinks:
            sink.write(line)
            sink.flush()


def run(argv, cwd, env, log_path, folders):
    for folder in folders:  # only now: --check writes nothing
        folder.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, bufsize=1)
        threads = [threading.Thread(target=_tee, args=(process.stdout, [sys.stdout, log])),
                   threading.Thread(target=_tee, args=(process.stderr, [sys.stderr, log]))]
        for thread in threads:
            thread.start()
        try:
            code = process.wait()
        except KeyboardInterrupt:
            process.terminate()
            code = process.wait()
        for thread in threads:
            thread.join()
    return code


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("config", help="a Xihe job config (config.json, config_aim.json, configs/*.json)")
    parser.add_argument("--input", action="append", default=[], metavar="NAME=URL",
                        help="use this path or URL for input NAME instead of its input_url")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override a hyperparameter, or add one the config does not have")
    parser.add_argument("--work", default=None, help="folder for outputs and logs (default: job-work/<job_name>)")
    parser.add_argument("--hub", default=None, help="folder that mirrors Xihe's hub: DIR/datasets/owner/name/...")
    parser.add_argument("--strip-comments", action="store_true",
                        help="accept the docs' annotated form (// comments, trailing commas), with a warning")
    parser.add_argument("--check", action="store_true", help="validate the config and print the command; do not run")
    parser.add_argument("--form", action="store_true",
                        help="validate the config and print what to enter in the platform's training form, field "
                             "by field; do not run")
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        config = read_config(args.config, args.strip_comments)
        code_dir, boot_file = validate(config)
        if args.form:
            print(xihe_form.form(config))
            return 0
        work = Path(args.work or Path("job-work") / config["job_name"]).resolve()
        command, folders = build_command(config, code_dir, boot_file, work, _pairs(args.input, "--input"),
                                         _pairs(args.set, "--set"), args.hub)
        log_path = inside(work, config["log_url"], "log_url", "--work") / f"{config['job_name']}.log"
    except ConfigError as exc:
        for line in exc.lines:
            print(f"error: {scrubbed(line)}", file=sys.stderr)
        return 2
    requirements = code_dir / "pip-requirements.txt"
    print(f"job {config['job_name']}: the platform would first install {requirements.relative_to(ROOT)} "
          f"(not installed here)" if requirements.exists() else f"job {config['job_name']}")
    print("running: " + scrubbed(" ".join(command[1:])), flush=True)
    env = job_env(config, code_dir)
    if args.check:
        return 0
    code = run(command, code_dir, env, log_path, [log_path.parent, *folders])
    print(f"job {config['job_name']} exited with {code}; log: {log_path}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
