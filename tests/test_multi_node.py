"""Several nodes: how each launch is recognised (from the environment alone), and two msrun "nodes" on this machine,
each in its own network namespace joined by a veth pair, started by launch_nodes.py from ModelArts' variables, that
train together, and resume together after both are killed."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TRAIN_DIR, free_port, read_json

import launch_nodes
import runtime
from errors import UserError
from make_demo_data import make_split, write_cifar


def rank_table(tmp_path, servers=2, cards=8):
    path = tmp_path / "rank_table.json"
    path.write_text(json.dumps({"version": "1.0", "server_count": str(servers), "status": "completed",
                                "server_list": [{"server_id": f"192.0.2.{s}", "device": [
                                    {"device_id": str(d), "device_ip": f"198.51.100.{d}", "rank_id": str(s * cards + d)}
                                    for d in range(cards)]} for s in range(servers)]}))
    return str(path)


@pytest.mark.parametrize("environ, expected", [
    ({}, ("single process", 0, 1, 0, 1)),
    ({"RANK_SIZE": "1", "DEVICE_ID": "0"}, ("single process", 0, 1, 0, 1)),
    ({"MS_ROLE": "MS_WORKER", "MS_WORKER_NUM": "16", "RANK_ID": "9", "DEVICE_ID": "1", "MA_NUM_HOSTS": "2"},
     ("msrun", 9, 16, 1, 2)),
    ({"MS_ROLE": "MS_WORKER", "MS_WORKER_NUM": "2", "MS_NODE_ID": "1", "DEVICE_ID": "0", "VC_WORKER_NUM": "2"},
     ("msrun", 1, 2, 0, 2)),
    ({"RANK_TABLE_FILE": "TABLE", "RANK_ID": "9", "RANK_SIZE": "16", "DEVICE_ID": "1"}, ("rank table", 9, 16, 1, 2)),
    ({"RANK_TABLE_FILE": "TABLE", "RANK_ID": "3", "RANK_SIZE": "16", "ASCEND_DEVICE_ID": "3"},
     ("rank table", 3, 16, 3, 2)),
    ({"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, ("mpirun", 5, 8, 1, 2)),
])
def test_each_launch_is_recognised_from_its_variables(tmp_path, environ, expected):
    environ = {k: rank_table(tmp_path) if v == "TABLE" else v for k, v in environ.items()}
    assert tuple(runtime.detect_launch(environ)) == expected


@pytest.mark.parametrize("environ, message", [
    ({"RANK_TABLE_FILE": "/nowhere/table.json", "RANK_ID": "0", "RANK_SIZE": "8", "DEVICE_ID": "0"},
     "RANK_TABLE_FILE /nowhere/table.json does not exist"),
    ({"RANK_TABLE_FILE": "TABLE", "RANK_SIZE": "8", "DEVICE_ID": "0"}, "the launch sets no RANK_ID, which it needs"),
    ({"RANK_TABLE_FILE": "TABLE", "RANK_ID": "0", "RANK_SIZE": "8"}, "neither DEVICE_ID nor ASCEND_DEVICE_ID"),
    ({"RANK_SIZE": "8"}, "RANK_SIZE=8 says this is one of several workers, but neither msrun"),
    ({"MA_NUM_HOSTS": "2"}, "this job has 2 nodes .* but train.py runs alone on each: boot launch_nodes.py instead"),
    ({"MS_ROLE": "MS_WORKER", "MS_WORKER_NUM": "two"}, "MS_WORKER_NUM='two' is not a whole number"),
])
def test_an_incomplete_launch_is_one_clear_error(tmp_path, environ, message):
    environ = {k: rank_table(tmp_path) if v == "TABLE" else v for k, v in environ.items()}
    with pytest.raises(UserError, match=message):
        runtime.detect_launch(environ)


def test_mpirun_on_cpu_is_refused_before_it_hangs():
    with pytest.raises(UserError, match="mpirun on CPU"):
        runtime.join_data_parallel("CPU", {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0",
                                           "OMPI_COMM_WORLD_LOCAL_RANK": "0"})


def test_a_group_list_rank_table_in_a_folder_counts_its_servers(tmp_path):
    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "jobstart_hccl.json").write_text(json.dumps({"group_list": [{"instance_count": "16", "instance_list": [
        {"server_id": f"192.0.2.{i // 8}", "devices": [{"device_id": str(i % 8)}]} for i in range(16)]}]}))
    environ = {"RANK_TABLE_FILE": str(folder), "RANK_ID": "8", "RANK_SIZE": "16", "ASCEND_DEVICE_ID": "0"}
    assert tuple(runtime.detect_launch(environ)) == ("rank table", 8, 16, 0, 2)


def test_the_launcher_started_once_per_card_leaves_the_node_to_card_0(monkeypatch, capsys):
    monkeypatch.setenv("ASCEND_DEVICE_ID", "3")
    monkeypatch.delenv("VC_WORKER_HOSTS", raising=False)
    assert launch_nodes.main(["--data_url", "/d"]) == 0
    assert "card 3's copy leaves this node to card 0's" in capsys.readouterr().out


def test_the_launcher_reads_the_nodes_from_modelarts_variables():
    environ = {"VC_WORKER_HOSTS": "127.0.0.1,localhost", "VC_TASK_INDEX": "1", "VC_WORKER_NUM": "2",
               "MA_NUM_GPUS": "8"}
    assert launch_nodes.node_plan(environ) == ("127.0.0.1", 1, 2, 8)
    assert launch_nodes.node_plan(environ, local_workers=2) == ("127.0.0.1", 1, 2, 2)
    for broken, message in (({"VC_TASK_INDEX": "2"}, "do not describe node 2 of 2"),
                            ({"VC_WORKER_HOSTS": ""}, "VC_WORKER_HOSTS is not set"),
                            ({"VC_WORKER_NUM": "x"}, "VC_WORKER_NUM='x' is not a whole number")):
        with pytest.raises(UserError, match=message):
            launch_nodes.node_plan({**environ, **broken})


# ---------------------------------------------------------------- two nodes on this machine

def can_make_namespaces():
    return os.geteuid() == 0 and subprocess.run(["ip", "netns", "list"], capture_output=True).returncode == 0


@pytest.fixture
def two_nodes():
    """Two network namespaces, each a "node" with its own address on a veth pair (10.231.N.1 and .2, made and
    removed here): msrun on 127.0.0.1 twice would make each node its own master. Each node also gets its own host
    name (start_node). Teardown kills whatever still runs in them and removes only what this fixture made."""
    if not can_make_namespaces():
        pytest.skip("making network namespaces needs root and iproute2")
    import uuid
    tag = uuid.uuid4().hex[:6]
    names, link = [f"t22{tag}a", f"t22{tag}b"], [f"v22{tag}a", f"v22{tag}b"]
    subnet = f"10.231.{int(tag, 16) % 250}"
    made_namespaces, made_link = [], False
    try:
        for name in names:
            subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
            made_namespaces.append(name)
        subprocess.run(["ip", "link", "add", link[0], "type", "veth", "peer", "name", link[1]], check=True,
                       capture_output=True)
        made_link = True
        for i in (0, 1):
            for command in (["ip", "link", "set", link[i], "netns", names[i]],
                            ["ip", "-n", names[i], "addr", "add", f"{subnet}.{i + 1}/30", "dev", link[i]],
                            ["ip", "-n", names[i], "link", "set", link[i], "up"],
                            ["ip", "-n", names[i], "link", "set", "lo", "up"]):
                subprocess.run(command, check=True, capture_output=True)
        yield names, [f"{subnet}.1", f"{subnet}.2"]
    finally:
        kill([], made_namespaces)
        for name in made_namespaces:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        if made_link:  # a veth pair still in this namespace (a failed move); gone with its namespace otherwise
            subprocess.run(["ip", "link", "del", link[0]], capture_output=True)


@pytest.fixture(scope="module")
def data(module_tmp):
    return write_cifar(module_tmp / "cifar", make_split(128, 4, 0), make_split(32, 4, 1),
                       ["red_circle", "blue_square", "red_square", "blue_circle"])


COMMON = ["--arch", "resnet18", "--image_size", "32", "--batch_size", "16", "--lr", "0.01",
          "--aim_system_metrics", "false", "--export_onnx", "false"]


def start_node(namespaces, addresses, node, port, root, *train_args):
    """launch_nodes.py on one node, as ModelArts starts it there: its own session, so a test can kill the node whole."""
    env = {**os.environ, "VC_WORKER_HOSTS": ",".join(addresses), "VC_TASK_INDEX": str(node), "VC_WORKER_NUM": "2",
           "MA_NUM_GPUS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    root.mkdir(parents=True, exist_ok=True)
    log = open(root / f"node{node}.log", "w")
    # its own host name too (a UTS namespace): MindSpore counts workers with the same host name as one node's
    return subprocess.Popen(["ip", "netns", "exec", namespaces[node], "unshare", "--uts", "sh", "-c",
                             'hostname "$0" && exec "$@"', f"{namespaces[node]}-host", sys.executable,
                             str(TRAIN_DIR / "launch_nodes.py"),
                             "--master_port", str(port), "--msrun_log_dir", str(root / f"logs{node}"),
                             *map(str, train_args)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def run_nodes(two_nodes, root, args_of, timeout=900):
    namespaces, addresses = two_nodes
    port = free_port()
    nodes = [start_node(namespaces, addresses, node, port, root, *args_of(node)) for node in (0, 1)]
    try:
        codes = [node.wait(timeout=timeout) for node in nodes]
    finally:
        kill(nodes, namespaces)
    logs = [(root / f"logs{node}" / f"worker_{node}.log").read_text() for node in (0, 1)]
    return codes, logs


def kill(nodes, namespaces):
    """Every process of both nodes (msrun starts its workers in sessions of their own): a lost machine."""
    for namespace in namespaces:
        pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
        for pid in map(int, pids):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for node in nodes:
        node.wait(timeout=60)
    deadline = time.monotonic() + 60
    while any(subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.strip()
              for ns in namespaces):
        assert time.monotonic() < deadline, "processes survived SIGKILL"
        time.sleep(0.2)


def same_weights(first, second):
    import mindspore as ms
    import numpy as np
    ours, theirs = ms.load_checkpoint(str(first)), ms.load_checkpoint(str(second))
    names = [n for n in ours if isinstance(ours[n], ms.Parameter) and n.startswith(("conv1", "layer", "norm", "fc"))]
    assert len(names) > 100
    return all(np.array_equal(ours[n].asnumpy(), theirs[n].asnumpy()) for n in names)


@pytest.mark.slow
def test_two_nodes_train_together_and_resume_together_after_both_are_killed(two_nodes, data, tmp_path):
    """Both nodes train one job into one set of outputs; killed after an epoch, restarted on fresh disks with
    --resume auto, both continue from rank 0's state and end with identical weights."""
    out = tmp_path / "out"
    namespaces, addresses = two_nodes
    first = tmp_path / "first"
    first.mkdir()
    port = free_port()
    args = ["--data_url", data, "--output_url", out, "--epochs", 3, *COMMON]
    nodes = [start_node(namespaces, addresses, node, port, first, *args, "--cache_dir", first / f"cache{node}")
             for node in (0, 1)]
    deadline = time.monotonic() + 600
    while not ((out / "metrics.json").is_file() and (out / "resume.ckpt").is_file()):
        assert time.monotonic() < deadline and all(node.poll() is None for node in nodes), \
            (first / "node0.log").read_text()[-3000:]
        time.sleep(0.2)
    kill(nodes, namespaces)  # both nodes at once, mid-run, as a lost job
    done = len(read_json(out / "metrics.json"))
    assert 1 <= done < 3

    again = tmp_path / "again"  # fresh scratch folders: new machines
    again.mkdir()
    codes, logs = run_nodes(two_nodes, again, lambda node: [*args, "--resume", "auto",
                                                            "--cache_dir", again / f"cache{node}"])
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    for rank in (0, 1):
        assert f"launch: msrun, rank {rank} of 2 workers (local rank 0), 2 nodes" in logs[rank]
        assert "x 2 workers (rank %d), global batch 32" % rank in logs[rank]
    assert not (again / "cache0" / "rank-0").exists()  # rank 0 writes the outputs, rank 1 only its scratch
    resumed_after = int(re.search(r"resume: continuing after epoch (\d+) of 3", logs[0]).group(1))
    assert f"resume: continuing after epoch {resumed_after} with rank 0's state" in logs[1]
    assert [r["epoch"] for r in read_json(out / "metrics.json")] == [1, 2, 3]
    assert same_weights(out / "resnet18-last.ckpt", again / "cache1" / "rank-1" / "resnet18-last.ckpt")
    # validation on both ranks saw the same network every resumed epoch
    validation = re.compile(r"val_loss (\S+)  val_accuracy (\S+)")
    lines = [[validation.search(line).groups() for line in log.splitlines() if "  train_loss" in line]
             for log in logs]
    assert lines[0] == lines[1] and len(lines[0]) == 3 - resumed_after

    # A resume that rank 0 refuses stops every worker with the reason, on both nodes, instead of leaving rank 1
    # waiting for a rank that is gone
    (out / "metrics.json").write_text("{damaged")
    codes, logs = run_nodes(two_nodes, tmp_path / "refused", lambda node: [
        *args, "--epochs", 4, "--resume", "auto", "--cache_dir", tmp_path / "refused" / f"cache{node}"],
        timeout=300)
    assert codes[0] != 0 and codes[1] != 0
    assert f"error: {out / 'metrics.json'} is damaged" in logs[0]
    assert f"error: rank 0 stopped: {out / 'metrics.json'} is damaged" in logs[1]
    assert "worker_1: error: rank 0 stopped:" in (tmp_path / "refused" / "node1.log").read_text()


@pytest.mark.slow
def test_sigterm_to_the_launcher_reaches_every_worker(data, tmp_path):
    """The platform's preemption: SIGTERM to launch_nodes.py (one node, two workers on 127.0.0.1) ends every worker
    cleanly: exit 143, the finished epochs kept, no process left (the two-node test resumes through the launcher)."""
    out = tmp_path / "out"
    env = {**os.environ, "VC_WORKER_HOSTS": "127.0.0.1", "VC_TASK_INDEX": "0", "VC_WORKER_NUM": "1",
           "MA_NUM_GPUS": "2", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    command = [sys.executable, str(TRAIN_DIR / "launch_nodes.py"), "--master_port", str(free_port()),
               "--data_url", data, "--output_url", out, "--epochs", 2, *COMMON]
    first = subprocess.Popen([*map(str, command), "--msrun_log_dir", str(tmp_path / "logs"), "--cache_dir",
                              str(tmp_path / "cache")], env=env, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not (out / "metrics.json").is_file():
            assert time.monotonic() < deadline and first.poll() is None, first.stderr.read()[-3000:]
            time.sleep(0.2)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=300) == 143, first.stderr.read()[-3000:]
        assert "error: stopped by SIGTERM" in first.stderr.read()
        left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
        assert not left, "workers outlived the launcher"
    finally:
        os.killpg(first.pid, signal.SIGKILL) if first.poll() is None else None
    assert len(read_json(out / "metrics.json")) == 1 and (out / "resume.ckpt").is_file()
