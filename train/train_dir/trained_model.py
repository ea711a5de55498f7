"""A model train.py produced, loaded for use: its labels.json, and its weights as a forward function.

A `.ckpt` is loaded into the network of resnet.py (the one definition), padded as it was trained; a `.mindir` runs
as a graph with no network code; an `.onnx` runs on onnxruntime, without MindSpore. Inference
(inference/predictor.py), evaluation (eval.py) and prediction (predict.py) load models here, and choose among a
folder's models here (`choose`).
"""
import json
from pathlib import Path

import numpy as np

import run_state
from errors import UserError


def read_labels(path):
    try:
        labels = json.loads(Path(path).read_text())
        names, size = labels["class_names"], int(labels["image_size"])
    except FileNotFoundError:
        raise UserError(f"{path} is missing: training writes labels.json next to the model; copy it there") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not a labels.json written by train.py ({exc})") from None
    if not names or size < 8:
        raise UserError(f"{path} has no class names or a bad image_size")
    return labels


MODEL_SUFFIXES = (".onnx", ".ckpt", ".mindir")  # preference: onnxruntime is the fastest and needs no MindSpore


def onnxruntime_works():
    try:
        import onnxruntime  # noqa: F401
        return True
    except Exception:  # not installed, or a build that does not load here
        return False


def choose(folder, device="CPU"):
    """The model to serve from a folder of train.py's outputs (or the pod's inference/): on CPU an .onnx when
    onnxruntime can be imported, else a .ckpt, else a .mindir; on a GPU or Ascend the .ckpt first (onnxruntime runs
    on the CPU). A model named *best* before any other; never the resume state. None if there is no model."""
    ranks = MODEL_SUFFIXES if device == "CPU" and onnxruntime_works() else MODEL_SUFFIXES[1:] + MODEL_SUFFIXES[:1]
    found = [p for p in Path(folder).iterdir()
             if p.suffix.lower() in ranks and p.name != run_state.RESUME and p.is_file()]
    return min(found, key=lambda p: ("best" not in p.name, ranks.index(p.suffix.lower()), p.name), default=None)


def load_network(model_path, labels):
    """The ResNet of resnet.py with the checkpoint's weights (of any family train.py reads), in inference mode,
    padded as the weights were trained."""
    return checkpoint_network(model_path, labels.get("arch", "resnet50"), len(labels["class_names"]))


def checkpoint_network(model_path, arch, classes_named=0):
    """`arch` built for the checkpoint's class count and padding, in fp32, with its weights, in inference mode."""
    import mindspore as ms
    from checkpoints import read_pretrained
    from resnet import ARCHS, create_model
    if arch not in ARCHS:
        raise UserError(f"labels.json names the network {arch!r}, which is none of {', '.join(sorted(ARCHS))}")
    checkpoint = read_pretrained(model_path)
    padding, params = checkpoint.padding, checkpoint.weights
    head = params.get("fc.weight")
    if head is None:
        raise UserError(f"{model_path} has no classifier (fc) weights to predict with")
    num_classes = head.shape[0]
    if num_classes < classes_named:
        raise UserError(f"{model_path} has {num_classes} outputs but labels.json names {classes_named} classes")
    net = create_model(arch, num_classes, padding)
    not_loaded, _ = ms.load_param_into_net(net, params)
    if not_loaded:
        raise UserError(f"{model_path} does not fit {arch}: {len(not_loaded)} parameters missing, "
                        f"e.g. {not_loaded[0]}")
    net.set_train(False)
    return net


def stage(args, device="CPU"):
    """Local paths of `args.model_url` (a model file, or a folder of train.py's outputs: the model `choose` takes
    for `device`) and of its labels.json when that is not beside it (`args.labels`, or beside a remote model)."""
    import staging
    import storage
    model = staging.stage_in(args.model_url, "model_url", args.cache_dir, io_timeout=args.io_timeout)
    if model.is_dir():
        found = choose(model, device)
        if found is None:
            raise UserError(f"model_url {storage.redact(args.model_url)} holds no .onnx, .ckpt or .mindir")
        model = found
    labels = args.labels and staging.stage_in(args.labels, "labels", args.cache_dir, io_timeout=args.io_timeout)
    if not labels and not storage.is_local(args.model_url) and not (model.parent / run_state.LABELS).exists():
        beside = f"{str(args.model_url).rsplit('/', 1)[0]}/{run_state.LABELS}"  # a remote file's neighbour
        labels = staging.stage_in(beside, "labels", args.cache_dir, io_timeout=args.io_timeout)
    return model, labels or None


def load(model_path, labels_path=None):
    """(labels, forward): `forward` maps an (N, 3, H, W) float32 batch to (N, outputs) logits as numpy. labels.json
    is read beside the model unless `labels_path` names it. Only a .ckpt or .mindir imports MindSpore."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise UserError(f"model file {model_path} does not exist")
    labels = read_labels(Path(labels_path) if labels_path else model_path.parent / run_state.LABELS)
    if model_path.suffix.lower() == ".onnx":
        return labels, onnx_forward(model_path, labels)
    try:
        import mindspore as ms
    except ImportError:
        raise UserError(f"{model_path.name} needs MindSpore (pip install mindspore); without it, serve the job's "
                        f".onnx with onnxruntime") from None
    if model_path.suffix.lower() == ".mindir":
        try:
            graph = ms.nn.GraphCell(ms.load(str(model_path)))
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"{model_path} is not a MindIR model ({str(exc).splitlines()[0]})") from None
        return labels, _one_at_a_time(lambda x: graph(ms.Tensor(x)).asnumpy())
    net = load_network(model_path, labels)
    return labels, lambda batch: net(ms.Tensor(np.asarray(batch, np.float32))).asnumpy().astype(np.float64)


def _one_at_a_time(run):
    """A batch forward from a graph exported for the batch-1 shape."""
    def forward(batch):
        return np.concatenate([run(np.asarray(x[None], np.float32)) for x in batch]).astype(np.float64)
    return forward


def onnx_session(model_path):
    """An onnxruntime session on every core for an ONNX file, and a function running it on one input array."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError(f"{model_path} is an ONNX model: serving it needs onnxruntime (pip install "
                        f"onnxruntime)") from None
    try:
        session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidProtobuf types
        raise UserError(f"{model_path} is not an ONNX model onnxruntime can run "
                        f"({str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__})") \
            from None
    name = session.get_inputs()[0].name
    return session, lambda x: session.run(None, {name: np.asarray(x, np.float32)})[0]


def onnx_forward(model_path, labels=None):
    """A batch forward on onnxruntime; with `labels`, a graph for another image size or fewer classes than
    labels.json names is refused here, not at the first request."""
    session, run = onnx_session(model_path)
    (graph_input, *more), output = session.get_inputs(), session.get_outputs()[0]
    inputs, outputs = graph_input.shape, output.shape
    if more or graph_input.type != "tensor(float)" or len(inputs) != 4 or inputs[1] != 3 or len(outputs) != 2:
        raise UserError(f"{model_path} is not an image classifier as train.py exports (inputs "
                        f"{[(i.type, i.shape) for i in session.get_inputs()]}; train.py's take one float32 batch "
                        f"of N x 3 x H x W images)")
    (batch_dim, _, height, width), outputs = inputs, outputs[1]
    if isinstance(batch_dim, int) and batch_dim != 1:
        raise UserError(f"{model_path} takes exactly {batch_dim} images at a time; train.py's take any number")
    if labels and isinstance(height, int) and [height, width] != [int(labels["image_size"])] * 2:
        raise UserError(f"{model_path} takes {height}x{width} images, but labels.json says image_size "
                        f"{labels['image_size']}: they are from different runs")
    if labels and isinstance(outputs, int) and outputs < len(labels["class_names"]):
        raise UserError(f"{model_path} has {outputs} outputs but labels.json names {len(labels['class_names'])} "
                        f"classes")
    if batch_dim == 1:  # exported before the batch axis was made free (or without the onnx package)
        return _one_at_a_time(run)
    return lambda batch: run(batch).astype(np.float64)


def softmax(logits):
    logits = np.asarray(logits, np.float64)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)
