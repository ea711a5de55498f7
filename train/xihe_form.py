"""Xihe's rules for a training job, as its server enforces them, and the form a job is entered in.

Since 2022-11-28 a Xihe training is created through a web form (name, description, code_dir, boot_file,
hyperparameters and env as key/value, datasets and models as key + owner/name/file, output and Aim switches, compute);
the configs in this repository hold the same values, and `run_job.py --form CONFIG` prints them field by field.
The rules below are the server's (opensourceways/xihe-server: `domain/dp_training.go`, `domain/dp_resource.go`,
`domain/config.go`, `controller/training_request.go`; xihe-training-center re-checks name and description in bytes).
Values are HTML-escaped before their length is checked, and reach the job escaped.
"""
import posixpath
import re

# Used with fullmatch: Go's `$` does not match before a final newline, as Python's does.
NAME = re.compile(r"[a-zA-Z0-9_-]+")  # job names, users, repositories
DIRECTORY = re.compile(r"[a-zA-Z0-9_/-]+")
FILE_NAME = re.compile(r"[a-zA-Z0-9_.-]+")
HUB_INPUT = re.compile(r"(datasets|models)/([^/]*)/([^/]*)/?(.*)", re.S)  # used with fullmatch, as Go's ^...$
PLACEHOLDER = "YOUR_NAME"  # in a shipped config: the user's own hub account, which only they can fill in

ASCEND, ASCEND_FLAVOR = "Ascend-Powered-Engine", "modelarts.kat1.xlarge.public"
COMPUTE = [(ASCEND, ASCEND_FLAVOR, version) for version in (
    "mindspore_1.7.0-cann_5.1.0-py_3.7-euler_2.8.3-aarch64",
    "mindspore_1.9.0-cann_6.0.RC1-py_3.7-ubuntu_18.04-amd64",
    "mindspore_1.9.0-cann_6.0.RC1-py_3.9-ubuntu_18.04-amd64",
    "mindspore_2.2.10-cann_7.0.RC1-py_3.9-euler_2.8.3")] + [
    ("MPI", "modelarts.p3.large.public", "mindspore_1.3.0-cuda_10.1-py_3.7-ubuntu_1804-x86_64")]
OUTPUT_SWITCHES = {"output_path": "output", "aim_repo": "aim"}  # the only two outputs, each a switch on the form

JOB_NAME = (5, 50)
DESCRIPTION = 100  # bytes: the training center counts bytes (the server characters)
PATH_LENGTH = 50  # code_dir, boot_file, an input's file
KEY, VALUE = 20, 40  # hyperparameters, env and input keys; their values
OWNER = (3, 20)
REPOSITORY = (5, 35)  # the server's default 5-50, within the docs' 3-35 for hub repository names

_ESCAPES = {"&": "&amp;", "'": "&#39;", "<": "&lt;", ">": "&gt;", '"': "&#34;", "\0": "\ufffd"}  # Go's HTMLEscapeString


def escaped(text):
    return "".join(_ESCAPES.get(c, c) for c in text)


def _length(text, what, maximum, minimum=0, unit="characters"):
    size = len(escaped(text).encode(errors="surrogatepass")) if unit == "bytes" else len(escaped(text))
    if not minimum <= size <= maximum:
        bounds = f"{minimum}-{maximum}" if minimum else f"at most {maximum}"
        grown = " once HTML-escaped" if escaped(text) != text else ""
        return [f"{what} is {size} {unit}{grown}; the platform allows {bounds}"]
    return []


def _escaped_characters(text, what):
    found = sorted({c for c in text if c in _ESCAPES})
    if found:
        return [f"{what} holds {' '.join(map(repr, found))}, which the platform passes on HTML-escaped "
                f"({' '.join(_ESCAPES[c] for c in found)}): the job will not get what you wrote"]
    return []


def _key_values(pairs, what):
    problems = []
    for key, value in pairs:
        if not key:
            problems.append(f"{what}: an empty key")
            continue
        problems += _length(key, f"{what} key {key!r}", KEY)
        problems += _length(value, f"the value of {what} {key!r} ({value!r})", VALUE)
    return problems


def warnings(config):
    """What the platform accepts but the job will not get as written (HTML-escaped characters), and inputs that
    still name the shipped placeholder `YOUR_NAME`."""
    found = []
    for what, pairs in (("hypeparameter", [(h["name"], h["value"]) for h in config["hypeparameters"]]),
                        ("env_variables", list(config["env_variables"].items()))):
        for key, value in pairs:
            found += _escaped_characters(key, f"the {what} key {key!r}")
            found += _escaped_characters(value, f"the value of {what} {key!r}")
    for entry in config["inputs"]:
        parts = hub_input(entry["input_url"])
        if parts and parts[1] == PLACEHOLDER:
            found.append(f"input {entry['name']!r} ({entry['input_url']}) names {PLACEHOLDER}: upload it to your own "
                         f"Xihe account and put your user name there")
    return found


def hub_input(url):
    """(kind, owner, repository, file) of a hub path `datasets|models/OWNER/NAME[/FILE]`, else None."""
    match = HUB_INPUT.fullmatch(url)
    return match.groups() if match else None


def _input(name, url):
    where = f"input {name!r}"
    problems = _length(name, f"the key of {where}", KEY, 1)
    parts = hub_input(url)
    if parts is None:
        return problems + [f"{where}: {url!r} is not a hub path (datasets/OWNER/NAME/FILE or models/OWNER/NAME/FILE):"
                           f" a platform job reads inputs only from Xihe's dataset and model repositories, and its "
                           f"code may not download files"]
    kind, owner, repository, file = parts
    if not (OWNER[0] <= len(owner) <= OWNER[1] and NAME.fullmatch(owner)) or owner.lower() == "root":
        problems.append(f"{where}: owner {owner!r} is not a Xihe user name ({OWNER[0]}-{OWNER[1]} letters, digits, "
                        f"'_' or '-', not root)")
    if not (REPOSITORY[0] <= len(repository) <= REPOSITORY[1] and NAME.fullmatch(repository)):
        problems.append(f"{where}: {kind[:-1]} {repository!r} is not a Xihe repository name ({REPOSITORY[0]}-"
                        f"{REPOSITORY[1]} letters, digits, '_' or '-': the server's least length, the docs' most)")
    return problems + _length(file, f"the file of {where} ({file!r})", PATH_LENGTH)


def go_clean(path):
    """Go's filepath.Clean: the server cleans a boot_file before it checks it."""
    cleaned = posixpath.normpath(path) if path else "."
    return "/" + cleaned.lstrip("/") if cleaned.startswith("//") else cleaned


def _boot_file(path):
    if not path:
        return ["boot_file is empty"]
    cleaned = go_clean(path)
    problems = _length(cleaned, f"boot_file {path!r}", PATH_LENGTH)
    folder, name = posixpath.dirname(cleaned), posixpath.basename(cleaned)
    if (folder not in ("", ".") and not DIRECTORY.fullmatch(folder)) or not FILE_NAME.fullmatch(name) \
            or name in (".", ".."):
        problems.append(f"boot_file {path!r}: folders of letters, digits, '_', '-' and '/', and a file name that "
                        f"adds '.', is what the platform accepts")
    return problems


def problems(config):
    """Every way `config` (already well-formed: see run_job.validate) breaks the server's rules, one line each."""
    found = []
    name = config["job_name"]
    found += _length(name, f"job_name {name!r}", JOB_NAME[1], JOB_NAME[0])
    if not NAME.fullmatch(name):
        found.append(f"job_name {name!r}: only letters, digits, '_' and '-'")
    found += _length(config["job_description"], "job_description", DESCRIPTION, unit="bytes")
    code_dir = config["code_dir"]
    found += _length(code_dir, f"code_dir {code_dir!r}", PATH_LENGTH)
    if code_dir and not DIRECTORY.fullmatch(code_dir):
        found.append(f"code_dir {code_dir!r}: only letters, digits, '_', '-' and '/' (no '.')")
    found += _boot_file(config["boot_file"])
    found += _key_values([(h["name"], h["value"]) for h in config["hypeparameters"]], "hypeparameter")
    found += _key_values(list(config["env_variables"].items()), "env_variables")
    for entry in config["inputs"]:
        found += _input(entry["name"], entry["input_url"])
    for entry in config["outputs"]:
        if entry["name"] not in OUTPUT_SWITCHES:
            found.append(f"output {entry['name']!r}: the platform has two outputs, switched on in its form: "
                         f"{' and '.join(OUTPUT_SWITCHES)}")
    frameworks = config["frameworks"]
    compute = (frameworks.get("framework_type"), config["train_instance_type"], frameworks.get("framework_version"))
    if compute not in COMPUTE:
        offered = "; ".join(" / ".join(c) for c in COMPUTE)
        found.append(f"compute {' / '.join(map(str, compute))} is not one the platform offers: {offered}")
    return found


def form(config):
    """The platform's training form, field by field, filled in from `config`."""
    def rows(pairs):
        return [f"    {key} = {value}" for key, value in pairs] or ["    (none)"]

    hub = {"datasets": [], "models": []}
    for entry in config["inputs"]:
        kind, owner, repository, file = hub_input(entry["input_url"])
        hub[kind].append(f"    key {entry['name']}: owner {owner}, name {repository}, file {file or '(empty: the whole repository)'}")
    outputs = {e["name"] for e in config["outputs"]}
    frameworks = config["frameworks"]
    lines = [f"name:         {config['job_name']}",
             f"description:  {config['job_description']}",
             f"code_dir:     {config['code_dir']}",
             f"boot_file:    {config['boot_file']}",
             "hyperparameters:", *rows((h["name"], h["value"]) for h in config["hypeparameters"]),
             "env:", *rows(config["env_variables"].items()),
             "datasets:", *(hub["datasets"] or ["    (none)"]),
             "models:", *(hub["models"] or ["    (none)"]),
             f"output:       {'on' if 'output_path' in outputs else 'off'} (the job's --output_path; comes back as "
             f"an archive to download)",
             f"aim:          {'on' if 'aim_repo' in outputs else 'off'} (the job's --aim_repo)",
             f"compute:      type {frameworks.get('framework_type')}, flavor {config['train_instance_type']}, "
             f"version {frameworks.get('framework_version')}"]
    return "\n".join(lines)
