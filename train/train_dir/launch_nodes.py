"""Run train.py on every card of every node of a ModelArts job, with msrun (MindSpore 2.3 and later).

Boot this file instead of train.py when the job has several nodes and starts its boot file once per node; it takes
train.py's flags unchanged:

    python launch_nodes.py --data_url ... --output_url obs://bucket/out --epochs 30      # on every node

The platform names the nodes: VC_WORKER_HOSTS (every node's host name, the first is the master), VC_TASK_INDEX
(this node's index) and VC_WORKER_NUM or MA_NUM_HOSTS (the node count); the cards per node are MA_NUM_GPUS (or
--local_workers). msrun then starts one train.py per card, the scheduler on the first node. The exit code is
msrun's: 0 only when every worker of this node finished.

On the MindSpore 2.2 images (no msrun) boot train.py itself: the Ascend images start it once per card with a rank
table (RANK_TABLE_FILE), which train.py joins. Started once per card anyway (ASCEND_DEVICE_ID set), only card 0's
copy runs msrun for its node. SIGTERM and Ctrl-C reach every worker, which saves its finished epochs; the exit code
is then 128 + the signal's number, and a failed worker's `error:` line is repeated here.
"""
import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from errors import UserError

DEFAULT_PORT = 8118  # msrun's own default
TRAIN_PY = Path(__file__).resolve().with_name("train.py")


def node_plan(environ, local_workers=None):
    """(master address, node rank, nodes, workers per node) from the platform's variables."""
    hosts = [host.strip() for host in environ.get("VC_WORKER_HOSTS", "").split(",") if host.strip()]
    if not hosts:
        raise UserError("VC_WORKER_HOSTS is not set: launch_nodes.py runs a ModelArts job of several nodes; on one "
                        "machine run msrun or train.py directly")
    nodes = _whole(environ, "VC_WORKER_NUM") or _whole(environ, "MA_NUM_HOSTS") or len(hosts)
    node_rank = _whole(environ, "VC_TASK_INDEX", -1)
    if not 0 <= node_rank < nodes or nodes != len(hosts):
        raise UserError(f"VC_TASK_INDEX={environ.get('VC_TASK_INDEX')!r} and {len(hosts)} host(s) in "
                        f"VC_WORKER_HOSTS do not describe node {node_rank} of {nodes}")
    per_node = local_workers or _whole(environ, "MA_NUM_GPUS") or 1
    try:
        master = socket.gethostbyname(hosts[0])
    except OSError as exc:
        raise UserError(f"the master node {hosts[0]} (first of VC_WORKER_HOSTS) has no address: {exc}") from None
    return master, node_rank, nodes, per_node


def _whole(environ, name, default=None):
    value = environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit():
        raise UserError(f"{name}={value[:40]!r} is not a whole number")
    return int(value)


def msrun_command(master, node_rank, nodes, per_node, port, log_dir, train_args):
    msrun = shutil.which("msrun", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if msrun is None:
        raise UserError("msrun is not installed (it comes with MindSpore 2.3 and later); on MindSpore 2.2 boot "
                        "train.py, which joins the platform's rank table")
    return [msrun, f"--worker_num={nodes * per_node}", f"--local_worker_num={per_node}", f"--master_addr={master}",
            f"--master_port={port}", f"--node_rank={node_rank}", f"--log_dir={log_dir}", "--join=True",
            str(TRAIN_PY), *train_args]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=True)
    parser.add_argument("--local_workers", type=int, default=None, help="workers per node (default: MA_NUM_GPUS, 1)")
    parser.add_argument("--master_port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--msrun_log_dir", default=None, help="the workers' logs (default: msrun-logs/ in the "
                        "working folder)")
    ours, train_args = parser.parse_known_args(argv)
    card = os.environ.get("ASCEND_DEVICE_ID", "").strip()
    if card not in ("", "0"):  # an image that starts the boot file once per card: card 0's copy runs the node
        print(f"launch: card {card}'s copy leaves this node to card 0's, whose msrun starts a worker per card")
        return 0
    master, node_rank, nodes, per_node = node_plan(os.environ, ours.local_workers)
    log_dir = Path(ours.msrun_log_dir or "msrun-logs").resolve()
    command = msrun_command(master, node_rank, nodes, per_node, ours.master_port, log_dir, train_args)
    env = {key: value for key, value in os.environ.items() if key not in ("RANK_TABLE_FILE", "RANK_ID")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # msrun's workers run `python`
    print(f"launch: node {node_rank} of {nodes}, {per_node} worker(s) each, master {master}:{ours.master_port}; "
          f"logs in {log_dir}", flush=True)
    msrun = subprocess.Popen(command, env=env)
    stopped = []

    def stop(signum, _):
        """The platform's preemption (SIGTERM) or Ctrl-C: msrun starts its workers in sessions of their own and
        passes no signal on, so SIGTERM goes to each of its descendants: they save what they finished and end."""
        stopped.append(signum)
        for pid in descendants(msrun.pid):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    code = msrun.wait()
    if code == 0 and not stopped:
        return 0
    for line in worker_errors(log_dir):
        print(line, file=sys.stderr)
    print(f"error: msrun ended with exit code {code}; the workers' logs are in {log_dir}", file=sys.stderr)
    return 128 + stopped[0] if stopped else (128 - code if code < 0 else code)


def descendants(pid):
    """Every process below `pid` (Linux /proc), children first."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def worker_errors(log_dir):
    """The `error:` line each worker of this node ended with: what msrun's own exit code does not say."""
    lines = []
    for log in sorted(Path(log_dir).glob("worker_*.log")):
        errors = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("error: ")]
        if errors:
            lines.append(f"{log.stem}: {errors[-1]}")
    return lines


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
