"""Writing the job's outputs: checkpoints, labels.json, metrics.json, curves.png and the MindIR export.

Every file is written to a temporary name and renamed into place, so a killed job never leaves a half-written output.
A write that fails removes its temporary file, and a full, read-only or vanished disk ends the job with one
`errors.OutputError` naming the file and its folder.
"""
import contextlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from errors import one_line, write_fault


def _temporary(path):
    # MindSpore appends ".ckpt"/".mindir" to names that lack them, so keep the suffix last.
    return path.with_name(f".{path.stem}.partial{path.suffix}")


@contextlib.contextmanager
def _disk_faults(path):
    """A disk fault while writing `path` becomes one OutputError naming it."""
    try:
        yield
    except Exception as exc:
        fault = write_fault(exc, path.parent, path.name)
        if fault is None:
            raise
        raise fault from None


@contextlib.contextmanager
def atomic_write(path):
    """Yields the temporary name to write `path` to, then renames it into place. On failure the temporary file (and
    MindSpore's own `.tmp` beside it) is removed, so no partial file is left behind, and a full, read-only or
    vanished disk raises one OutputError (found before the removal frees the space that tells it)."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        with _disk_faults(path):
            yield tmp
            os.replace(tmp, path)
    except BaseException:
        for leftover in (tmp, tmp.with_suffix(".tmp")):
            with contextlib.suppress(OSError):
                leftover.unlink()
        raise


class _NoSaveFailureLine(logging.Filter):
    """MindSpore logs a CRITICAL line of its own when a checkpoint cannot be saved; the job's error line says it."""

    def filter(self, record):
        return not str(record.msg).startswith("Failed to save the checkpoint")


def _quiet_save_failures():
    from mindspore import log
    logger = getattr(log, "_get_logger", lambda: None)()
    if logger is not None and not any(isinstance(f, _NoSaveFailureLine) for f in logger.filters):
        logger.addFilter(_NoSaveFailureLine())


def write_json(path, data):
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def save_checkpoint(net, path, extra=None):
    """Atomically; a ResNet also records its padding, so the checkpoint reloads into the same network. `extra`
    adds scalar entries (ints, floats, strings)."""
    import mindspore as ms
    _quiet_save_failures()
    padding = getattr(net, "padding", None)
    append = {**({"resnet_padding": padding} if padding else {}), **(extra or {})}
    prefix = getattr(net, "parameter_prefix", "")  # a weight average's copy saves under the network's own names
    saved = [{"name": p.name[len(prefix):], "data": p} for p in net.get_parameters()] if prefix else net
    with atomic_write(path) as tmp:
        ms.save_checkpoint(saved, str(tmp), append_dict=append or None)


def write_labels(path, class_names, image_size, mean, std, arch, dataset, data_format, padding="same"):
    """What inference needs: the class names in label order, the network, and how validation prepared an image."""
    write_json(path, {"class_names": list(class_names), "num_classes": len(class_names), "image_size": image_size,
                      "mean": list(mean), "std": list(std), "input_scale": "0-255", "arch": arch,
                      "padding": padding, "dataset": dataset, "data_format": data_format})


def save_examples(images, labels, class_names, folder):
    """One validation image per class (of those given) as examples/<class>.png, for the inference app."""
    from PIL import Image
    folder = Path(folder)
    with _disk_faults(folder):
        folder.mkdir(parents=True, exist_ok=True)
    for image, label in zip(images, labels):
        path = folder / f"{class_names[label]}.png"
        if not path.exists():
            with atomic_write(path) as tmp:
                Image.fromarray(image).save(tmp, format="PNG")


GRAPH_FORMATS = {".mindir": "MINDIR", ".onnx": "ONNX", ".air": "AIR"}
ONNX_INPUT, ONNX_OUTPUT = "images", "logits"  # the ONNX graph's names, where MindSpore lets them be chosen
ONNX_TOLERANCE = 1e-4  # largest |logit difference| / max(1, |logit|) allowed between onnxruntime and MindSpore


def export_graph(net, image_size, path):
    """A graph with an NCHW float32 input, servable without the network's Python code: MindIR, ONNX or (on Ascend)
    AIR, as the file's suffix says. MindSpore exports the batch-1 shape; an ONNX file's batch axis is then made free
    when the onnx package is installed, so that other runtimes take batches."""
    import importlib.util

    import mindspore as ms
    net.set_train(False)
    sample = ms.Tensor(np.zeros((1, 3, image_size, image_size), np.float32))
    with atomic_write(path) as tmp:
        if Path(path).suffix == ".onnx" and importlib.util.find_spec("mindspore.onnx"):
            # MindSpore 2.3+ (ms.export's ONNX is deprecated there): names the graph's input and output
            from mindspore.onnx import export
            export(net, sample, file_name=str(tmp), input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT])
        else:
            ms.export(net, sample, file_name=str(tmp.with_suffix("")), file_format=GRAPH_FORMATS[Path(path).suffix])
        if Path(path).suffix == ".onnx":
            free_batch_axis(tmp)


def free_batch_axis(path):
    """Names the first axis of an ONNX graph's inputs and outputs "batch" instead of 1, and makes a reshape to a
    constant batch-1 shape (MindSpore up to 2.2 flattens the pooled features so: [1, 2048]) keep the batch instead
    (0: Reshape's "copy this axis"). The export check then runs a whole batch through the graph."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        return
    model = onnx.load(str(path))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    constants = {tensor.name: tensor for tensor in model.graph.initializer}
    constants.update({node.output[0]: attribute.t for node in model.graph.node if node.op_type == "Constant"
                      for attribute in node.attribute if attribute.name == "value"})
    for node in model.graph.node:
        shape = constants.get(node.input[1]) if node.op_type == "Reshape" else None
        values = numpy_helper.to_array(shape) if shape is not None else None
        if values is not None and values.ndim == 1 and len(values) > 1 and values[0] == 1:
            shape.CopyFrom(numpy_helper.from_array(np.concatenate([[0], values[1:]]).astype(values.dtype),
                                                   shape.name))
    del model.graph.value_info[:]  # inner shapes MindSpore recorded for batch 1; onnxruntime infers them again
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


class OnnxRuntimeFailed(Exception):
    """onnxruntime could not load or run the exported file (rather than MindSpore failing to compute the reference)."""


def onnx_difference(path, net, inputs):
    """The largest |logit difference| / max(1, |logit|) between onnxruntime running the ONNX file on `inputs` (an
    NCHW float32 batch) and `net` in inference mode. OnnxRuntimeFailed when onnxruntime cannot run the file."""
    import mindspore as ms
    from trained_model import onnx_forward
    inputs = np.asarray(inputs, np.float32)
    try:
        got = onnx_forward(path)(inputs)
    except Exception as exc:
        raise OnnxRuntimeFailed(one_line(exc)) from exc
    net.set_train(False)
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)  # one batch: op by op is quicker than compiling a graph for it
    try:
        expected = net(ms.Tensor(inputs)).asnumpy()
    finally:
        ms.set_context(mode=mode)
    return float((np.abs(got - expected) / np.maximum(1.0, np.abs(expected))).max())


def _save_figure(fig, path):
    import matplotlib.pyplot as plt
    path = Path(path)
    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_image_grid(images, titles, path, colours=None, columns=8):
    """A grid of HWC uint8 images with a title each (the tutorial's sample and prediction pictures). The images are
    one mosaic on one axes: an axes each took a job 0.5 s to build and 0.4 s more to lay out, twice an epoch."""
    from PIL import Image
    if len(titles) != len(images) or (colours is not None and len(colours) != len(images)):
        raise ValueError(f"{len(images)} images, {len(titles)} titles and {len(colours or [])} colours")
    plt = _pyplot()
    images = [np.atleast_3d(np.asarray(image, dtype=np.uint8)) for image in images]
    images = [np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[..., :3] for image in images]
    rows = max(1, -(-len(images) // columns))
    height, width = (max(sides) for sides in zip((32, 32), *(image.shape[:2] for image in images)))
    # Each image fits a height x width box, its shape kept, whose longer side is drawn 1.4 inches long; a cell adds
    # 0.1 inch at the sides and below and 0.5 inch above for the title (a square cell is 1.6 x 2.0 inches).
    inch = max(height, width) / 1.4
    cell_width, cell_height = round(width + 0.2 * inch), round(height + 0.6 * inch)
    mosaic = np.full((rows * cell_height, columns * cell_width, 3), 255, dtype=np.uint8)
    fig = plt.figure(figsize=(columns * cell_width / inch, rows * cell_height / inch))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.axis("off")
    for i, (image, title) in enumerate(zip(images, titles)):
        scale = min(height / image.shape[0], width / image.shape[1])
        if scale != 1:
            size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
            image = np.asarray(Image.fromarray(image).resize(size, Image.NEAREST))
        row, column = divmod(i, columns)
        top = (row + 1) * cell_height - round(0.1 * inch) - (height + image.shape[0]) // 2
        left = column * cell_width + (cell_width - image.shape[1]) // 2
        mosaic[top:top + image.shape[0], left:left + image.shape[1]] = image
        ax.text(left + image.shape[1] / 2, top - 0.05 * inch, title, ha="center", va="bottom", fontsize=7,
                color=colours[i] if colours else "black")
    ax.imshow(mosaic)
    return _save_figure(fig, path)


def plot_confusion(matrix, class_names, path):
    """Rows: true class; columns: predicted class; counts in the cells."""
    plt = _pyplot()
    matrix = np.asarray(matrix, dtype=np.int64)
    size = max(4, 0.5 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ticks = range(len(class_names))
    ax.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="true", title="validation confusion matrix")
    ax.set_xticklabels(class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticklabels(class_names, fontsize=8)
    for (row, col), count in np.ndenumerate(matrix):
        ax.text(col, row, str(count), ha="center", va="center", fontsize=7,
                color="white" if count > matrix.max() / 2 else "black")
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_curves(history, path):
    """Loss (train and val) and val accuracy by epoch."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], "o-", label="val")
    ax_loss.set(title="loss", xlabel="epoch")
    ax_loss.legend()
    ax_acc.plot(epochs, [r["val_accuracy"] for r in history], "o-", color="tab:green")
    ax_acc.set(title="val accuracy", xlabel="epoch", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.set_xticks(epochs)
    fig.tight_layout()
    return _save_figure(fig, path)
