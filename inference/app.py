"""Serve a classifier that train.py produced, as a Gradio app: on Xihe's inference pod, or locally.

    python inference/app.py --model OUT/resnet50-best.onnx        # or .ckpt / .mindir; labels.json is read beside it
    python inference/app.py                                       # the model file in inference/ (Xihe's way)

An .onnx is served on onnxruntime, without MindSpore (what the pod installs); a .ckpt or .mindir needs MindSpore.

Listens on GRADIO_SERVER_NAME:GRADIO_SERVER_PORT when set, else 127.0.0.1:7860. The API endpoint is `/predict`:
one image in, a `gr.Label` value out whose `label` is the class name as in labels.json.
"""
import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from predictor import MAX_PIXELS, BadImage, Predictor, find_model, read_image  # noqa: E402
import run_state  # noqa: E402  (train/train_dir, put on the path by predictor)
from errors import UserError  # noqa: E402

TOP_K = 5
EXAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg")


def model_card(predictor):
    """A few lines on what is served: arch, classes, input size and, when metrics.json is beside it, accuracy."""
    labels = predictor.labels
    lines = [f"**Model** `{predictor.model_path.name}`: {labels.get('arch', 'resnet')} trained on "
             f"{labels.get('dataset', 'its data')}, {len(predictor.class_names)} classes at "
             f"{predictor.image_size}x{predictor.image_size}.",
             "**Classes:** " + ", ".join(predictor.class_names) + "."]
    metrics = predictor.model_path.parent / run_state.METRICS
    try:
        history = json.loads(metrics.read_text())
        best = max(history, key=lambda r: r["val_accuracy"])
        lines.append(f"**Best validation accuracy:** {best['val_accuracy']:.1%} (epoch {best['epoch']} of "
                     f"{len(history)}).")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return "\n\n".join(lines)


def example_images(predictor):
    """Validation images that training saved in examples/ beside the model; on the platform's pod, where the
    model_path files all land in inference/, the images listed there."""
    model_dir = predictor.model_path.parent
    folders = [model_dir / run_state.EXAMPLES, HERE / run_state.EXAMPLES] + ([HERE] if model_dir == HERE else [])
    for folder in folders:
        if folder.is_dir():
            found = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in EXAMPLE_SUFFIXES)
            if found:
                return found
    return []


def explain_upload_error(component):
    """Gradio opens an upload with PIL before our function runs; turn its failures into our one-line messages."""
    import gradio as gr
    original = component.preprocess

    def preprocess(payload):
        try:
            return original(payload)
        except Exception:
            path = getattr(payload, "path", None)
            try:
                read_image(path)
            except BadImage as bad:
                raise gr.Error(str(bad)) from None
            raise
    component.preprocess = preprocess
    return component


def build_app(predictor, top_k=TOP_K):
    import gradio as gr

    def predict(image_path):
        if image_path is None:
            raise gr.Error("upload an image first")
        try:
            (ranked,) = predictor.predict([image_path], top_k=top_k)
        except BadImage as bad:
            raise gr.Error(str(bad)) from None
        return dict(ranked)

    with gr.Blocks(title="ResNet image classifier") as app:
        gr.Markdown("## ResNet image classifier\n\n" + model_card(predictor))
        with gr.Row():
            image = explain_upload_error(gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                                  label="Image (drop a file here)"))
            label = gr.Label(num_top_classes=top_k, label="Prediction")
        button = gr.Button("Classify", variant="primary")
        button.click(predict, inputs=image, outputs=label, api_name="predict")
        examples = example_images(predictor)
        if examples:
            gr.Examples(examples, inputs=image)
    # One prediction at a time: the model already uses every core, and the queue keeps later requests waiting.
    return app.queue(default_concurrency_limit=1, max_size=256)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.environ.get("MODEL_PATH"),
                        help="an .onnx, .ckpt or .mindir written by train.py (default: $MODEL_PATH, else the one in "
                             "inference/: an .onnx when onnxruntime is installed)")
    parser.add_argument("--labels", help="labels.json (default: beside the model)")
    parser.add_argument("--top_k", type=int, default=TOP_K)
    return parser.parse_args(argv)


def main(argv=None):
    from PIL import Image
    args = parse_args(argv)
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # Gradio's own opening of an upload refuses bombs too
    try:
        predictor = Predictor.load(args.model or find_model(HERE), args.labels)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    host = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
    port = int(os.environ.get("GRADIO_SERVER_PORT", "7860"))
    print(f"serving {predictor.model_path} ({len(predictor.class_names)} classes) on http://{host}:{port}", flush=True)
    build_app(predictor, args.top_k).launch(server_name=host, server_port=port, share=False, show_error=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
