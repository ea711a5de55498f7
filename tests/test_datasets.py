"""Format detection, the CIFAR-10 binary reader, ImageFolder, and the pipelines' labels and pixels."""
import shutil
from collections import Counter

import numpy as np
import pytest

import datasets
from errors import UserError
from make_demo_data import make_split, write_cifar, write_cifar_file, write_imagefolder

NAMES = ["airplane", "automobile", "bird"]


def batches(dataset):
    return list(dataset.create_tuple_iterator(output_numpy=True))


@pytest.fixture
def cifar_split():
    return make_split(37, 3, seed=5), make_split(13, 3, seed=6)


def test_cifar_found_at_any_depth_with_names_and_labels(tmp_path, cifar_split):
    train, val = cifar_split
    write_cifar(tmp_path / "a" / "b" / "cifar-10-batches-bin", train, val, NAMES)
    source = datasets.find_data(tmp_path)
    assert source.kind == "cifar10-bin" and source.class_names == NAMES
    assert source.sizes == {"train": 37, "val": 13}

    val_data = datasets.create_dataset(source, "val", image_size=32, batch_size=5)
    got = batches(val_data)
    assert [len(labels) for _, labels in got] == [5, 5, 3]  # validation keeps the last partial batch
    np.testing.assert_array_equal(np.concatenate([labels for _, labels in got]), val[1])
    images = np.concatenate([image for image, _ in got])
    assert images.shape == (13, 3, 32, 32) and images.dtype == np.float32
    # Undoing the normalisation gives back the stored pixels: the CHW record order was read right.
    restored = images.transpose(0, 2, 3, 1) * datasets.IMAGENET_STD + datasets.IMAGENET_MEAN
    np.testing.assert_allclose(restored, val[0], atol=0.01)


def test_cifar_train_pipeline_shuffles_whole_batches_and_resizes(tmp_path, cifar_split):
    train, val = cifar_split
    write_cifar(tmp_path, train, val, NAMES)
    source = datasets.find_data(tmp_path)
    got = batches(datasets.create_dataset(source, "train", image_size=64, batch_size=8))
    assert len(got) == 37 // 8 and all(image.shape == (8, 3, 64, 64) for image, _ in got)
    seen = Counter(np.concatenate([labels for _, labels in got]).tolist())
    assert sum(seen.values()) == 32 and set(seen) <= {0, 1, 2}


def test_cifar_without_meta_gets_numbered_classes(tmp_path, cifar_split):
    train, val = cifar_split
    write_cifar_file(tmp_path / "data_batch_1.bin", *train)
    write_cifar_file(tmp_path / "data_batch_2.bin", *val)
    write_cifar_file(tmp_path / "test_batch.bin", *val)
    source = datasets.find_data(tmp_path)
    assert source.class_names == ["0", "1", "2"] and source.sizes == {"train": 50, "val": 13}


def test_truncated_cifar_file_is_named(tmp_path, cifar_split):
    train, val = cifar_split
    write_cifar(tmp_path, train, val, NAMES)
    batch = tmp_path / "data_batch_1.bin"
    batch.write_bytes(batch.read_bytes()[:-100])
    with pytest.raises(UserError, match="data_batch_1.bin.*whole number"):
        datasets.find_data(tmp_path)


def test_cifar_missing_validation_split(tmp_path, cifar_split):
    write_cifar_file(tmp_path / "data_batch_1.bin", *cifar_split[0])
    with pytest.raises(UserError, match="no validation split"):
        datasets.find_data(tmp_path)


def test_imagefolder_found_at_any_depth(tmp_path):
    splits = {"train": make_split(12, 2, seed=1), "val": make_split(6, 2, seed=2)}
    write_imagefolder(tmp_path / "data" / "Canidae", splits, ["wolves", "dogs"])  # label 0 = wolves
    source = datasets.find_data(tmp_path)
    assert source.kind == "imagefolder" and source.name == "Canidae"
    assert source.class_names == ["dogs", "wolves"]  # sorted folder names, not creation order
    assert source.sizes == {"train": 12, "val": 6}

    got = batches(datasets.create_dataset(source, "val", image_size=32, batch_size=4))
    labels = np.concatenate([labels for _, labels in got])
    expected = Counter({"wolves": int((splits["val"][1] == 0).sum()), "dogs": int((splits["val"][1] == 1).sum())})
    assert Counter(source.class_names[i] for i in labels) == expected
    assert got[0][0].shape == (4, 3, 32, 32)


def test_imagefolder_train_transform_crops_to_size(tmp_path):
    write_imagefolder(tmp_path, {"train": make_split(8, 2, 1, side=48), "val": make_split(4, 2, 2, side=48)},
                      ["a", "b"])
    source = datasets.find_data(tmp_path)
    image, label = batches(datasets.create_dataset(source, "train", image_size=40, batch_size=8))[0]
    assert image.shape == (8, 3, 40, 40) and sorted(label.tolist()) == [0] * 4 + [1] * 4


def test_imagefolder_class_mismatch(tmp_path):
    write_imagefolder(tmp_path, {"train": make_split(4, 2, 1)}, ["dogs", "wolves"])
    write_imagefolder(tmp_path, {"val": make_split(4, 2, 1)}, ["dogs", "foxes"])
    with pytest.raises(UserError, match="classes differ"):
        datasets.find_data(tmp_path)


def test_imagefolder_missing_val(tmp_path):
    write_imagefolder(tmp_path, {"train": make_split(4, 2, 1)}, ["dogs", "wolves"])
    with pytest.raises(UserError, match="no validation split"):
        datasets.find_data(tmp_path)


def test_imagefolder_split_without_images(tmp_path):
    write_imagefolder(tmp_path, {"train": make_split(4, 2, 1)}, ["dogs", "wolves"])
    shutil.copytree(tmp_path / "train", tmp_path / "val")
    for image in (tmp_path / "val").rglob("*.png"):
        image.unlink()
    with pytest.raises(UserError, match="val split .* no images"):
        datasets.find_data(tmp_path)


@pytest.mark.parametrize("content", [None, "notes.txt"])
def test_empty_or_unrecognised_folder(tmp_path, content):
    if content:
        (tmp_path / "sub").mkdir()
        (tmp_path / "sub" / content).write_text("hello")
    with pytest.raises(UserError, match="no dataset found"):
        datasets.find_data(tmp_path)


def test_training_split_smaller_than_a_batch(tmp_path, cifar_split):
    write_cifar(tmp_path, *cifar_split, NAMES)
    with pytest.raises(UserError, match="fewer than --batch_size 64"):
        datasets.create_dataset(datasets.find_data(tmp_path), "train", 32, batch_size=64)


def test_worker_count_is_clamped_to_cores():
    import os
    cores = os.cpu_count()
    assert datasets.worker_count(None) == cores
    assert datasets.worker_count(cores + 5) == cores
    assert datasets.worker_count(1) == 1
