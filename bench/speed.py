"""Speed on this CPU: our training step against the seed tutorial's loop and PyTorch, the data pipeline against
what the step consumes, and inference (batch-1 latency, batch-32 throughput) of the .onnx, .mindir and .ckpt
against PyTorch eager; peak memory of each.

    make bench                                  # PyTorch comes with requirements.txt
    .venv/bin/python bench/speed.py --rounds 3  # the same
    .venv/bin/python bench/speed.py --only train --shapes 32x32 --rounds 5
    .venv/bin/python bench/speed.py --only inference --rounds 5
    .venv/bin/python bench/speed.py --only convolutions --shapes 224x224b8   # each convolution, three ways

Every measurement runs in a fresh process (so peak RSS is its own, and oneDNN settings, which are read at the first
op, can differ), and rounds are interleaved: ours, seed, torch, ours, seed, torch, ... The table shows the median over
rounds, and the ratios are taken from those medians, because absolute times on a shared machine are noise.

- "ours" is the real fit path: `train_step.create_optimizer` + `train_step.create_trainer` + `Model.fit` (GRAPH_MODE, `TrainStep`),
  with `runtime.tune_cpu_env` applied, as train.py runs it.
- "ours mindspore" is the same with oneDNN's blocked kernels turned off (RESNET_ONEDNN_CONV=0): the step as it was
  before them, and as it is on a machine without a C++ compiler or libdnnl-dev.
- "ours conv" is the same with both turned off, oneDNN and `resnet.Conv2d`'s small-map matmul (MindSpore's convolution everywhere):
  what that gains.
- "seed" is the MindSpore ResNet50 tutorial's PyNative `value_and_grad` loop on its own ResNet50
  (tests/tutorial_resnet.py), once with stock settings and once with ONEDNN_MAX_CPU_ISA=AVX2 as ours uses.
- "torch" is PyTorch's CPU build on the same architecture (bench/torch_resnet.py), eager, fp32.
All three train ResNet50 on the same random images and labels, with momentum SGD and cross-entropy, in fp32.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
TRAIN_DIR = ROOT / "train" / "train_dir"
sys.path[:0] = [str(TRAIN_DIR), str(ROOT / "train"), str(ROOT / "inference"), str(ROOT / "tests"), str(HERE)]

ARCH, CLASSES = "resnet50", 10
WARMUP_STEPS = 4  # graph compile, first-touch allocations, kernels built: both ours and PyTorch run slower until then


def peak_rss_mb():
    """This process's own peak (VmHWM; ru_maxrss would carry the parent's peak across exec)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_name():
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def context_overrides():
    """MindSpore context settings to try on our runs (`--context`), passed to the child as JSON."""
    return json.loads(os.environ.get("BENCH_MS_CONTEXT") or "{}")


def random_batches(image_size, batch_size, steps, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(steps * batch_size, 3, image_size, image_size)).astype(np.float32)
    labels = rng.integers(0, CLASSES, steps * batch_size).astype(np.int32)
    return images, labels


def images_per_second(step_ends, batch_size):
    """Steady-state rate from the wall-clock ends of each step, leaving out the warm-up steps."""
    timed = step_ends[WARMUP_STEPS - 1:]
    return batch_size * (len(timed) - 1) / (timed[-1] - timed[0])


# ---------------------------------------------------------------- training steps (each in its own process)

def train_ours(image_size, batch_size, steps, small_maps_as_matmul=True):
    import mindspore as ms
    import mindspore.dataset as ds
    from mindspore.train import Callback
    import runtime
    import train_step
    from callbacks import StepMeter, StopOnNonFiniteLoss
    from resnet import Conv2d, create_model, use_onednn_convolutions
    runtime.tune_cpu_env()
    device = runtime.setup_device("CPU")
    ms.set_context(**context_overrides())
    net = create_model(ARCH, CLASSES)
    print(use_onednn_convolutions(net), file=sys.stderr)
    for _, cell in net.cells_and_names():
        if isinstance(cell, Conv2d):
            cell.small_maps_as_matmul &= small_maps_as_matmul
    optimizer = train_step.create_optimizer(net, train_step.cosine_lr(0.01, 1, steps), momentum=0.9, weight_decay=1e-4)
    trainer = train_step.create_trainer(net, optimizer, CLASSES, runtime.plan_training(device))
    images, labels = random_batches(image_size, batch_size, steps)
    data = ds.NumpySlicesDataset({"image": images, "label": labels}, shuffle=False).batch(batch_size)
    ends = []

    class StepTimes(Callback):
        def on_train_step_end(self, run_context):  # after the meter has waited for the step, as in train.py
            ends.append(time.perf_counter())

    meter = StepMeter()
    trainer.fit(1, data, callbacks=[meter, StopOnNonFiniteLoss(meter), StepTimes()], dataset_sink_mode=False)
    return images_per_second(ends, batch_size)


def train_seed(image_size, batch_size, steps):
    """The tutorial's loop: PyNative, `ms.value_and_grad` over the optimiser's parameters, Momentum."""
    import mindspore as ms
    import mindspore.dataset as ds
    from mindspore import nn
    from tutorial_resnet import TutorialResNet50
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    ms.set_seed(0)
    net = TutorialResNet50(num_classes=CLASSES)
    if image_size != 32:
        net.avg_pool = nn.AvgPool2d(kernel_size=image_size // 32)  # as the tutorial does for 224
    optimizer = nn.Momentum(net.trainable_params(), learning_rate=0.01, momentum=0.9)
    loss_fn = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")

    def forward_fn(inputs, targets):
        return loss_fn(net(inputs), targets)

    grad_fn = ms.value_and_grad(forward_fn, None, optimizer.parameters)

    def train_step(inputs, targets):
        loss, grads = grad_fn(inputs, targets)
        optimizer(grads)
        return loss

    images, labels = random_batches(image_size, batch_size, steps)
    data = ds.NumpySlicesDataset({"image": images, "label": labels}, shuffle=False).batch(batch_size)
    net.set_train()
    ends = []
    for inputs, targets in data.create_tuple_iterator():
        float(train_step(inputs, targets).asnumpy())
        ends.append(time.perf_counter())
    return images_per_second(ends, batch_size)


def train_torch(image_size, batch_size, steps):
    import torch
    import torch_resnet
    torch.manual_seed(0)
    model = torch_resnet.create_model(ARCH, CLASSES).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    images, labels = random_batches(image_size, batch_size, steps)
    ends = []
    for i in range(steps):
        inputs = torch.from_numpy(images[i * batch_size:(i + 1) * batch_size])
        targets = torch.from_numpy(labels[i * batch_size:(i + 1) * batch_size]).long()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        optimizer.step()
        loss.item()
        ends.append(time.perf_counter())
    return images_per_second(ends, batch_size)


# ---------------------------------------------------------------- each convolution alone

def convolution_layers(image_size, batch_size):
    """ResNet50's convolutions as training meets them: [(names, in_channels, out_channels, kernel, stride, input
    shape)], one entry per distinct geometry (found by running the network once in PyNative mode)."""
    import mindspore as ms
    from resnet import Conv2d, create_model
    ms.set_context(mode=ms.PYNATIVE_MODE)
    net = create_model(ARCH, CLASSES)
    seen = {}

    def record(name):
        def hook(cell, inputs):
            key = (cell.in_channels, cell.out_channels, cell.kernel_size[0], cell.stride[0],
                   (batch_size,) + tuple(inputs[0].shape[1:]))
            seen.setdefault(key, []).append(name)
        return hook

    handles = [cell.register_forward_pre_hook(record(name)) for name, cell in net.cells_and_names()
               if isinstance(cell, Conv2d)]
    net(ms.Tensor(np.zeros((1, 3, image_size, image_size), np.float32)))
    for handle in handles:
        handle.remove()
    ms.set_context(mode=ms.GRAPH_MODE)
    return [(names, *key) for key, names in seen.items()]


# path: (resnet.Conv2d's kernel: AS_CONVOLUTION 0, AS_MATMUL 1, ON_ONEDNN 2, AS_DENSE_MATRIX 3, on oneDNN's GEMM?)
CONVOLUTION_PATHS = {"mindspore": (0, False), "matmul": (1, False), "gemm": (1, True), "onednn": (2, False),
                     "dense": (3, True)}


def convolution_path(kernel, with_library):
    """The path resnet.Conv2d takes for `kernel`: its matmuls on oneDNN's GEMM where the library is."""
    return next(path for path, (way, gemm) in CONVOLUTION_PATHS.items()
                if way == kernel and gemm == (with_library and kernel in (1, 3)))


def convolutions(image_size, batch_size, repeats=5):
    """Forward + backward of each distinct convolution three ways (MindSpore's convolution, resnet.Conv2d's matmul,
    oneDNN's blocked kernels), interleaved in this one process: ms per call (median of `repeats`), and which way
    resnet.Conv2d took before oneDNN and takes now."""
    import mindspore as ms
    from mindspore import nn, ops
    import runtime
    from resnet import Conv2d
    runtime.tune_cpu_env()
    runtime.setup_device("CPU")
    import onednn_conv
    library, reason = onednn_conv.load()
    if library is None:
        raise SystemExit(f"oneDNN convolutions unavailable: {reason}")

    class Loss(nn.Cell):  # sum(y * r): a backward pass with a dense incoming gradient
        def __init__(self, conv, direction):
            super().__init__()
            self.conv, self.direction = conv, direction

        def construct(self, x):
            return (self.conv(x) * self.direction).sum()

    class Gradients(nn.Cell):
        def __init__(self, loss, input_gradient):
            super().__init__()
            self.loss = loss
            self.grad = ops.GradOperation(get_all=input_gradient, get_by_list=True)
            self.weights = ms.ParameterTuple(loss.trainable_params())

        def construct(self, x):
            return self.grad(self.loss, self.weights)(x)

    class Forced(Conv2d):  # a Conv2d that always computes one way
        def choose_kernel(self, batch, dtype, out_pixels, in_pixels):
            return self.forced

    def wait(value):
        for item in value if isinstance(value, (tuple, list)) else [value]:
            wait(item) if isinstance(item, (tuple, list)) else item.asnumpy()

    rows = []
    rng = np.random.default_rng(0)
    for names, cin, cout, kernel, stride, shape in convolution_layers(image_size, batch_size):
        runs = {}
        x = ms.Tensor(rng.normal(size=shape).astype(np.float32))
        chooser = Conv2d(cin, cout, kernel, stride, pad_mode="same")
        chooser.set_train()
        out_pixels, in_pixels = int(np.prod(chooser.output_shape(shape)[2:])), shape[2] * shape[3]
        for path, (way, gemm) in CONVOLUTION_PATHS.items():
            if path == "dense" and not chooser.dense_matrix_fits(out_pixels, in_pixels):
                continue
            if path == "gemm" and chooser.choose_kernel(batch_size, ms.float32, out_pixels, in_pixels) != way:
                continue  # only where resnet.Conv2d runs a matmul: its large maps' columns are slow either way
            conv = Forced(cin, cout, kernel, stride, pad_mode="same")
            conv.forced = way
            conv.set_train()
            conv.input_needs_gradient = names != ["conv1"]
            conv.onednn_forward = library.forward(conv.output_shape)
            conv.dense_weights = library.dense_weights(conv.output_shape)
            conv.onednn_matmul_by_weight = library.matmul_by_weight() if gemm else None
            direction = ms.Tensor(rng.normal(size=conv.output_shape(shape)).astype(np.float32))
            runs[path] = Gradients(Loss(conv, direction), conv.input_needs_gradient)
        times = {path: [] for path in runs}
        for _ in range(repeats + 1):  # the first of each is the graph compile
            for path, run in runs.items():
                start = time.perf_counter()
                wait(run(x))
                times[path].append(time.perf_counter() - start)
        before = convolution_path(chooser.choose_kernel(batch_size, ms.float32, out_pixels, in_pixels), False)
        chooser.onednn_forward = chooser.dense_weights = runs["onednn"]  # choose_kernel asks only if there is one
        after = convolution_path(chooser.choose_kernel(batch_size, ms.float32, out_pixels, in_pixels), True)
        rows.append({"layers": names, "in": cin, "out": cout, "kernel": kernel, "stride": stride,
                     "input": list(shape), "before": before, "after": after,
                     **{path: statistics.median(times[path][1:]) * 1000 if path in times else float("nan")
                        for path in CONVOLUTION_PATHS}})
    return rows


# ---------------------------------------------------------------- data pipeline

def pipeline(data_dir, image_size, batch_size, steps):
    """Batches/s out of `datasets.create_dataset` (training transforms, all cores), as Model.fit iterates it."""
    import datasets
    source = datasets.find_data(data_dir)
    data = datasets.create_dataset(source, "train", image_size, batch_size).repeat()
    ends = []
    for _ in data.create_tuple_iterator(num_epochs=1):
        ends.append(time.perf_counter())
        if len(ends) == steps:
            break
    return images_per_second(ends, batch_size)


def write_photos(folder, count, size=(500, 375), seed=0):
    """ImageNet-sized JPEGs in two class folders per split: what a fine-tuning run decodes and crops."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, n in (("train", count), ("val", 4)):
        for i in range(n):
            target = folder / split / f"class_{i % 2}"
            target.mkdir(parents=True, exist_ok=True)
            low = rng.integers(0, 256, (size[1] // 25, size[0] // 25, 3), dtype=np.uint8)
            image = Image.fromarray(low).resize(size, Image.BILINEAR)  # smooth, so JPEG sizes are photo-like
            image.save(target / f"{i:04d}.jpg", quality=90)
    return folder


# ---------------------------------------------------------------- inference

def infer(model_path, repeats, batch):
    """Batch-1 latency and batch-`batch` throughput of the network on preprocessed 224 images, loaded as the app and
    predict.py load it (trained_model.load: .onnx on onnxruntime, .ckpt and .mindir on MindSpore)."""
    import trained_model
    if not model_path.endswith(".onnx"):
        import mindspore as ms
        from runtime import tune_cpu_env
        tune_cpu_env()
        ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU", **context_overrides())
    _, forward = trained_model.load(model_path)
    return forward_speed(forward, repeats, batch)


def infer_torch(repeats, batch):
    import torch
    import torch_resnet
    model = torch_resnet.create_model(ARCH, CLASSES).eval()
    with torch.inference_mode():
        return forward_speed(lambda x: model(torch.from_numpy(x)).numpy(), repeats, batch)


def forward_speed(forward, repeats, batch):
    """p50/p95 ms at batch 1, and images/s at `batch` (median of a few calls)."""
    rng = np.random.default_rng(0)
    one = rng.normal(size=(1, 3, 224, 224)).astype(np.float32)
    many = rng.normal(size=(batch, 3, 224, 224)).astype(np.float32)
    result = latencies(lambda: forward(one), repeats)
    result["images_per_s"] = batch / statistics.median(call_times(lambda: forward(many), max(3, repeats // 6), 1))
    return result


def call_times(call, repeats, warmup=3):
    """Seconds each of `repeats` calls took, after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def percentiles(seconds):
    """p50 and p95 in milliseconds."""
    ms = np.asarray(seconds) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 95))


def latencies(call, repeats):
    return dict(zip(("p50", "p95"), percentiles(call_times(call, repeats))))


def untrained_model(folder, arch=ARCH, image_size=224, num_classes=CLASSES):
    """A checkpoint, its MindIR and labels.json for a randomly initialised network: latency does not depend on the
    weights."""
    import datasets
    import export
    from resnet import create_model
    net = create_model(arch, num_classes)
    export.save_checkpoint(net, folder / f"{arch}-best.ckpt")
    export.export_graph(net, image_size, folder / f"{arch}-best.mindir")
    export.export_graph(net, image_size, folder / f"{arch}-best.onnx")
    export.write_labels(folder / "labels.json", [f"class_{i}" for i in range(num_classes)], image_size,
                        datasets.IMAGENET_MEAN, datasets.IMAGENET_STD, arch, "none", "imagefolder")
    return folder


CHILDREN = {"convolutions": convolutions, "train-ours": train_ours, "train-seed": train_seed, "train-torch": train_torch,
            "pipeline": pipeline, "infer": infer, "infer-torch": infer_torch}


def child(name, arguments):
    result = CHILDREN[name](*arguments)
    print("RESULT " + json.dumps({"value": result, "peak_rss_mb": peak_rss_mb()}), flush=True)


# ---------------------------------------------------------------- the parent: interleaved rounds

def measure(name, arguments, env_changes):
    """Runs one child process; its result and peak RSS."""
    env = dict(os.environ, GLOG_v="3")
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    result = subprocess.run([sys.executable, __file__, "--child", name, json.dumps(arguments)], env=env,
                            capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"error: {name} {arguments} failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(lines[-1][len("RESULT "):])


STOCK = {"ONEDNN_MAX_CPU_ISA": None}
DISABLE_ONEDNN = "RESNET_ONEDNN_CONV"
AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_WAIT_POLICY": "PASSIVE"}  # as train.py runs (onednn_conv.quiet_openmp)


def parse_shape(text):
    size, batch = text.lower().split("x")[0], text.lower().split("b")[-1]
    return int(size), int(batch)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=("train", "convolutions", "pipeline", "inference"), action="append")
    parser.add_argument("--shapes", nargs="+", default=["32x32b32", "224x224b8"],
                        help="training shapes, SIZExSIZEbBATCH")
    parser.add_argument("--steps", type=int, default=14, help="training steps per measurement (4 are warm-up)")
    parser.add_argument("--stock-224", action="store_true",
                        help="also time the stock seed loop at 224 (about 2 minutes a step here)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for our runs (to try a setting)")
    parser.add_argument("--context", action="append", default=[], metavar="KEY=JSON",
                        help="extra mindspore.set_context setting for our runs, e.g. enable_graph_kernel=true")
    parser.add_argument("--variants", nargs="+", default=["ours", "ours mindspore", "ours conv", "seed AVX2",
                                                          "seed stock", "torch"],
                        help="which training variants to run ('ours conv': ours with convolutions on small maps too)")
    parser.add_argument("--repeats", type=int, default=30, help="inference: timed batch-1 calls per round")
    parser.add_argument("--batch", type=int, default=32, help="inference: the batch of the throughput column")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        return child(args.child, json.loads(rest[0]))
    parts = args.only or ["train", "convolutions", "pipeline", "inference"]
    ours_env = dict(kv.split("=", 1) for kv in args.env)
    if args.context:
        ours_env["BENCH_MS_CONTEXT"] = json.dumps({k: json.loads(v) for k, v in (kv.split("=", 1)
                                                                                for kv in args.context)})
    try:
        import torch_resnet
        torch_resnet.import_torchvision()
        have_torch = True
    except ImportError:
        have_torch = False
        print("torch or torchvision is not installed: requirements.txt pins them (make venv); PyTorch columns "
              "skipped")

    print(f"{cpu_name()}, {os.cpu_count()} cores, {platform.python_version()}, "
          f"median of {args.rounds} interleaved rounds; images/s unless marked", flush=True)
    results = {}

    def record(key, name, arguments, env):
        results.setdefault(key, []).append(measure(name, arguments, env))

    shapes = [parse_shape(s) for s in args.shapes]
    wanted = set(args.variants)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "pipeline" in parts:
            from make_demo_data import make_demo_data
            cifar, _ = make_demo_data(tmp / "cifar", 1024, 16, num_classes=4, seed=0)
            photos = write_photos(tmp / "photos", 256)
        if "inference" in parts:
            untrained_model(tmp)
        for round_ in range(args.rounds):
            print(f"round {round_ + 1}/{args.rounds} ...", flush=True)
            if "train" in parts:
                for size, batch in shapes:
                    steps = [size, batch, args.steps]
                    slow = [size, batch, WARMUP_STEPS + 2]  # the stock loop takes seconds to minutes a step
                    if "ours" in wanted:
                        record(("ours", size, batch), "train-ours", steps, AVX2)
                        if ours_env:  # the setting being tried, right after the baseline, in every round
                            record(("ours, tried", size, batch), "train-ours", steps, {**AVX2, **ours_env})
                    if "ours conv" in wanted:  # what resnet.Conv2d's small-map matmul gains
                        record(("ours conv", size, batch), "train-ours", steps + [False], {**AVX2, DISABLE_ONEDNN: "0"})
                    if "ours mindspore" in wanted:  # what oneDNN's blocked kernels gain
                        record(("ours mindspore", size, batch), "train-ours", steps, {**AVX2, DISABLE_ONEDNN: "0"})
                    if "seed AVX2" in wanted:
                        record(("seed AVX2", size, batch), "train-seed", steps, AVX2)
                    if "seed stock" in wanted and (size <= 64 or args.stock_224):
                        record(("seed stock", size, batch), "train-seed", slow, STOCK)
                    if "torch" in wanted and have_torch:
                        record(("torch", size, batch), "train-torch", steps, {})
            if "convolutions" in parts and round_ == 0:  # interleaved within the one process
                for size, batch in shapes:
                    record(("convolutions", size, batch), "convolutions", [size, batch], AVX2)
            if "pipeline" in parts:
                record(("pipeline", 32, 32), "pipeline", [str(cifar), 32, 32, 60], AVX2)
                record(("pipeline", 224, 8), "pipeline", [str(photos), 224, 8, 60], AVX2)
            if "inference" in parts:
                for name in ("onnx", "mindir", "ckpt"):
                    record(name, "infer", [str(tmp / f"{ARCH}-best.{name}"), args.repeats, args.batch], AVX2)
                if ours_env:
                    record("mindir, tried", "infer", [str(tmp / f"{ARCH}-best.mindir"), args.repeats, args.batch],
                           {**AVX2, **ours_env})
                if have_torch:
                    record("torch", "infer-torch", [args.repeats, args.batch], {})
    report(results, args, shapes)


def field(run, path):
    for key in path:
        run = run[key]
    return run


def median(runs, *path):
    """The median over rounds of one field of the children's results: ("value",), ("peak_rss_mb",), ("value", "p50")."""
    return statistics.median(field(r, path or ("value",)) for r in runs)


def per_round(runs, baseline, *path):
    """runs/baseline for each round, as text."""
    path = path or ("value",)
    return ", ".join(f"{field(r, path) / field(b, path):.2f}" for r, b in zip(runs, baseline))


def report(results, args, shapes):
    if any(isinstance(k, tuple) and k[0] != "pipeline" for k in results):
        tried = f"; tried: {' '.join(args.env + args.context)}" if args.env or args.context else ""
        print(f"\ntraining step, {ARCH}, fp32 (peak RSS in MB){tried}")
        print(f"{'':<12}" + "".join(f"{f'{s}x{s} b{b}':>22}" for s, b in shapes))
        for name in ("ours", "ours, tried", "ours mindspore", "ours conv", "seed AVX2", "seed stock", "torch"):
            if not any((name, size, batch) in results for size, batch in shapes):
                continue
            cells = []
            for size, batch in shapes:
                runs = results.get((name, size, batch))
                cells.append(f"{median(runs):>12.1f} ({median(runs, 'peak_rss_mb'):>5.0f} MB)" if runs else
                             f"{'-':>22}")
            print(f"{name:<12}" + "".join(f"{c:>22}" for c in cells))
        for size, batch in shapes:
            ours = results.get(("ours", size, batch))
            if not ours:
                continue
            line = [f"{size}x{size} b{batch}:"]
            for name in ("ours mindspore", "ours conv", "seed stock", "seed AVX2", "torch"):
                if (name, size, batch) in results:
                    line.append(f"ours/{name} {median(ours) / median(results[(name, size, batch)]):.2f}x")
            if ("ours, tried", size, batch) in results:
                line.append("tried/ours per round: " + per_round(results[("ours, tried", size, batch)], ours))
            if ("ours mindspore", size, batch) in results:
                line.append("(ours/ours mindspore per round: "
                            + per_round(ours, results[("ours mindspore", size, batch)]) + ")")
            if ("torch", size, batch) in results:
                line.append(f"(ours/torch per round: {per_round(ours, results[('torch', size, batch)])})")
            print("  ratio " + "  ".join(line))
    for size, batch in shapes:
        if ("convolutions", size, batch) in results:
            report_convolutions(results[("convolutions", size, batch)][0]["value"], size, batch)
    for size, batch in ((32, 32), (224, 8)):
        runs = results.get(("pipeline", size, batch))
        if runs:
            kind = "CIFAR binary, crop+flip" if size == 32 else "500x375 JPEG, RandomCropDecodeResize+flip"
            consumed = results.get(("ours", size, batch))
            ratio = f", {median(runs) / median(consumed):.1f}x what our step consumes" if consumed else ""
            print(f"data pipeline {size}x{size} b{batch} ({kind}): {median(runs):.0f} images/s "
                  f"({median(runs, 'peak_rss_mb'):.0f} MB){ratio}")
    if "onnx" in results:
        report_inference(results, args)


def report_convolutions(rows, size, batch):
    print(f"\neach convolution of {ARCH}'s training step at {size}x{size} b{batch}: ms forward+backward per call "
          f"(median of 5, interleaved); before = MindSpore's convolution or resnet.Conv2d's matmul, after = what "
          f"resnet.Conv2d chooses now; gemm = the matmul on oneDNN's GEMM, where resnet.Conv2d runs a matmul; dense = "
          f"the tiny-map dense matrix (on that GEMM), where it is no larger than the weight")
    print(f"{'layers':<26}{'in->out':>11} {'k':>2} {'s':>2} {'map':>4}  {'conv':>7} {'matmul':>7} {'gemm':>7} "
          f"{'oneDNN':>7} {'dense':>7}  "
          f"{'before':>7} {'after':>7}  after/before")
    totals = {"before": 0.0, "after": 0.0}
    for row in rows:
        count = len(row["layers"])
        names = f"{row['layers'][0]}{f' +{count - 1}' if count > 1 else ''}"
        times = [row[path] for path in CONVOLUTION_PATHS]
        before, after = row[row["before"]], row[row["after"]]
        totals["before"] += count * before
        totals["after"] += count * after
        print(f"{names:<26}{row['in']:>5}->{row['out']:<5} {row['kernel']:>2} {row['stride']:>2} "
              f"{row['input'][-1]:>4}  " + " ".join(f"{t:>7.2f}" if t == t else f"{'-':>7}" for t in times)
              + f"  {before:>7.2f} {after:>7.2f}  {after / before:.2f}x")
    print(f"all convolutions of a step: before {totals['before']:.0f} ms, after {totals['after']:.0f} ms "
          f"({totals['before'] / totals['after']:.2f}x faster)")


def report_inference(results, args):
    print(f"\ninference, {ARCH} 224x224, network only: batch-1 latency (ms), batch-{args.batch} images/s, peak RSS")
    names = [n for n in ("onnx", "mindir", "ckpt", "mindir, tried", "torch") if n in results]
    for name in names:
        runs = results[name]
        print(f"{name:<15}p50 {median(runs, 'value', 'p50'):>7.1f}  p95 {median(runs, 'value', 'p95'):>7.1f}  "
              f"b{args.batch} {median(runs, 'value', 'images_per_s'):>6.1f} img/s  ({median(runs, 'peak_rss_mb'):.0f} MB)")
    if "mindir, tried" in results:
        print("  ratio tried/mindir p50 per round: "
              + per_round(results["mindir, tried"], results["mindir"], "value", "p50"))
    reference = "torch" if "torch" in results else "ckpt"
    for name in names:
        if name == reference:
            continue
        runs, base = results[name], results[reference]
        latency = median(runs, "value", "p50") / median(base, "value", "p50")
        rate = median(runs, "value", "images_per_s") / median(base, "value", "images_per_s")
        print(f"  ratio {name}/{reference}: p50 latency {latency:.2f}x (per round "
              f"{per_round(runs, base, 'value', 'p50')}), b{args.batch} throughput {rate:.2f}x")


if __name__ == "__main__":
    main()
