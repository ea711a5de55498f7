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
    return target


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


def launched_workers(environ=os.environ):
    """Whether this process is one of several workers: msrun sets MS_ROLE, a ModelArts multi-card job RANK_SIZE."""
    return environ.get("MS_ROLE") == "MS_WORKER" or int(environ.get("RANK_SIZE") or 1) > 1


def join_data_parallel(environ=os.environ):
    """Join the other workers (data parallel, gradients averaged over them), or stay a single process."""
    if not launched_workers(environ):
        return Workers()
    from mindspore.communication import get_group_size, get_local_rank, get_rank, init
    init()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    return Workers(get_rank(), get_group_size(), get_local_rank())
