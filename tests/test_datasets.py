"""Format detection, the CIFAR-10 binary reader, ImageFolder, and the pipelines' labels and pixels."""
import json
import re
import shutil
from collections import Counter

import numpy as np
import pytest
from PIL import Image

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


@pytest.mark.parametrize("exact", [False, True])
def test_a_resumed_pipeline_shuffles_its_epochs_as_an_uninterrupted_one(tmp_path, cifar_split, exact):
    """Resuming after N epochs gives the same data order; `exact` also the same random augmentations."""
    import mindspore.dataset as ds
    write_cifar(tmp_path, *cifar_split, NAMES)
    source = datasets.find_data(tmp_path)

    def epochs_seen(epochs_done, epochs=3):
        """(labels, images) of each epoch after the first `epochs_done`."""
        ds.config.set_seed(3)  # as train.py's ms.set_seed in a new process
        pipeline = datasets.create_dataset(source, "train", image_size=32, batch_size=8)
        datasets.skip_finished_epochs(pipeline, epochs_done, exact=exact)
        batches = pipeline.create_tuple_iterator(num_epochs=epochs, output_numpy=True)  # as Model.fit makes it
        seen = []
        for _ in range(epochs - epochs_done):
            images, labels = zip(*batches)
            seen.append((np.concatenate(labels).tolist(), np.concatenate(images)))
        return seen

    fast_recovery = ds.config.get_fast_recovery()
    try:
        uninterrupted = epochs_seen(0)
        assert len({str(labels) for labels, _ in uninterrupted}) == 3  # every epoch is shuffled anew
        for epochs_done in (1, 2):
            resumed = epochs_seen(epochs_done)
            assert [labels for labels, _ in resumed] == [labels for labels, _ in uninterrupted[epochs_done:]]
            if exact:
                for (_, images), (_, expected) in zip(resumed, uninterrupted[epochs_done:]):
                    np.testing.assert_array_equal(images, expected)
    finally:
        ds.config.set_fast_recovery(fast_recovery)


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


# ---------------------------------------------------------------- hostile trees and files (issue 16)

def two_class_folder(root, train=8, val=4):
    return write_imagefolder(root, {"train": make_split(train, 2, 1), "val": make_split(val, 2, 2)}, ["a", "b"])


def test_symlink_loops_end_the_walk_at_once(tmp_path):
    """Links to `.` and `..` at every level made the walk grow without end; now each folder is searched once."""
    import os
    import time
    folder = tmp_path
    for depth in range(4):
        (folder / "sub").mkdir()
        for link, target in (("here", "."), ("up", ".."), ("top", tmp_path)):
            os.symlink(target, folder / link)
        folder = folder / "sub"
    start = time.monotonic()
    with pytest.raises(UserError, match="no dataset found"):
        datasets.find_data(tmp_path)
    assert time.monotonic() - start < 2
    two_class_folder(folder)  # the data, at the bottom of the loops
    notes = []
    assert datasets.find_data(tmp_path, log=notes.append).sizes == {"train": 8, "val": 4}
    assert len(notes) == 1 and "symlink(s)" in notes[0] and "(a loop)" in notes[0]


def test_a_symlinked_class_folder_is_read(tmp_path):
    import os
    two_class_folder(tmp_path / "elsewhere")
    data = two_class_folder(tmp_path / "data")
    shutil.rmtree(data / "train" / "b")
    os.symlink(tmp_path / "elsewhere" / "train" / "b", data / "train" / "b")
    source = datasets.find_data(data, log=pytest.fail)
    assert source.sizes == {"train": 8, "val": 4} and source.class_names == ["a", "b"]


def test_unreadable_images_are_skipped_named_and_counted(tmp_path):
    data = two_class_folder(tmp_path)
    (data / "train" / "a" / "empty.jpg").write_bytes(b"")
    (data / "val" / "b" / "notes.png").write_text("not an image")
    notes = []
    source = datasets.find_data(data, log=notes.append)
    assert source.sizes == {"train": 8, "val": 4}
    assert sorted(path.name for path, _ in source.skipped) == ["empty.jpg", "notes.png"]
    assert len(notes) == 1 and "skipping 2 image file(s)" in notes[0] and "train/a/empty.jpg (empty file)" in notes[0]
    got = batches(datasets.create_dataset(source, "val", 32, batch_size=3))
    assert sum(len(labels) for _, labels in got) == 4  # the pipeline reads only the readable ones


def test_a_mostly_unreadable_split_is_refused(tmp_path):
    data = two_class_folder(tmp_path, val=2)
    for name in ("x.png", "y.png", "z.png"):
        (data / "val" / "a" / name).write_bytes(b"\x89PNG\r\n\x1a\n cut")
    with pytest.raises(UserError, match="3 of the 5 images in the val split .* cannot be read"):
        datasets.find_data(data)


@pytest.mark.parametrize("side, needle", [((8000, 6000), "8000x6000 pixels"), ((20000, 20000), "above the limit")])
def test_decompression_bombs_are_refused_without_decoding(tmp_path, side, needle):
    import resource
    import images
    from test_faults_data import bomb_png
    bomb_png(tmp_path / "bomb.png", *side)  # written row by row: the test allocates no pixels either
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert needle in images.problem(tmp_path / "bomb.png") and "decompression bomb" in images.problem(
        tmp_path / "bomb.png")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KB: no pixels were allocated


@pytest.mark.parametrize("meta, split, needle", [
    (True, 0, "data_batch_1.bin holds label 200 .record 3., but .*batches.meta.txt names 3 classes"),
    (False, 0, "data_batch_1.bin holds label 200, but no training record has label 3"),
    (False, 1, "test_batch.bin holds label 200 .record 3., but the training records have 3 classes")])
def test_a_cifar_label_beyond_the_classes_is_refused(tmp_path, cifar_split, meta, split, needle):
    splits = [(images, labels.copy()) for images, labels in cifar_split]
    splits[split][1][3] = 200
    write_cifar(tmp_path, *splits, NAMES)
    if not meta:
        (tmp_path / "batches.meta.txt").unlink()
    with pytest.raises(UserError, match=needle):
        datasets.find_data(tmp_path)


def test_output_folders_in_the_data_are_not_data(tmp_path):
    """An earlier run's outputs in a class folder, an Aim repo and this job's own (still empty) output folder in
    train/: none is a class, and no image of theirs is data."""
    data = two_class_folder(tmp_path)
    earlier = data / "train" / "a" / "run1"
    (earlier / "examples").mkdir(parents=True)
    for name in ("labels.json", "metrics.json", "examples/b.png"):
        shutil.copy(next((data / "val" / "b").glob("*.png")), earlier / name)
    (data / "train" / "out").mkdir()
    (data / "train" / "aim" / ".aim").mkdir(parents=True)
    notes = []
    source = datasets.find_data(data, exclude=[data / "train" / "out", None], log=notes.append)
    assert source.class_names == ["a", "b"] and source.sizes == {"train": 8, "val": 4}
    assert len(notes) == 1 and "2 folder(s)" in notes[0] and "training job's outputs" in notes[0]
    assert "run1" in notes[0] and "train/aim" in notes[0]


def test_a_small_split_is_fine_when_nothing_is_dropped(tmp_path, cifar_split):
    """The frozen backbone's one pass keeps every image, in batches larger than the split."""
    write_cifar(tmp_path, *cifar_split, NAMES)
    data = datasets.create_dataset(datasets.find_data(tmp_path), "train", 32, 64, shuffle=False, augment=False,
                                   drop_remainder=False)
    assert [len(labels) for _, labels in batches(data)] == [37]


def test_training_reads_every_mode_as_the_app_does(tmp_path):
    """Palette, RGBA, 16-bit grey, CMYK and an EXIF-rotated JPEG: the validation pipeline's input equals the
    inference predictor's for the same file."""
    import sys
    from conftest import ROOT
    from PIL import Image
    sys.path.insert(0, str(ROOT / "inference"))
    from predictor import Predictor, read_image
    rgb = Image.fromarray(make_split(1, 1, 3, side=40)[0][0])
    grey16 = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
    folder = tmp_path / "val" / "a"
    folder.mkdir(parents=True)
    for name, image in {"p.png": rgb.convert("P"), "rgba.png": rgb.convert("RGBA"), "grey16.png": grey16,
                        "cmyk.jpg": rgb.convert("CMYK")}.items():
        image.save(folder / name)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the app turns it upright
    rgb.resize((40, 30)).save(folder / "rotated.jpg", exif=exif)
    shutil.copytree(tmp_path / "val", tmp_path / "train")
    source = datasets.find_data(tmp_path, log=pytest.fail)
    inputs, _ = batches(datasets.create_dataset(source, "val", 32, batch_size=5))[0]
    served = Predictor(None, {"class_names": ["a"], "image_size": 32, "data_format": "imagefolder"}, "m.ckpt")
    expected = [served.preprocess(read_image(path)) for path, _ in source.val]
    np.testing.assert_allclose(inputs, np.stack(expected), atol=1e-5)


def class_folders(root, count=60, classes=3, seed=3):
    """One folder of images per class, no split: what a user most often brings."""
    return write_imagefolder(root, {"": make_split(count, classes, seed)}, NAMES[:classes])


def test_class_folders_are_split_stratified_and_seeded(tmp_path):
    class_folders(tmp_path / "photos")
    source = datasets.find_data(tmp_path)
    assert source.kind == "imagefolder" and source.root == tmp_path / "photos" and source.class_names == NAMES
    train, val = source.split["train"], source.split["val"]
    assert not set(train) & set(val) and len(train) + len(val) == 60
    for label, name in enumerate(NAMES):  # every class in both splits, about a fifth held out
        in_class = [path for path, l in source.train + source.val if l == label]
        held = [path for path, l in source.val if l == label]
        assert len(held) == round(0.2 * len(in_class)) >= 1, name
        assert all(path.parent.name == name for path in in_class)
    assert datasets.find_data(tmp_path).split == source.split  # the same files and seed: the same split
    other = datasets.find_data(tmp_path, split=datasets.SplitPlan(0.2, seed=2)).split
    assert other["val"] != source.split["val"] and len(other["val"]) == len(source.split["val"])
    assert source.class_counts() == [sum(1 for _, l in source.train + source.val if l == k) for k in range(3)]


def test_a_saved_split_is_kept_when_images_are_added(tmp_path):
    class_folders(tmp_path)
    saved = datasets.find_data(tmp_path).split
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "bird" / "new.png")
    said = []
    again = datasets.find_data(tmp_path, log=said.append, split=datasets.SplitPlan(saved=saved))
    assert again.split["train"] == saved["train"] and again.split["val"] == saved["val"]
    assert [p.name for p, _ in again.train + again.val].count("new.png") == 0
    assert len(said) == 1 and "leaving out 1 image(s)" in said[0] and "bird/new.png" in said[0]
    fresh = datasets.find_data(tmp_path).split  # without it, the new image is split like the others
    assert "bird/new.png" in fresh["train"] + fresh["val"]


def test_a_saved_split_of_other_classes_or_damaged_is_refused(tmp_path):
    class_folders(tmp_path)
    saved = datasets.find_data(tmp_path).split
    with pytest.raises(UserError, match="the saved split's classes"):
        datasets.find_data(tmp_path, split=datasets.SplitPlan(saved={**saved, "classes": ["x", "y", "z"]}))
    (tmp_path / "split.json").write_text('{"classes": ["a"], "train": 3}')
    with pytest.raises(UserError, match="split .*split.json is damaged"):
        datasets.read_split(tmp_path / "split.json")


def test_test_alone_is_the_validation_split(tmp_path):
    data = write_imagefolder(tmp_path / "shapes", {"train": make_split(32, 2, 0), "test": make_split(16, 2, 1)},
                             ["circle", "square"])
    source = datasets.find_data(data)
    assert source.val_name == "test" and source.test is None and source.sizes == {"train": 32, "val": 16}


def test_a_flat_folder_with_a_csv_of_labels_is_split_like_class_folders(tmp_path):
    """Kaggle's form: images in one folder and `id,label` rows; an id may leave out the extension."""
    images, labels = make_split(40, 2, 4)
    rows = ["id,breed"]
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(tmp_path / f"img{i:03d}.png")
        rows.append(f"img{i:03d}{'.png' if i % 2 else ''},{['husky', 'wolf'][label]}")
    rows += ["gone.png,wolf", "../outside.png,husky"]  # no such image; a path out of the folder
    (tmp_path.parent / "outside.png").write_bytes((tmp_path / "img000.png").read_bytes())
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    said = []
    source = datasets.find_data(tmp_path, log=said.append)
    assert source.class_names == ["husky", "wolf"] and source.sizes == {"train": 32, "val": 8}
    assert source.split["layout"] == "images labelled by labels.csv"
    labelled = {path.name: label for path, label in source.train + source.val}
    assert labelled == {f"img{i:03d}.png": int(label) for i, label in enumerate(labels)}
    for label in (0, 1):
        assert any(l == label for _, l in source.val) and any(l == label for _, l in source.train)
    assert len(said) == 1 and "skipping 2 row(s) of labels.csv" in said[0] and "../outside.png" in said[0]


def labelled_folder(root, rows, images=6):
    """`images` PNGs img0.png.. (half of them dark) and labels.csv holding `rows` after its header."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        Image.fromarray(np.full((8, 8, 3), 40 * (i % 2), np.uint8)).save(root / f"img{i}.png")
    (root / "labels.csv").write_text("file,label\n" + "".join(f"{row}\n" for row in rows))
    return root


@pytest.mark.parametrize("rows, needle", [
    (["img0.png,../../escaped", "img1.png,b"], "label '../../escaped' cannot name a class"),
    (["img0.png,/tmp/abs", "img1.png,b"], "label '/tmp/abs' cannot name a class"),
    (["img0.png,a", "img1.png,b", "img0,b"], "img0 is labelled both 'a' and 'b'"),
    (['img0.png,"' + "x" * 200_000 + '"'], "cannot be read as a CSV|cannot name a class"),  # by the csv limit
])
def test_a_hostile_csv_is_refused_with_one_line(rows, needle, tmp_path):
    folder = labelled_folder(tmp_path / "data", rows)
    with pytest.raises(UserError, match=needle if "|" in needle else re.escape(needle)):
        datasets.find_data(folder)


def test_csv_rows_that_repeat_or_name_impossible_files_are_skipped_and_counted(tmp_path):
    rows = ["img0.png,a", "img0,a", "./img0.png,a", "img1.png,b", "img2.png,a", "img3.png,b", "img4.png,a",
            "img5.png,b", "x" * 300 + ".png,a"]
    said = []
    source = datasets.find_data(labelled_folder(tmp_path / "data", rows), log=said.append)
    assert source.sizes["train"] + source.sizes["val"] == 6  # img0 once
    assert not set(source.split["train"]) & set(source.split["val"])
    assert len(said) == 1 and "skipping 3 row(s)" in said[0] and "1 that name no image" in said[0]


def test_bad_bytes_in_a_csv_are_one_line(tmp_path):
    folder = labelled_folder(tmp_path / "data", ["img0.png,a", "img1.png,b"])
    (folder / "labels.csv").write_bytes((folder / "labels.csv").read_bytes() + b"img2.png,\xff\xfe\n" * 5000)
    with pytest.raises(UserError, match="cannot be read as a CSV"):
        datasets.find_data(folder)


def test_a_link_from_one_class_folder_into_another_counts_its_images_once(tmp_path):
    class_folders(tmp_path / "photos")
    (tmp_path / "photos" / "airplane" / "more").symlink_to(tmp_path / "photos" / "bird")
    source = datasets.find_data(tmp_path)
    paths = [str(path.resolve()) for path, _ in source.train + source.val]
    assert len(paths) == len(set(paths)) == 60


def test_a_saved_split_that_lists_a_file_twice_is_refused(tmp_path):
    class_folders(tmp_path)
    saved = datasets.find_data(tmp_path).split
    (tmp_path / "split.json").write_text(json.dumps({**saved, "train": saved["train"] + saved["val"][:1]}))
    with pytest.raises(UserError, match="listed twice, or in both train and val"):
        datasets.read_split(tmp_path / "split.json")
    (tmp_path / "split.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UserError, match="damaged"):
        datasets.read_split(tmp_path / "split.json")


def test_a_labels_json_of_an_unknown_network_is_one_line(tmp_path):
    import trained_model
    (tmp_path / "labels.json").write_text(json.dumps({"class_names": ["a", "b"], "image_size": 32,
                                                      "arch": "resnet999"}))
    labels = trained_model.read_labels(tmp_path / "labels.json")  # an .onnx needs no network code
    with pytest.raises(UserError, match="names the network 'resnet999', which is none of"):
        trained_model.load_network(tmp_path / "resnet999-best.ckpt", labels)
