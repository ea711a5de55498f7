"""Where and how the job runs: the device, its precision plan, the data-parallel workers, and CPU tuning.

Training runs in GRAPH_MODE: the fastest mode on CPU, and the usual one on GPU/Ascend.
"""
import os
import platform
import sys
from typing import NamedTuple

import mindspore as ms

from errors import UserError

PREFERRED_DEVICES = ("Ascend", "GPU", "CPU")


def tune_cpu_env(environ=os.environ):
    """oneDNN in MindSpore picks a reference convolution kernel on AVX-512 CPUs (10-30x slower).

    Capping the ISA at AVX2 selects the fast JIT GEMM kernels. It must be set before the first op, and a value
    the user set wins.
    """
    if platform.machine().lower() in ("x86_64", "amd64"):
        environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")


def available_devices():
    """The device targets this MindSpore build can use, best first."""
    try:
        from mindspore import hal  # MindSpore >= 2.2
        return [d for d in PREFERRED_DEVICES if hal.is_available(d)]
    except (ImportError, AttributeError):
        return [ms.get_context("device_target")]


def exports_air(requested, device):
    """Whether the job exports AIR: by default on Ascend, the only device that can; asked for elsewhere, one
    warning says why not, and the rest of the job goes on."""
    if device == "Ascend":
        return requested is not False
    if requested:
        print(f"warning: --export_air: AIR export needs an Ascend device (this job runs on {device}); no .air is "
              f"written", file=sys.stderr)
    return False


def choose_device(requested, available):
    """`auto` takes the best available target; an explicit one must be available."""
    if requested == "auto":
        for target in PREFERRED_DEVICES:
            if target in available:
                return target
        raise UserError("no usable device found by MindSpore")
    if requested not in available:
        raise UserError(f"--device_target {requested} is not available in this MindSpore installation "
                        f"(available: {', '.join(available) or 'none'})")
    return requested


def setup_device(requested):
    target = choose_device(requested, available_devices())
    ms.set_context(mode=ms.GRAPH_MODE, device_target=target)
    keep_sys_through_compile_cache()
    return target


def keep_sys_through_compile_cache():
    """MindSpore's compile cache (MS_COMPILER_CACHE_ENABLE=1) lists the entry script's imports with
    importlib.util.module_from_spec, which for `sys` writes its start-up state over the live module: sys.stderr
    becomes a bare printer (Aim's close then failed with a traceback after training, before the export) and the
    hooks go, among them the cluster-exit excepthook MindSpore installs for several workers. Whatever the listing
    changed in `sys` is put back (the function lives in mindspore.common.api up to 2.2, in mindspore.graph.api
    since)."""
    import importlib
    for name in ("mindspore.graph.api", "mindspore.common.api"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        listing = getattr(module, "_get_compile_cache_dep_files", None)
        if listing is None or getattr(listing, "keeps_sys", False):
            continue

        def keeping_sys(listing=listing):
            saved = dict(vars(sys))
            try:
                return listing()
            finally:
                for key, value in saved.items():
                    if vars(sys).get(key) is not value:
                        setattr(sys, key, value)
        keeping_sys.keeps_sys = True
        module._get_compile_cache_dep_files = keeping_sys


class TrainingPlan(NamedTuple):
    """How the device trains: `amp_level` O0 (fp32) or O2 (fp16, BatchNorm and the loss in fp32), loss scaling,
    and dataset sink (whole epochs run on the device, without Python between steps)."""
    amp_level: str
    loss_scale: bool
    dataset_sink: bool

    def describe(self):
        precision = "fp32 (amp O0)" if self.amp_level == "O0" else f"mixed fp16 (amp {self.amp_level})"
        return (f"{precision}, loss scale {'dynamic' if self.loss_scale else 'off'}, "
                f"dataset sink {'on' if self.dataset_sink else 'off'}")


def plan_training(device, amp_level="auto", dataset_sink="auto"):
    """Mixed precision with dynamic loss scaling on GPU and Ascend, where fp16 is fast; fp32 on CPU, where it is
    slower and some fp16 kernels are missing. Dataset sink on Ascend; the CPU has none."""
    if amp_level == "auto":
        amp_level = "O0" if device == "CPU" else "O2"
    elif amp_level != "O0" and device == "CPU":
        raise UserError(f"--amp_level {amp_level} needs GPU or Ascend: on CPU, fp16 is slower than fp32")
    sink = device == "Ascend" if dataset_sink == "auto" else dataset_sink == "true"
    if sink and device == "CPU":
        raise UserError("--dataset_sink true needs GPU or Ascend: the CPU has no dataset sink")
    return TrainingPlan(amp_level, amp_level != "O0", sink)


class Workers(NamedTuple):
    """This process's place among the data-parallel workers: (0, 1, 0) for a single process."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def leader(self):
        """Downloads and extracts inputs: once per machine, the machine's other workers wait for it."""
        return self.local_rank == 0

    @property
    def writes_outputs(self):
        """Only rank 0 writes the job's outputs and tracks the run in Aim."""
        return self.rank == 0

    @property
    def shard(self):
        """(workers, rank): each worker trains on its own part of the data; None for a single process."""
        return (self.size, self.rank) if self.size > 1 else None

    @property
    def lr_scale(self):
        """Linear scaling: --lr is for one device's batch, and N workers take N times the batch."""
        return self.size

    def describe(self, batch_size, lr):
        if self.size == 1:
            return ""
        return f" x {self.size} workers (rank {self.rank}), global batch {batch_size * self.size}, lr {lr:g}"


class Launch(NamedTuple):
    """How this process was started, read from the environment alone (before joining the others)."""
    launcher: str = "single process"  # or "msrun", "rank table", "mpirun"
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    nodes: int = 1

    def describe(self):
        return (f"launch: {self.launcher}, rank {self.rank} of {self.size} workers (local rank {self.local_rank}), "
                f"{self.nodes} node{'s' if self.nodes != 1 else ''}")


def _number(environ, name, default=None):
    value = environ.get(name, "")
    if value.strip() == "":
        if default is None:
            raise UserError(f"the launch sets no {name}, which it needs")
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value[:40]!r} is not a whole number") from None


def platform_nodes(environ):
    """The node count a ModelArts job states (MA_NUM_HOSTS, or Volcano's VC_WORKER_NUM), else 1."""
    return max(_number(environ, "MA_NUM_HOSTS", 0) or _number(environ, "VC_WORKER_NUM", 0), 1)


def _rank_table_nodes(path):
    """Servers in an HCCL rank table: server_count or server_list (format 1.0), or the distinct server_id of
    group_list's instances (ModelArts' jobstart_hccl.json, in a folder RANK_TABLE_FILE may name); None when
    unreadable."""
    import glob
    import json
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "*.json")))
        path = found[0] if found else path
    try:
        table = json.loads(open(path).read())
        if "group_list" in table:
            return len({instance["server_id"] for group in table["group_list"]
                        for instance in group["instance_list"]})
        return int(table.get("server_count") or len(table["server_list"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def detect_launch(environ=os.environ):
    """Which launcher started this process and its place among the workers:
    - msrun (MindSpore 2.3+): MS_ROLE=MS_WORKER, MS_WORKER_NUM, RANK_ID, DEVICE_ID (the local rank); its
      scheduler process (MS_ROLE=MS_SCHED) runs the script too, and serves the others inside init();
    - an HCCL rank table (ModelArts' Ascend images, MindSpore 2.2 too: the boot file starts once per card):
      RANK_TABLE_FILE, RANK_ID (global), RANK_SIZE, DEVICE_ID or ASCEND_DEVICE_ID;
    - mpirun (GPU): OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK/LOCAL_SIZE;
    - else one process. A ModelArts job of several nodes (MA_NUM_HOSTS / VC_WORKER_NUM) that started train.py
      alone on each node is refused: every node would train alone, on all the data, into the same outputs."""
    nodes = platform_nodes(environ)
    if environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED"):  # msrun also runs the script as its scheduler
        size = _number(environ, "MS_WORKER_NUM")
        rank = _number(environ, "RANK_ID", _number(environ, "MS_NODE_ID", 0))
        return Launch("msrun", rank, size, _number(environ, "DEVICE_ID", 0), nodes)
    if _number(environ, "OMPI_COMM_WORLD_SIZE", 1) > 1:
        size, local_size = _number(environ, "OMPI_COMM_WORLD_SIZE"), _number(environ, "OMPI_COMM_WORLD_LOCAL_SIZE", 0)
        return Launch("mpirun", _number(environ, "OMPI_COMM_WORLD_RANK"), size,
                      _number(environ, "OMPI_COMM_WORLD_LOCAL_RANK"), -(-size // local_size) if local_size else nodes)
    if environ.get("RANK_TABLE_FILE") and _number(environ, "RANK_SIZE", 1) > 1:
        table = environ["RANK_TABLE_FILE"]
        if not os.path.exists(table):
            raise UserError(f"RANK_TABLE_FILE {table} does not exist")
        local_rank = _number(environ, "DEVICE_ID", _number(environ, "ASCEND_DEVICE_ID", -1))
        if local_rank < 0:
            raise UserError("the rank table launch sets neither DEVICE_ID nor ASCEND_DEVICE_ID: which card is this?")
        return Launch("rank table", _number(environ, "RANK_ID"), _number(environ, "RANK_SIZE"), local_rank,
                      _rank_table_nodes(table) or nodes)
    if _number(environ, "RANK_SIZE", 1) > 1:
        raise UserError(f"RANK_SIZE={environ['RANK_SIZE']} says this is one of several workers, but neither msrun "
                        f"(MS_ROLE), a rank table (RANK_TABLE_FILE) nor mpirun (OMPI_COMM_WORLD_*) started it")
    if nodes > 1:
        raise UserError(f"this job has {nodes} nodes (MA_NUM_HOSTS / VC_WORKER_NUM) but train.py runs alone on "
                        f"each: boot launch_nodes.py instead, which runs msrun across the nodes (MindSpore 2.3+), or "
                        f"choose one node")
    return Launch()


def join_data_parallel(device="CPU", environ=os.environ, log=print):
    """Join the other workers (data parallel, gradients averaged over them), or stay a single process."""
    launch = detect_launch(environ)
    if launch.size == 1:
        return Workers()
    if launch.launcher == "mpirun" and device == "CPU":
        raise UserError("mpirun on CPU: MindSpore's CPU collectives do not start under it (init fails); launch with "
                        "msrun instead")
    from mindspore.communication import get_group_size, get_local_rank, get_rank, init
    if launch.launcher == "rank table" and not environ.get("DEVICE_ID"):  # MindSpore reads DEVICE_ID only
        ms.set_context(device_id=launch.local_rank)
    init()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    try:
        local_rank = get_local_rank()
    except (RuntimeError, ValueError):  # not on every backend of older MindSpore (GPU before 2.3): the launcher's
        local_rank = launch.local_rank
    workers = Workers(get_rank(), get_group_size(), local_rank)
    log(launch._replace(rank=workers.rank, size=workers.size, local_rank=workers.local_rank).describe())
    return workers


def share_from_rank0(workers, make):
    """What `make()` returns on rank 0 (anything JSON can hold), on every worker; a UserError that `make` raises
    on rank 0 is raised on every worker, so none is left waiting in a collective for a rank that stopped. Every
    worker must call it; `make` runs on rank 0 only."""
    import json
    import numpy as np
    if workers.size == 1:
        return make()
    message = b""
    if workers.rank == 0:
        try:
            message = json.dumps({"value": make()}).encode()
        except UserError as exc:
            message = json.dumps({"error": str(exc)}).encode()
    length = int(sum_over_workers(np.array([len(message)]))[0])  # below 2**24: exact in float32
    payload = np.zeros(length, np.float32)
    payload[:len(message)] = np.frombuffer(message, np.uint8)
    shared = json.loads(sum_over_workers(payload).astype(np.uint8).tobytes())
    if "error" in shared:
        raise UserError(shared["error"] if workers.rank == 0 else f"rank 0 stopped: {shared['error']}")
    return shared["value"]


def share_parameters_from_rank0(workers, params):
    """Rank 0's values of `params` (MindSpore Parameters, the same list on every worker) on every worker: a sum over
    the workers in which the others contribute zeros. Floating point values (float32, and float16 as float32) come
    back exactly, a negative zero as a positive one; integer and boolean ones travel as their bytes."""
    import numpy as np
    arrays = [param.asnumpy() for param in params]
    floating = [np.issubdtype(a.dtype, np.floating) for a in arrays]
    sizes = [a.size if f else a.nbytes for a, f in zip(arrays, floating)]
    if workers.rank == 0:
        flat = np.concatenate([a.astype(np.float32).reshape(-1) if f else np.frombuffer(a.tobytes(), np.uint8)
                               for a, f in zip(arrays, floating)]).astype(np.float32)
    else:
        flat = np.zeros(sum(sizes), np.float32)
    summed, offset = sum_over_workers(flat), 0
    if workers.rank == 0:
        return
    for param, array, is_float, size in zip(params, arrays, floating, sizes):
        part = summed[offset:offset + size]
        offset += size
        value = part.astype(array.dtype) if is_float else np.frombuffer(part.astype(np.uint8).tobytes(), array.dtype)
        param.set_data(ms.Tensor(value.reshape(array.shape), param.dtype))


_all_reduce = []  # one cell for the process: its graphs are compiled once per shape


def sum_over_workers(array):
    """The element-wise sum of a float32 array over all workers (a collective: every worker must call it)."""
    import numpy as np
    if not _all_reduce:
        _all_reduce.append(_AllReduceSum())
    return _all_reduce[0](ms.Tensor(np.ascontiguousarray(array, dtype=np.float32))).asnumpy()


class _AllReduceSum(ms.nn.Cell):
    def __init__(self):
        super().__init__()
        self.all_reduce = ms.ops.AllReduce()

    def construct(self, x):
        return self.all_reduce(x)
