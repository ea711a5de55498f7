"""Fixed-feature training: the frozen backbone sees each image once, and the head trains on its cached outputs.

The seed tutorial's fixed-feature mode runs the whole frozen ResNet on every image in every epoch, although its
output never changes. Here the backbone's pooled features for the training and validation images are computed once
(with the validation transform, or N augmented views of each training image) and kept in memory or on disk; the
head then trains on them for all epochs. The head is the network's own `fc`, so the checkpoints are the complete
network, usable by inference unchanged.
"""
import hashlib
import json
import sys
import time
from pathlib import Path

import mindspore as ms
import mindspore.dataset as ds
import mindspore.nn as nn
import numpy as np

import datasets
import torch_weights
from errors import UserError
from export import atomic_write


class Backbone(nn.Cell):
    """The network up to the pooled features, as one graph (names stay the network's own)."""

    def __init__(self, net):
        super().__init__(auto_prefix=False)
        self.net = net

    def construct(self, images):
        return self.net.features(images)


def extract(backbone, dataset, batch_size):
    """(features (N, F) float32, labels (N,) int32) for every image of a batched dataset. A short last batch is
    padded to `batch_size`, so the graph is compiled for one shape only."""
    backbone.set_train(False)
    features, labels = [], []
    for images, batch_labels in dataset.create_tuple_iterator(output_numpy=True):
        count = len(images)
        if count < batch_size:
            images = np.concatenate([images, np.zeros((batch_size - count, *images.shape[1:]), images.dtype)])
        features.append(backbone(ms.Tensor(images)).asnumpy()[:count])
        labels.append(batch_labels)
    return np.concatenate(features).astype(np.float32), np.concatenate(labels).astype(np.int32)


def cache_key(source, args, pretrained):
    """What the features depend on: the weights, the data, the transform and the views."""
    weights = torch_weights.weights_file(pretrained).stat() if pretrained else None  # a folder: the file in it
    parts = {"pretrained": [str(pretrained), weights.st_size, weights.st_mtime_ns] if weights else None,
             "data": [str(source.root), source.kind, source.sizes], "arch": args.arch, "seed": args.seed,
             "image_size": args.image_size, "views": args.feature_views}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def compute(net, source, args):
    backbone = Backbone(net)
    # One pass over the data, faster in batches of 32 or more. No image is dropped (a short last batch is padded),
    # so a split smaller than the batch, or than --batch_size, is fine.
    batch = max(args.batch_size, 32)
    val = extract(backbone, datasets.create_dataset(source, "val", args.image_size, batch, args.num_workers), batch)
    if args.feature_views == 1:  # one view per image, as validation sees it
        views = [datasets.create_dataset(source, "train", args.image_size, batch, args.num_workers,
                                         shuffle=False, augment=False, drop_remainder=False)]
    else:  # N randomly augmented views per image
        views = [datasets.create_dataset(source, "train", args.image_size, batch, args.num_workers,
                                         shuffle=False, augment=True, drop_remainder=False)
                 for _ in range(args.feature_views)]
    train = [extract(backbone, view, batch) for view in views]
    return (np.concatenate([f for f, _ in train]), np.concatenate([y for _, y in train])), val


def cached_features(net, source, args, pretrained, cache_dir, log=print):
    """((train features, labels), (val features, labels)), computed once per key when `--feature_cache disk`."""
    path = Path(cache_dir) / "features" / f"{cache_key(source, args, pretrained)}.npz"
    if args.feature_cache == "disk" and path.is_file():
        with np.load(path) as saved:
            log(f"features: reusing {path}")
            return (saved["train_x"], saved["train_y"]), (saved["val_x"], saved["val_y"])
    start = time.perf_counter()
    (train_x, train_y), (val_x, val_y) = compute(net, source, args)
    log(f"features: {len(train_x)} train ({args.feature_views} view(s) per image) and {len(val_x)} val vectors "
        f"of {train_x.shape[1]}, computed once by the frozen backbone in {time.perf_counter() - start:.1f} s")
    if args.feature_cache == "disk":
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as tmp:
                np.savez(tmp, train_x=train_x, train_y=train_y, val_x=val_x, val_y=val_y)
        except (OSError, UserError) as exc:  # a cache: training goes on without it
            print(f"warning: the features are not kept in {path.parent} ({exc}); the next run computes them again",
                  file=sys.stderr, flush=True)
    return (train_x, train_y), (val_x, val_y)


def feature_datasets(train, val, batch_size, seed, shard=None):
    """Batched (features, label) pipelines for the head; the training one reshuffles every epoch and, with several
    workers, is sharded by `shard` = (workers, rank)."""
    def pipeline(features, labels, shuffle, sharding):
        data = ds.NumpySlicesDataset({"image": features, "label": labels}, shuffle=shuffle, **sharding)
        return datasets.batch(data, batch_size, drop_remainder=shuffle and len(features) >= batch_size,
                              pad_last_batch=not shuffle)  # validation: one graph for the head
    ds.config.set_seed(seed)
    sharding = {"num_shards": shard[0], "shard_id": shard[1]} if shard else {}
    return pipeline(*train, shuffle=True, sharding=sharding), pipeline(*val, shuffle=False, sharding={})


def head_training(net, source, args, pretrained, cache_dir, shard):
    """Fixed-feature mode in one call: what is trained (the head, `fc`), and its training and validation pipelines
    of cached features (the validation one unshuffled, as the images', so its first are the Aim preview's)."""
    train_features, val_features = cached_features(net, source, args, pretrained, cache_dir)
    train_data, val_data = feature_datasets(train_features, val_features, args.batch_size, args.seed, shard)
    return net.fc, train_data, val_data
