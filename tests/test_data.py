"""Datasets: the IDX reader, the real Fashion-MNIST package, splits, augmentation."""

import gzip
import multiprocessing
import os
import signal
import struct
from pathlib import Path

import pytest
import torch

from asge_edge.config import DATASET_ONLY, DataConfig, RunConfig
from asge_edge.data import (FASHION_MNIST_ROOT, Split, Stopped, augment, batches, load_splits, part_of, read_idx,
                             split_tensors, spread)
from asge_edge.errors import UserError


def _write_idx(path: Path, array: torch.Tensor) -> None:
    header = b"\0\0\x08" + bytes([array.dim()]) + struct.pack(f">{array.dim()}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.numpy().tobytes())


def test_idx_round_trip_and_truncation(tmp_path):
    arr = torch.randint(0, 256, (5, 3, 4), dtype=torch.uint8)
    _write_idx(tmp_path / "x.gz", arr)
    assert torch.equal(read_idx(tmp_path / "x.gz"), arr)
    raw = gzip.decompress((tmp_path / "x.gz").read_bytes())
    (tmp_path / "cut").write_bytes(raw[:-7])
    with pytest.raises(UserError, match="truncated"):
        read_idx(tmp_path / "cut")
    (tmp_path / "junk").write_bytes(b"not an idx file")
    with pytest.raises(UserError, match="not an IDX"):
        read_idx(tmp_path / "junk")


def test_mnist_layout_under_torchvision_folder(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 30), ("t10k", 10)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", torch.randint(0, 10, (n,), dtype=torch.uint8))
    s = load_splits(DataConfig(dataset="mnist", root=str(tmp_path), val_size=5))
    assert (len(s.train), len(s.val), len(s.test)) == (25, 5, 10)
    assert s.info.input_shape == (1, 28, 28) and s.info.num_classes == 10


@pytest.mark.parametrize("part,images,labels,needle", [
    ("train", (30, 28, 28), torch.full((30,), 10),
     "train-labels-idx1-ubyte.gz holds label 10, but the dataset has 10 classes"),
    ("t10k", (10, 28, 28), torch.zeros(9),
     "t10k-images-idx3-ubyte.gz holds 10 images but .*t10k-labels-idx1-ubyte.gz 9 labels"),
    ("train", (30, 784), torch.zeros(30), "hold arrays of 2 and 1 dimensions, not images"),
])
def test_idx_images_and_labels_that_disagree_are_refused(tmp_path, part, images, labels, needle):
    # a label past the classes would stop training with a traceback, or count as wrong in every test
    for prefix, n in (("train", 30), ("t10k", 10)):
        bad = prefix == part
        shape = images if bad else (n, 28, 28)
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", torch.zeros(shape, dtype=torch.uint8))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", (labels if bad else torch.zeros(n)).to(torch.uint8))
    with pytest.raises(UserError, match=f"{needle}.*; reinstall the dataset or pass another --data-root"):
        load_splits(DataConfig(dataset="mnist", root=str(tmp_path), val_size=5))


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT).is_dir(), reason="make install puts dataset-fashion-mnist here")
def test_real_fashion_mnist_from_the_debian_package():
    s = load_splits(DataConfig())
    assert (len(s.train), len(s.val), len(s.test)) == (50_000, 10_000, 10_000)   # the paper's split
    assert s.train.images.shape[1:] == (1, 28, 28) and s.train.images.dtype == torch.uint8
    assert s.info.class_names[0] == "T-shirt/top" and s.info.num_classes == 10
    assert torch.bincount(s.test.labels).tolist() == [1000] * 10


def test_validation_split_is_fixed_and_disjoint():
    cfg = DataConfig(dataset="synthetic", train_size=200)
    a, b = load_splits(cfg), load_splits(cfg)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.images, b.train.images)
    assert len(a.train) + len(a.val) == 200
    train_rows = {bytes(img.numpy()) for img in a.train.images}
    assert not any(bytes(img.numpy()) in train_rows for img in a.val.images)


def test_synthetic_shapes_follow_the_flags():
    s = load_splits(DataConfig(dataset="synthetic", input_shape=(3, 12, 10), num_classes=6, train_size=100))
    assert s.info.input_shape == (3, 12, 10) and s.info.num_classes == 6
    assert s.train.images.shape[1:] == (3, 12, 10) and int(s.train.labels.max()) < 6


def test_synthetic_defaults_apply_where_the_flags_are_not_given():
    s = load_splits(DataConfig(dataset="synthetic"))
    assert s.info.input_shape == (1, 16, 16) and s.info.num_classes == 4
    assert len(s.train) + len(s.val) == 1024


def test_dataset_only_settings_are_refused_elsewhere_and_dropped_from_old_configs():
    with pytest.raises(ValueError, match="--num-classes applies to --dataset synthetic only"):
        DataConfig(dataset="mnist", num_classes=10)
    cfg = RunConfig()   # fashion-mnist: no synthetic or imagefolder settings to save
    assert {k: cfg.to_dict()["data"][k] for k in DATASET_ONLY} == dict.fromkeys(DATASET_ONLY)
    old = cfg.to_dict()   # as written before: every dataset's defaults, whatever the run's
    old["data"].update(input_shape=[1, 16, 16], num_classes=4, train_size=1024, image_size=64)
    assert RunConfig.from_dict(old) == cfg
    synthetic = RunConfig(data=DataConfig(dataset="synthetic", input_shape=(3, 8, 8)))
    assert RunConfig.from_dict(synthetic.to_dict()) == synthetic


def test_batches_cover_the_split_once_in_range():
    s = load_splits(DataConfig(dataset="synthetic", train_size=100)).train
    seen = []
    for x, y in batches(s, 32, torch.Generator().manual_seed(0)):
        assert x.dtype == torch.uint8 and x.shape[1:] == s.images.shape[1:]   # raw pixels: the model scales them
        seen.append(y)
    assert torch.cat(seen).sort().values.tolist() == s.labels.sort().values.tolist()


@pytest.mark.parametrize("source", ["memory", "folder"])
def test_the_parts_of_each_batch_put_together_are_the_whole_batch(source, folder_run):
    """A torchrun rank reads only its part of each global batch; augmented as in the whole
    batch, the parts put together are the whole batch, down to a short last batch's empty parts."""
    _, data, _ = folder_run
    cfg = (DataConfig(dataset="imagefolder", root=str(data), image_size=16, val_size=3) if source == "folder" else
           DataConfig(dataset="synthetic", input_shape=(3, 16, 16), train_size=18, val_size=3))
    split = load_splits(cfg).train   # 15 images: batches of 7, 7 and 1

    def read(part):
        return list(batches(split, 7, torch.Generator().manual_seed(3), True, workers=1, part=part))

    whole, parts = read((0, 1)), [read((k, 3)) for k in range(3)]
    assert [len(y) for _, y in whole] == [7, 7, 1]
    assert [[len(y) for _, y in p] for p in parts] == [[2, 2, 0], [2, 2, 0], [3, 3, 1]]
    assert all(x.shape[1:] == whole[0][0].shape[1:] for p in parts for x, _ in p)   # empty parts too
    for i, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([p[i][0] for p in parts]), x)
        assert torch.equal(torch.cat([p[i][1] for p in parts]), y)
    plain = batches(split, 7, torch.Generator().manual_seed(3), False, workers=1)
    assert any(not torch.equal(x, p) for (x, _), (p, _) in zip(whole, plain))   # augmentation was on


def test_the_blocks_of_a_split_put_together_are_the_split(folder_run):
    """A torchrun rank evaluates its block of a split (data.part_of); a split shorter than the
    ranks leaves some of them an empty block, which reads nothing."""
    _, data, _ = folder_run
    split = load_splits(DataConfig(dataset="imagefolder", root=str(data), image_size=16, val_size=3)).val   # 3 images
    whole = torch.cat([x for x, _ in batches(split, 2)])
    blocks = [part_of(split, k, 4) for k in range(4)]
    assert [len(b) for b in blocks] == [0, 1, 1, 1]
    assert list(batches(blocks[0], 2)) == []
    assert torch.equal(torch.cat([x for b in blocks[1:] for x, _ in batches(b, 2, workers=1)]), whole)


def test_augment_is_seeded_and_keeps_shape():
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    a = augment(x, torch.Generator().manual_seed(1))
    b = augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)


def test_unknown_dataset_and_bad_val_size():
    with pytest.raises(UserError, match="unknown dataset"):
        load_splits(DataConfig(dataset="nope"))
    with pytest.raises(UserError, match="--val-size"):
        load_splits(DataConfig(dataset="synthetic", train_size=10, val_size=10))



def test_imagefolder_of_mixed_images_trains_and_evaluates(folder_run, capsys):
    import json

    from asge_edge.cli import main

    out, data, warned = folder_run
    s = load_splits(DataConfig(dataset="imagefolder", root=str(data), image_size=16, val_size=3))
    assert s.info.input_shape == (3, 16, 16) and s.info.class_names == ("cat", "dog", "owl")
    assert (len(s.train), len(s.val), len(s.test)) == (15, 3, 18)
    x, y = split_tensors(s.test, workers=1)
    assert x.shape == (18, 3, 16, 16) and y.tolist() == [0] * 6 + [1] * 6 + [2] * 6   # ImageFolder: sorted by class
    assert torch.equal(x, split_tensors(s.test)[0])   # workers or none, the same pixels
    # default --workers: never more DataLoader workers than the cores (torch warns about that)
    assert not [w for w in warned if "worker" in w]
    summary = json.loads((out / "summary.json").read_text())
    assert main(["eval", str(out), "--json"]) == 0   # through the DataLoader's workers too
    again = json.loads(capsys.readouterr().out)
    assert again["layer_test_accuracy"] == summary["layer_test_accuracy"]
    assert all(abs(a * 18 - round(a * 18)) < 1e-6 for a in again["layer_test_accuracy"])   # k / 18 test images


@pytest.mark.parametrize("signalled", [True, False], ids=["after a signal", "no signal"])
def test_a_sigterm_ends_a_loader_worker_cleanly_and_batches_then_stops(folder_run, signalled):
    """A SIGTERM to the whole process group reaches the DataLoader's workers too. Each exits
    with status 0, where PyTorch's own handler dies of it (unless the main process sent it)
    and the main process then fails mid-step. A loop still waiting on batches gets Stopped
    where its stop() reports the signal; with no signal, a worker's end is a fault, and the
    loader's own error stands."""
    _, data, _ = folder_run
    split = load_splits(DataConfig(dataset="imagefolder", root=str(data), image_size=16, val_size=3)).train
    before = set(multiprocessing.active_children())
    loader = batches(split, 1, workers=1, stop=lambda: signalled)
    next(loader)
    [worker] = set(multiprocessing.active_children()) - before
    os.kill(worker.pid, signal.SIGTERM)
    worker.join(10)
    assert worker.exitcode == 0
    with pytest.raises(Exception) as caught:
        for _ in loader:   # 15 batches, of which the worker had loaded 3 at most
            pass
    assert (caught.type is Stopped) == signalled, caught.value


def test_spread_covers_a_split_sorted_by_class():
    split = Split(torch.arange(18, dtype=torch.uint8).view(18, 1, 1, 1), torch.arange(18) // 6)   # 3 classes, sorted
    sub = spread(split, 4)
    assert sub.images.flatten().tolist() == [0, 6, 11, 17] and sub.labels.tolist() == [0, 1, 1, 2]
    assert spread(split, 3).labels.tolist() == [0, 1, 2]
    assert spread(split, 18) is split and spread(split, 100) is split

def _fake_cifar(root: Path, dataset: str, n_train: int, n_test: int) -> torch.Tensor:
    """torchvision's CIFAR layout (pickled batches) with random pixels; returns the first
    training image as (3, 32, 32), the layout its row of 3072 bytes stores."""
    import pickle

    gen = torch.Generator().manual_seed(0)
    labels_key, names_key, folder, files, meta = {
        "cifar10": ("labels", "label_names", "cifar-10-batches-py",
                    [f"data_batch_{i}" for i in range(1, 6)], "batches.meta"),
        "cifar100": ("fine_labels", "fine_label_names", "cifar-100-python", ["train"], "meta"),
    }[dataset]
    classes = 10 if dataset == "cifar10" else 100
    (root / folder).mkdir(parents=True)
    first = None
    for name, n in [*((f, n_train // len(files)) for f in files), ("test" if dataset == "cifar100" else "test_batch", n_test)]:
        data = torch.randint(0, 256, (n, 3072), dtype=torch.uint8, generator=gen)
        first = data[0].reshape(3, 32, 32) if first is None else first
        entry = {"data": data.numpy(), labels_key: torch.arange(n).remainder(classes).tolist()}
        (root / folder / name).write_bytes(pickle.dumps(entry))
    (root / folder / meta).write_bytes(pickle.dumps({names_key: [f"c{i}" for i in range(classes)]}))
    return first


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_layout_loads_channels_first(tmp_path, monkeypatch, dataset):
    import os

    import torchvision.datasets.cifar as tv_cifar

    first = _fake_cifar(tmp_path, dataset, n_train=500, n_test=100)
    # the fake files cannot match torchvision's checksums of the real ones
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    s = load_splits(DataConfig(dataset=dataset, root=str(tmp_path), val_size=50))
    assert (len(s.train), len(s.val), len(s.test)) == (450, 50, 100)
    assert s.info.input_shape == (3, 32, 32) and s.info.num_classes == (10 if dataset == "cifar10" else 100)
    assert s.info.class_names[:2] == ("c0", "c1")
    assert s.train.images.dtype == torch.uint8 and s.train.images.shape[1:] == (3, 32, 32)
    # the first training image is in one of the two splits, pixel for pixel as stored (R, G, B planes)
    assert any(torch.equal(img, first) for img in (*s.train.images, *s.val.images))
    monkeypatch.undo()
    with pytest.raises(UserError, match="checksums"):
        load_splits(DataConfig(dataset=dataset, root=str(tmp_path)))


def test_a_moved_run_reads_its_dataset_from_a_new_root(tmp_path, capsys):
    import json

    from asge_edge.cli import main

    raw = tmp_path / "a" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 40), ("t10k", 12)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=gen))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", torch.arange(n, dtype=torch.uint8) % 10)
    run = tmp_path / "run"
    assert main(["train", "--dataset", "mnist", "--data-root", str(tmp_path / "a"), "--val-size", "8", "--width",
                 "0.0625", "--epochs", "1", "--quiet", "--out", str(run)]) == 0
    (tmp_path / "a").rename(tmp_path / "b")   # the run and its data move apart
    capsys.readouterr()
    assert main(["eval", str(run)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", str(run), "--data-root", str(tmp_path / "b"), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["layer_test_accuracy"] == json.loads((run / "summary.json").read_text())["layer_test_accuracy"]
    assert main(["simulate", str(run), "--ram", "256KB", "--samples", "6", "--data-root", str(tmp_path / "b"),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 6
    assert main(["export", str(run), "--exits", "1,3", "--out", str(tmp_path / "c"), "--data-root", str(tmp_path / "b"),
                 "--json"]) == 0   # the cascade's threshold calibrates on the moved validation split
    assert json.loads(capsys.readouterr().out)["calibration_images"] == 8
