"""The callbacks around the training step: one meter reads each step, the others consume it, in a fixed order."""
import mindspore as ms
import mindspore.dataset as ds
import mindspore.nn as nn
import numpy as np
import pytest
from mindspore.train import Callback

import callbacks
import run_state
import runtime
import train_step
from conftest import read_json
from tracking import AimCallback

BATCH, STEPS, EPOCHS = 8, 5, 2


def separable(count, seed):
    """Three classes, each a shifted blob in 4 dimensions: a linear layer learns them."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, count).astype(np.int32)
    features = rng.normal(size=(count, 4)).astype(np.float32) + 3 * np.eye(3, 4, dtype=np.float32)[labels]
    return ds.NumpySlicesDataset({"image": features, "label": labels}, shuffle=False).batch(BATCH)


def test_the_meter_reads_each_step_once_and_the_records_are_built_from_it(tmp_path):
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    ms.set_seed(0)
    net = nn.Dense(4, 3)
    optimizer = train_step.create_optimizer(net, train_step.cosine_lr(0.1, EPOCHS, STEPS), 0.9, 0.0)
    trainer = train_step.create_trainer(net, optimizer, 3)
    meter = callbacks.StepMeter()
    steps = []

    class Spy(Callback):  # a consumer: what the step returned, against what the meter measured from it
        def on_train_step_end(self, run_context):
            loss, correct = (float(x.asnumpy()) for x in run_context.original_args().net_outputs)
            steps.append((loss, correct, meter.last))

    files = run_state.RunFiles(tmp_path, "dense")
    replaced = []  # what the best checkpoint was whenever new best weights were about to be saved

    def before_new_best():
        replaced.append(files.best_checkpoint.stat().st_mtime_ns if files.best_checkpoint.exists() else None)
    recorder = callbacks.EpochRecorder(meter, net, files, trainer.train_network, "run-id",
                                       before_new_best=before_new_best)
    trainer.fit(EPOCHS, separable(BATCH * STEPS, 0), valid_dataset=separable(24, 1),
                callbacks=[meter, Spy(), recorder], dataset_sink_mode=False)

    assert len(steps) == EPOCHS * STEPS
    for loss, correct, measured in steps:
        assert measured.loss == pytest.approx(loss) and measured.correct == correct
        assert measured.images == BATCH and measured.seconds > 0
    first, second = recorder.history
    assert first["train_loss"] == pytest.approx(np.mean([s[0] for s in steps[:STEPS]]))
    assert first["train_accuracy"] == pytest.approx(sum(s[1] for s in steps[:STEPS]) / (BATCH * STEPS))
    assert second["train_accuracy"] > first["train_accuracy"] - 0.2 and second["val_accuracy"] > 0.6  # it learned
    assert first["images_per_second"] > 0 and first["seconds"] > 0
    assert read_json(files.metrics) == recorder.history
    assert files.last_checkpoint.is_file() and files.best_checkpoint.is_file()
    assert len(replaced) == sum(r["best"] for r in recorder.history) and replaced[0] is None  # called before saving
    assert all(mtime < files.best_checkpoint.stat().st_mtime_ns for mtime in replaced[1:])
    resume = ms.load_checkpoint(str(files.resume))
    assert int(resume["epoch"]) == 2 and str(resume["aim_run"]) == "run-id"
    assert "moments.weight" in resume  # the optimiser's state, not just the weights


@pytest.mark.parametrize("workers", [runtime.Workers(), runtime.Workers(0, 2, 0)])
def test_callbacks_come_in_the_order_they_depend_on(workers, tmp_path):
    net = nn.Dense(4, 3)
    meter = callbacks.StepMeter()
    recorder = callbacks.EpochRecorder(meter, net, run_state.RunFiles(tmp_path, "dense"))
    tracker = AimCallback.__new__(AimCallback)  # only its place in the list matters here
    pushed = []
    order = callbacks.create_callbacks(meter, recorder, tracker, net, workers, EPOCHS, STEPS,
                                       lambda: pushed.append(1))
    kinds = [type(c).__name__ for c in order]
    expected = ["StepMeter", "StopOnSignal", "StopOnNonFiniteLoss", "EpochRecorder", "ConsoleProgress",
                "AimCallback", "EpochEndHook"]
    assert kinds == (["SyncBatchNormStatistics"] if workers.size > 1 else []) + expected
    assert order[kinds.index("StopOnNonFiniteLoss")].meter is meter
    order[-1].on_train_epoch_end(None)
    assert pushed == [1]


def test_workers_describe_their_share():
    single, second = runtime.Workers(), runtime.Workers(rank=1, size=4, local_rank=1)
    assert (single.leader, single.writes_outputs, single.shard, single.lr_scale) == (True, True, None, 1)
    assert (second.leader, second.writes_outputs, second.shard, second.lr_scale) == (False, False, (4, 1), 4)
    assert second.describe(16, 0.04) == " x 4 workers (rank 1), global batch 64, lr 0.04"
    assert single.describe(16, 0.01) == ""


def test_the_readme_aim_example_logs_a_plain_model(tmp_path):
    """The README's snippet: StepMeter + AimCallback in any Model.fit, read back through Aim's SDK."""
    from aim.storage.context import Context
    from mindspore.train import Model
    from test_aim_runs import read_runs
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    ms.set_seed(0)
    net = nn.Dense(4, 3)
    loss_fn = nn.CrossEntropyLoss()
    model = Model(net, loss_fn, nn.Momentum(net.trainable_params(), 0.1, 0.9),
                  metrics={"accuracy": nn.Accuracy(), "loss": nn.Loss(), "confusion": nn.ConfusionMatrix(3)})
    meter = callbacks.StepMeter()
    aim_cb = AimCallback(tmp_path, experiment="plain", hparams={"lr": 0.1}, meter=meter, class_names=["a", "b", "c"],
                         log_every=2, system_tracking=False)
    model.fit(EPOCHS, separable(BATCH * STEPS, 0), valid_dataset=separable(24, 1), callbacks=[meter, aim_cb])

    (run,) = read_runs(tmp_path).values()
    assert run["hparams"] == {"lr": 0.1} and run.end_time is not None  # closed at the end
    train_loss = run.get_metric("loss", Context({"subset": "train"})).dataframe()
    assert train_loss["step"].tolist() == [2, 4, 6, 8, 10]  # every 2nd of 10 steps
    assert np.isfinite(train_loss["value"]).all()
    val = run.get_metric("accuracy", Context({"subset": "val"})).dataframe()
    assert val["step"].tolist() == [1, 2] and val["value"].iloc[-1] > 0.6
    assert run.get_metric("class_accuracy", Context({"subset": "val", "class": "b"})) is not None


def test_a_short_last_batch_counts_the_images_it_has(tmp_path):
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    net = nn.Dense(4, 3)
    optimizer = train_step.create_optimizer(net, train_step.cosine_lr(0.1, 1, STEPS), 0.9, 0.0)
    trainer = train_step.create_trainer(net, optimizer, 3)
    meter, seen = callbacks.StepMeter(), []

    class Spy(Callback):
        def on_train_step_end(self, run_context):
            seen.append(meter.last.images)

    trainer.fit(1, separable(BATCH * STEPS - 3, 0), callbacks=[meter, Spy()], dataset_sink_mode=False)
    assert seen == [BATCH] * (STEPS - 1) + [BATCH - 3]
    assert meter.epoch.counted == BATCH * STEPS - 3 and meter.epoch.images == BATCH * STEPS - 3


def test_a_failed_fit_gives_the_stop_signals_back(tmp_path):
    """A callback that raises (a full disk at a checkpoint, a diverged loss) skips `on_train_end`, which would leave
    StopOnSignal's handler in place: a SIGTERM during the clean-up that follows would then only be noted, never
    acted on. `signals_restored` puts the job's own handlers back."""
    import signal
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    net = nn.Dense(4, 3)
    optimizer = train_step.create_optimizer(net, train_step.cosine_lr(0.1, 1, STEPS), 0.9, 0.0)
    trainer = train_step.create_trainer(net, optimizer, 3)

    class FailsAtStep2(Callback):
        def on_train_step_end(self, run_context):
            if run_context.original_args().cur_step_num == 2:
                raise OSError(28, "No space left on device")

    def ours(signum, frame):
        pass

    def fit():
        trainer.fit(1, separable(BATCH * STEPS, 0), callbacks=[callbacks.StopOnSignal(), FailsAtStep2()],
                    dataset_sink_mode=False)

    before = signal.signal(signal.SIGTERM, ours)
    try:
        with pytest.raises(OSError):
            fit()
        left = signal.getsignal(signal.SIGTERM)
        assert getattr(left, "__self__", None).__class__ is callbacks.StopOnSignal  # what the guard is for
        signal.signal(signal.SIGTERM, ours)
        with pytest.raises(OSError), callbacks.signals_restored():
            fit()
        assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        signal.signal(signal.SIGTERM, before)
