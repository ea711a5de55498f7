"""Start app.py in its own process on 127.0.0.1 and wait until it answers: for smoke tests, benchmarks and the
test suite.

    with running_app(["--model", "OUT/resnet50-best.ckpt"]) as (url, client):
        client.predict(handle_file("dog.jpg"), api_name="/predict")
"""
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

APP = Path(__file__).resolve().parent / "app.py"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(app_args=(), python=sys.executable, app=APP, cwd=None, env=None, timeout=180):
    """Yields (url, gradio_client.Client); the app gets GRADIO_SERVER_NAME/PORT as the platform sets them."""
    from gradio_client import Client
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
    server = subprocess.Popen([str(python), str(app), *map(str, app_args)], env=env, cwd=cwd,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                client = Client(url, verbose=False)
                break
            except Exception:
                if server.poll() is not None or time.monotonic() > deadline:
                    server.kill()
                    raise RuntimeError(f"the app did not start: {server.stdout.read()[-3000:]}") from None
                time.sleep(1)
        yield url, client
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
