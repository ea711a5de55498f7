"""The fine-tuning recipe's parts, each shown to do what it says: the smoothed loss is the formula, mixed batches hold
the blends their soft labels state, clipping bounds the update, AdamW decays off the gradient, the schedules follow
their formulas, early stopping stops at the right epoch and exports the best, and a recipe yields to explicit flags."""
import json
import math

import mindspore as ms
import mindspore.nn as nn
import numpy as np
import pytest
from conftest import assert_fails_cleanly, read_json, run_train
from PIL import Image

import args as job_args
import callbacks
import datasets
import train_step
from make_demo_data import make_demo_data


def log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_the_smoothed_loss_is_the_formula_also_for_soft_labels(smoothing):
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3, size=(6, 5)).astype(np.float32)
    logits[0] = [60, -60, 0, 0, 0]  # a large margin, where the sparse loss of MindSpore 2.10 gives inf on CPU
    labels = np.array([1, 0, 2, 4, 3, 1], np.int32)
    loss = train_step.create_loss(label_smoothing=smoothing)
    targets = (1 - smoothing) * np.eye(5)[labels] + smoothing / 5
    expected = -(targets * log_softmax(logits)).sum(1).mean()
    got = float(loss(ms.Tensor(logits), ms.Tensor(labels)).asnumpy())
    assert math.isclose(got, expected, rel_tol=1e-5), (got, expected)

    soft = rng.dirichlet(np.ones(5), size=6).astype(np.float32)  # mixup/cutmix labels
    expected = -(((1 - smoothing) * soft + smoothing / 5) * log_softmax(logits)).sum(1).mean()
    got = float(loss(ms.Tensor(logits), ms.Tensor(soft)).asnumpy())
    assert math.isclose(got, expected, rel_tol=1e-5), (got, expected)


# ---------------------------------------------------------------- mixup and cutmix batches

COLOURS = [0, 70, 140, 210]  # each class one flat grey: a crop of it is the same grey, so blends can be read back


def flat_source(folder, per_class=12):
    items = []
    for label, value in enumerate(COLOURS):
        for i in range(per_class):
            path = folder / f"{label}-{i}.png"
            Image.new("RGB", (20, 20), (value,) * 3).save(path)
            items.append((path, label))
    return datasets.DataSource("imagefolder", folder, [str(v) for v in COLOURS], items, items[:4],
                               sizes={"train": len(items), "val": 4})


def normalised(value, channel=0):
    return (value - datasets.IMAGENET_MEAN[channel]) / datasets.IMAGENET_STD[channel]


@pytest.mark.parametrize("mix", [{"mixup": 0.4}, {"cutmix": 1.0}, {"mixup": 0.4, "cutmix": 1.0}])
def test_mixed_batches_hold_the_blends_their_soft_labels_state(mix, tmp_path):
    """Every image's mean (mixup: every pixel) is the label-weighted mean of its sources' greys: the labels state
    exactly how much of each class the image holds."""
    ms.set_seed(4)
    regularisers = datasets.Regularisers(num_classes=len(COLOURS), **mix)
    data = datasets.create_dataset(flat_source(tmp_path), "train", 16, batch_size=8, workers=1,
                                   regularisers=regularisers)
    mixed_rows = 0
    for images, labels in data.create_tuple_iterator(output_numpy=True):
        assert labels.shape == (8, len(COLOURS)) and labels.dtype == np.float32
        np.testing.assert_allclose(labels.sum(1), 1, atol=1e-5)
        expected = labels @ np.array([normalised(v) for v in COLOURS])
        np.testing.assert_allclose(images[:, 0].mean((1, 2)), expected, atol=0.02)
        if mix.keys() == {"mixup"}:
            np.testing.assert_allclose(images[:, 0], np.broadcast_to(expected[:, None, None], images[:, 0].shape),
                                       atol=0.02)
        mixed_rows += int((labels.max(1) < 0.999).sum())
    assert mixed_rows > 0  # not every draw kept whole images


def test_random_erasing_blanks_a_rectangle_and_the_policies_change_images(tmp_path):
    source = flat_source(tmp_path)
    white = tmp_path / "white.png"
    Image.new("RGB", (20, 20), (255, 255, 255)).save(white)
    source.train = [(white, 0)] * 16
    erased = datasets.create_dataset(source, "train", 16, 16, workers=1,
                                     regularisers=datasets.Regularisers(random_erasing=1.0))
    images, _ = next(erased.create_tuple_iterator(output_numpy=True))
    blank = (images == 0).all(1)  # erased to 0, the mean colour after normalising
    assert blank.any((1, 2)).all() and not blank.all((1, 2)).any()  # a part of every image, never all of it

    photo = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(photo)
    source.train = [(photo, 0)] * 16
    for policy in ("randaugment", "trivialaugment", "autoaugment"):
        ops = datasets._transforms(source, 16, True, datasets.Regularisers(auto_augment=policy))
        assert sum(type(op).__name__.lower() in ("randaugment", "trivialaugmentwide", "autoaugment")
                   for op in ops) == 1
        ms.set_seed(1)
        plain = datasets.create_dataset(source, "train", 16, 16, workers=1, shuffle=False)
        ms.set_seed(1)
        policed = datasets.create_dataset(source, "train", 16, 16, workers=1, shuffle=False,
                                          regularisers=datasets.Regularisers(auto_augment=policy))
        a = next(plain.create_tuple_iterator(output_numpy=True))[0]
        b = next(policed.create_tuple_iterator(output_numpy=True))[0]
        assert (np.abs(a - b).max((1, 2, 3)) > 1e-3).sum() >= 4, policy  # the policy changed several images


# ---------------------------------------------------------------- the update: clipping, AdamW, schedules

def dense_step(clip=0.0, kind="momentum", weight_decay=0.0, lr=1.0):
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    ms.set_seed(2)
    net = nn.SequentialCell([nn.Dense(4, 8), nn.ReLU(), nn.Dense(8, 3)])
    optimizer = train_step.create_optimizer(net, np.full(4, lr, np.float32), 0.0, weight_decay, kind=kind)
    step = train_step.TrainStep(train_step.LossAndCorrect(net, train_step.create_loss()), optimizer,
                                clip_grad_norm=clip)
    step.set_train()
    return net, step


def weights(net):
    return [p.asnumpy().copy() for p in net.get_parameters()]


def scalar(param):
    return param.asnumpy().item()


@pytest.mark.parametrize("clip", [0.05, 1000.0])
def test_clipping_bounds_the_norm_of_the_update(clip, momentum_kind):
    """Plain SGD at lr 1: the update is the gradient, so its global norm is the clipped gradient's."""
    images = np.random.default_rng(1).normal(scale=20, size=(8, 4)).astype(np.float32)
    labels = np.arange(8, dtype=np.int32) % 3
    free, step = dense_step()
    before = weights(free)
    step(ms.Tensor(images), ms.Tensor(labels))
    raw = math.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(before, weights(free))))
    clipped, step = dense_step(clip)
    assert type(step.optimizer).__name__ == momentum_kind
    before = weights(clipped)
    step(ms.Tensor(images), ms.Tensor(labels))
    norm = math.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(before, weights(clipped))))
    assert raw > 0.05
    assert math.isclose(norm, min(raw, clip), rel_tol=1e-4), (norm, raw, clip)


def test_the_validation_loss_is_the_plain_one_whatever_the_smoothing():
    import mindspore.dataset as ds
    net = dense_net()
    x = np.random.default_rng(3).normal(size=(12, 4)).astype(np.float32)
    y = np.arange(12, dtype=np.int32) % 3
    optimizer = train_step.create_optimizer(net, np.full(4, 0.1, np.float32), 0.9, 0.0)
    trainer = train_step.create_trainer(net, optimizer, 3, label_smoothing=0.4)
    scores = trainer.eval(ds.NumpySlicesDataset({"image": x, "label": y}, shuffle=False).batch(12),
                          dataset_sink_mode=False)
    net.set_train(False)
    plain = -log_softmax(net(ms.Tensor(x)).asnumpy())[np.arange(12), y].mean()
    assert math.isclose(scores["loss"], plain, rel_tol=1e-5)


def test_adamw_decays_weights_apart_from_the_gradient_and_never_biases():
    """Zero inputs, behind a closed ReLU, give the first layer a zero gradient: AdamW still shrinks its weights by
    lr x decay (decoupled from the gradient), and leaves its bias alone."""
    net, step = dense_step(kind="adamw", weight_decay=0.5, lr=0.1)
    assert isinstance(step.optimizer, nn.AdamWeightDecay)
    net[0].bias.set_data(ms.Tensor(np.full(8, -1.0, np.float32)))  # ReLU closed: no gradient reaches the bias either
    first_weight, first_bias = net[0].weight.asnumpy().copy(), net[0].bias.asnumpy().copy()
    step(ms.Tensor(np.zeros((8, 4), np.float32)), ms.Tensor(np.arange(8, dtype=np.int32) % 3))
    np.testing.assert_allclose(net[0].weight.asnumpy(), first_weight * (1 - 0.1 * 0.5), rtol=1e-6)
    np.testing.assert_allclose(net[0].bias.asnumpy(), first_bias, rtol=1e-6)


def test_the_schedules_follow_their_formulas():
    steps, epochs = 10, 9
    step = train_step.learning_rates(0.3, epochs, steps, 1, "step", gamma=0.5)  # default: thirds of 80 steps
    assert step[0] == pytest.approx(0.03) and step[9] == pytest.approx(0.3)
    after = np.arange(80)
    np.testing.assert_allclose(step[10:], 0.3 * 0.5 ** np.floor(after / (80 / 3)), rtol=1e-6)
    every = train_step.learning_rates(0.3, epochs, steps, 0, "step", step_epochs=2, gamma=0.1)
    np.testing.assert_allclose(every, 0.3 * 0.1 ** (np.arange(90) // 20), rtol=1e-5)
    constant = train_step.learning_rates(0.3, epochs, steps, 2, "constant")
    np.testing.assert_allclose(constant[20:], 0.3)
    np.testing.assert_allclose(constant[:20], 0.3 * np.arange(1, 21) / 20, rtol=1e-6)
    cosine = train_step.learning_rates(0.3, epochs, steps, 1)
    np.testing.assert_allclose(cosine, train_step.cosine_lr(0.3, epochs, steps, 1))


# ---------------------------------------------------------------- weight averaging and accumulation

def dense_net(seed=2, batch_norm=False):
    ms.set_seed(seed)
    return nn.SequentialCell([nn.Dense(4, 8), *([nn.BatchNorm1d(8)] if batch_norm else []), nn.ReLU(),
                              nn.Dense(8, 3)])


def sgd_step(net, momentum=0.9, **options):
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    optimizer = train_step.create_optimizer(net, np.full(20, 0.1, np.float32), momentum, 0.0)
    step = train_step.TrainStep(train_step.LossAndCorrect(net, train_step.create_loss()), optimizer, **options)
    step.set_train()
    return step


def test_the_weight_average_is_the_closed_form_after_a_few_updates(momentum_kind):
    """Of every parameter: weights, and BatchNorm's moving statistics (which the forward pass updates)."""
    net, copy = dense_net(batch_norm=True), dense_net(batch_norm=True)
    ms.load_param_into_net(copy, {p.name: ms.Parameter(ms.Tensor(p.asnumpy()), name=p.name)
                                  for p in net.get_parameters()})
    step = sgd_step(net, average=train_step.WeightAverage(net, copy, 0.9))
    assert type(step.optimizer).__name__ == momentum_kind  # the average must read the weights after the update
    x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    y = np.arange(8, dtype=np.int32) % 3
    seen = [weights(net)]
    for _ in range(5):
        step(ms.Tensor(x), ms.Tensor(y))
        seen.append(weights(net))
    expected = seen[0]
    for n in range(1, 6):  # d_n = min(0.9, (1 + n) / (10 + n)), then 0.9
        d = min(0.9, (1 + n) / (10 + n))
        expected = [d * e + (1 - d) * w for e, w in zip(expected, seen[n])]
    for got, want in zip(weights(copy), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert not np.allclose(weights(copy)[0], seen[-1][0])  # an average, not the last weights
    assert any("moving_mean" in p.name for p in copy.get_parameters())
    assert {p.name for p in step.get_parameters()} >= {"ema.0.weight", "ema_updates"}  # saved with resume.ckpt


def test_accumulating_n_steps_of_batch_b_is_one_step_of_batch_n_times_b(momentum_kind):
    x = np.random.default_rng(1).normal(size=(24, 4)).astype(np.float32)
    y = np.arange(24, dtype=np.int32) % 3
    accumulated, whole = dense_net(), dense_net()
    step_n, step_1 = sgd_step(accumulated, accumulate=3), sgd_step(whole)
    assert type(step_n.optimizer).__name__ == type(step_1.optimizer).__name__ == momentum_kind
    for _ in range(2):  # two updates, so momentum carries across
        before = weights(accumulated)
        for part in range(3):
            step_n(ms.Tensor(x[8 * part:8 * part + 8]), ms.Tensor(y[8 * part:8 * part + 8]))
            if part < 2:  # no update before the Nth step
                assert all(np.array_equal(a, b) for a, b in zip(before, weights(accumulated)))
        step_1(ms.Tensor(x), ms.Tensor(y))
        for a, b in zip(weights(accumulated), weights(whole)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert scalar(step_n.micro_step) == 0 and scalar(step_n.optimizer.global_step) == 2


def test_with_accumulation_the_schedule_counts_updates():
    import argparse
    import types

    import train
    from errors import UserError
    args = argparse.Namespace(epochs=3, lr=0.1, warmup_epochs=1.0, lr_schedule="cosine", lr_step_epochs=None,
                              lr_gamma=0.1, accumulate=4, batch_size=8)
    workers = types.SimpleNamespace(lr_scale=1.0)
    _, schedule = train.learning_rates(args, workers, 15)  # 15 steps an epoch: 3.75 updates
    assert len(schedule) == 12  # ceil(3 x 15 / 4) updates, not 45 steps
    np.testing.assert_allclose(schedule[:4], 0.1 * np.arange(1, 5) / 4, rtol=1e-6)  # warmup: round(3.75) updates
    args.warmup_epochs = 0.01  # less than an update: still one warmup update, not none
    assert train.learning_rates(args, workers, 15)[1][0] == pytest.approx(0.1)
    args.accumulate = 50
    with pytest.raises(UserError, match="more than the 45 steps of the whole run"):
        train.learning_rates(args, workers, 15)


def test_an_overflow_in_any_accumulated_step_skips_the_whole_update(momentum_kind):
    net = dense_net()
    scale = train_step.DynamicLossScale(initial=1024.0)
    step = sgd_step(net, loss_scale=scale, accumulate=2)
    assert type(step.optimizer).__name__ == momentum_kind
    x = np.random.default_rng(2).normal(size=(8, 4)).astype(np.float32)
    y = np.arange(8, dtype=np.int32) % 3
    bad = x.copy()
    bad[0, 0] = np.inf
    before = weights(net)
    step(ms.Tensor(x), ms.Tensor(y))
    step(ms.Tensor(bad), ms.Tensor(y))  # the second of two: the update they make is skipped
    assert all(np.array_equal(a, b) for a, b in zip(before, weights(net)))
    assert scalar(scale.value) == 512.0 and scalar(step.optimizer.global_step) == 0
    step(ms.Tensor(x), ms.Tensor(y))
    step(ms.Tensor(x), ms.Tensor(y))  # clean again: the sums were cleared, so this update is finite
    assert not np.array_equal(before[0], weights(net)[0]) and scalar(step.optimizer.global_step) == 1


# ---------------------------------------------------------------- early stopping and kept checkpoints

@pytest.mark.parametrize("scores, monitor, min_delta, waited", [
    ([0.5, 0.6, 0.6, 0.55], "val_accuracy", 0.0, 2),
    ([0.5, 0.55, 0.58, 0.59], "val_accuracy", 0.1, 3),  # improvements of min_delta or less do not count
    ([0.5, 0.6, 0.65, 0.7], "val_accuracy", 0.1, 1),    # 0.65 beats 0.5 by more: the new reference
    ([1.0, 0.9, 0.95, 0.8], "val_loss", 0.0, 0),        # lower is better
    ([float("nan"), 0.4, 0.3], "val_accuracy", 0.0, 1),  # a NaN epoch is no best
])
def test_epochs_without_improvement(scores, monitor, min_delta, waited):
    history = [{"epoch": i + 1, monitor: s} for i, s in enumerate(scores)]
    assert callbacks.epochs_without_improvement(history, monitor, min_delta) == waited


@pytest.mark.slow
def test_early_stop_stops_at_the_right_epoch_exports_the_best_and_keeps_the_k_best(tmp_path):
    make_demo_data(tmp_path / "data", train=192, val=64, num_classes=3, seed=2)
    out = tmp_path / "out"
    # No validation loss falls by 10 in an epoch: the first epoch is the reference, the stop comes 2 epochs later.
    flags = ["--data_url", tmp_path / "data" / "shapes", "--output_url", out, "--arch", "resnet18", "--image_size", 32,
             "--batch_size", 32, "--epochs", 6, "--lr", 0.02, "--early_stop", 2, "--min_delta", 10,
             "--monitor", "val_loss", "--keep_checkpoints", 2, "--aim_system_metrics", "false", "--recipe", "tutorial"]
    out.mkdir()
    (out / "resnet18-epoch25.ckpt").write_bytes(b"an earlier run's")  # another run's output: kept unless replaced
    assert_fails_cleanly(run_train(*flags), "holds another run's outputs (resnet18-epoch25.ckpt)")
    result = run_train(*flags, "--overwrite")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (out / "resnet18-epoch25.ckpt").exists()  # not one of this run's K best
    history = read_json(out / "metrics.json")
    assert [r["epoch"] for r in history] == [1, 2, 3] and history[-1]["stopped_early"] is True
    assert "early stop: val_loss has not improved by more than 10 for 2 epochs; stopping after epoch 3" in \
        result.stdout
    best = min(history, key=lambda r: r["val_loss"])["epoch"]
    assert callbacks.best_epoch(history) == best
    kept = sorted(history, key=lambda r: r["val_loss"])[:2]
    assert sorted(p.name for p in out.glob("resnet18-epoch*.ckpt")) == sorted(
        f"resnet18-epoch{r['epoch']}.ckpt" for r in kept)
    best_weights = ms.load_checkpoint(str(out / "resnet18-best.ckpt"))
    epoch_weights = ms.load_checkpoint(str(out / f"resnet18-epoch{best}.ckpt"))
    assert epoch_weights.keys() == best_weights.keys()
    for name, value in epoch_weights.items():
        if isinstance(value, ms.Parameter):
            np.testing.assert_array_equal(value.asnumpy(), best_weights[name].asnumpy())
    # the export is the best epoch's model
    graph = nn.GraphCell(ms.load(str(out / "resnet18-best.mindir")))
    from resnet import create_model
    net = create_model("resnet18", 3)
    ms.load_param_into_net(net, best_weights)
    net.set_train(False)
    x = np.random.default_rng(0).normal(size=(1, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(graph(ms.Tensor(x)).asnumpy(), net(ms.Tensor(x)).asnumpy(), atol=1e-4)

    resumed = run_train(*flags, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume: the run stopped early; nothing left to train" in resumed.stdout
    assert len(read_json(out / "metrics.json")) == 3
    other_monitor = run_train(*flags, "--resume", "auto", "--monitor", "val_accuracy")
    assert_fails_cleanly(other_monitor, "is of a run with --monitor val_loss")
    other_accumulate = run_train(*flags, "--resume", "auto", "--accumulate", 2)
    assert_fails_cleanly(other_accumulate, "resume it with --accumulate 1")
    longer = run_train(*flags, "--resume", "auto", "--early_stop", 0, "--epochs", 4)  # stopping is no verdict
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "resume: continuing after epoch 3 of 4" in longer.stdout
    assert [r["epoch"] for r in read_json(out / "metrics.json")] == [1, 2, 3, 4]

    from test_aim_runs import read_runs
    (run,) = read_runs(out).values()
    hparams = run["hparams"]
    assert hparams["recipe"] == "tutorial" and hparams["weight_decay"] == 0.0 and hparams["lr"] == 0.02
    (stop,) = [m for m in run.metrics() if m.name == "stopped_early"]
    assert stop.dataframe()["step"].tolist() == [3]


# ---------------------------------------------------------------- recipes

def parse(*argv):
    said = []
    parsed = job_args.apply_recipe(*_parsed(argv), say=said.append)
    return parsed, said


def _parsed(argv):
    parser = job_args.get_args_parser()
    parsed, _ = parser.parse_known_args(list(argv))
    return parsed, list(argv), parser


@pytest.mark.parametrize("lr_flag", [["--lr", "0.5"], ["--lr=0.5"]])
def test_a_recipe_sets_its_values_and_explicit_flags_win(lr_flag):
    parsed, said = parse("--data_path", "d", "--recipe", "mindcv", *lr_flag, "--epochs=3", "--unknown", "x")
    recipe = job_args.RECIPES["mindcv"]
    assert parsed.lr == 0.5 and parsed.epochs == 3
    for key in set(recipe) - {"lr", "epochs"}:
        assert getattr(parsed, key) == recipe[key], key
    assert said == [f"recipe mindcv: " + ", ".join(f"{k} {v}" for k, v in recipe.items() if k not in ("lr", "epochs"))
                    + " (given explicitly: epochs, lr)"]
    plain, said = parse("--data_url", "d")
    assert said == [] and plain.lr == 0.001 and plain.label_smoothing == 0.0


def test_every_recipe_names_only_real_flags_with_valid_values():
    parser = job_args.get_args_parser()
    actions = {action.dest: action for action in parser._actions}
    for name, recipe in job_args.RECIPES.items():
        for key, value in recipe.items():
            action = actions[key]
            if action.choices:
                assert value in action.choices, (name, key)
            elif action.type:
                assert action.type(str(value)) == value, (name, key)
