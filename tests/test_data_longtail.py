"""Long-tailed subsets, balanced counterparts, split files, semi-synthetic layout, manifests and the CLI."""

from __future__ import annotations

import dataclasses
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ltssl.config import DataConfig, load_config
from ltssl.data import (
    DataError,
    balanced_counterpart,
    class_counts,
    class_groups,
    longtail_subset,
    make_longtail_manifest,
    prepare_dataset,
    write_betons,
)
from ltssl.data.ffcv import read_beton
from ltssl.data.longtail import balanced_counts, make_rng, read_index_file, read_split_file
from ltssl.data.prepare import check_data_config, write_manifest
from ltssl.data.sources import load_cifar
from test_data_util import write_cifar, write_image_folder


REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- profiles


@pytest.mark.parametrize(
    "n_max, num_classes, ratio, expected",
    [
        (5000, 10, 100, [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]),
        (5000, 10, 10, [5000, 3871, 2997, 2320, 1796, 1391, 1077, 834, 645, 500]),
        (4500, 10, 100, [4500, 2697, 1617, 969, 581, 348, 208, 125, 75, 45]),  # SDCLR/BCL
        (124, 10, 1, [124] * 10),
        (7, 1, 50, [7]),
    ],
)
def test_class_counts_known_profiles(n_max, num_classes, ratio, expected):
    assert class_counts(n_max, num_classes, ratio) == expected


def test_class_counts_cifar100_ends():
    counts = class_counts(500, 100, 100)
    assert (counts[0], counts[-1], len(counts)) == (500, 5, 100)
    assert sum(counts) == 10847  # CIFAR-100-LT r=100, as in LDAM/BCL


def test_ratio_below_one_and_empty_rare_class():
    with pytest.raises(DataError, match=r"^data.imbalance_ratio must be >= 1, got 0.5$"):
        class_counts(100, 10, 0.5)
    with pytest.raises(DataError, match=r"^data.n_max 5 with data.imbalance_ratio 100.0 leaves the rarest class no image$"):
        class_counts(5, 10, 100.0)


# ----------------------------------------------------------------------------- sampling


LABELS = np.repeat(np.arange(4), 20)


def test_seeded_indices_are_pinned_across_machines():
    # PCG64 + SeedSequence([seed, 1, class]) are stable across platforms and numpy versions: pin the values.
    assert make_rng(0, 1, 0).permutation(10).tolist() == [9, 1, 3, 8, 7, 6, 0, 4, 2, 5]
    sub = longtail_subset(LABELS, 4, 10, seed=7)
    assert sub.counts == [20, 9, 4, 2]
    assert sub.indices.tolist() == list(range(20)) + [20, 21, 22, 24, 26, 29, 34, 35, 36, 41, 47, 48, 57, 66, 67]
    assert sub.balanced_counts == [9, 9, 9, 8]


def test_same_seed_same_indices_other_seed_other_indices():
    a = longtail_subset(LABELS, 4, 10, seed=3)
    b = longtail_subset(LABELS, 4, 10, seed=3)
    c = longtail_subset(LABELS, 4, 10, seed=4)
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.balanced_indices, b.balanced_indices)
    assert not np.array_equal(a.indices, c.indices)
    assert np.random.get_state()[1][0] == np.random.get_state()[1][0]  # global state untouched (no draws from it)


def test_global_numpy_state_is_not_used():
    np.random.seed(1)
    a = longtail_subset(LABELS, 4, 10, seed=3).indices
    np.random.seed(2)
    b = longtail_subset(LABELS, 4, 10, seed=3).indices
    assert np.array_equal(a, b)


def test_balanced_counterpart_same_total_and_pairing():
    sub = longtail_subset(LABELS, 4, 10, seed=1)
    assert len(sub.balanced_indices) == len(sub.indices) == 35
    assert sub.balanced_counts == balanced_counts(35, 4) == [9, 9, 9, 8]
    assert np.bincount(LABELS[sub.balanced_indices]).tolist() == [9, 9, 9, 8]
    assert np.bincount(LABELS[sub.indices]).tolist() == [20, 9, 4, 2]
    # nested prefixes: per class the smaller subset lies inside the larger one
    assert set(sub.indices[LABELS[sub.indices] == 3]) <= set(sub.balanced_indices)
    assert set(sub.balanced_indices[LABELS[sub.balanced_indices] == 0]) <= set(sub.indices)
    assert np.array_equal(balanced_counterpart(LABELS, sub.indices, 4, seed=1), sub.balanced_indices)
    # remainder goes to the most frequent classes of the given order
    assert balanced_counts(35, 4, [3, 2, 1, 0]) == [8, 9, 9, 9]


def test_class_order_puts_the_tail_elsewhere():
    sub = longtail_subset(LABELS, 4, 10, seed=0, class_order=[2, 0, 3, 1])
    assert sub.counts == [9, 2, 20, 4]
    with pytest.raises(DataError, match=r"^data.class_order must be a permutation of 0..3, got \[0, 0, 1, 2\]$"):
        longtail_subset(LABELS, 4, 10, class_order=[0, 0, 1, 2])


def test_n_max_larger_than_smallest_class():
    with pytest.raises(DataError, match=r"^data.n_max 21 is larger than the smallest class holds \(20 images of class 0\)$"):
        longtail_subset(LABELS, 4, 10, n_max=21)


def test_class_groups():
    counts = class_counts(5000, 10, 100)
    assert class_groups(counts) == {"many": [0, 1, 2, 3], "medium": [4, 5, 6], "few": [7, 8, 9]}
    assert class_groups([5, 500, 50, 150, 19, 20]) == {"many": [1, 3], "medium": [2, 5], "few": [0, 4]}
    assert class_groups([5, 500, 50, 150, 19, 20], "imagenet") == {"many": [1, 3], "medium": [2, 5], "few": [0, 4]}


# ----------------------------------------------------------------------------- split files


def test_read_split_file(tmp_path):
    f = tmp_path / "ImageNet_LT_train.txt"
    f.write_text("train/n01440764/n01440764_10026.JPEG 0\n\ntrain/n01443537/n01443537_1.JPEG 1\ntrain/n01443537/x.JPEG 1\n")
    paths, labels = read_split_file(f)
    assert paths == ["train/n01440764/n01440764_10026.JPEG", "train/n01443537/n01443537_1.JPEG", "train/n01443537/x.JPEG"]
    assert labels.tolist() == [0, 1, 1] and labels.dtype == np.int64
    f.write_text("a.jpg 0\nb.jpg one\n")
    with pytest.raises(DataError, match=rf"^split file {f} line 2: expected 'relative/path label', got 'b.jpg one'$"):
        read_split_file(f)
    with pytest.raises(DataError, match=r"does not exist$"):
        read_split_file(tmp_path / "missing.txt")


def test_read_index_file(tmp_path):
    f = tmp_path / "split.txt"
    f.write_text("3\n1\n4 15\n")
    assert read_index_file(f).tolist() == [3, 1, 4, 15]
    with pytest.raises(DataError, match=rf"^index file {f}: index 15 out of range for a pool of 10 images$"):
        read_index_file(f, pool_size=10)


def test_published_index_list_is_reproduced(tmp_path):
    root = write_cifar(tmp_path / "src", per_class_train=6, per_class_test=1)
    idx = [5, 17, 2, 40, 41, 59]
    (tmp_path / "split.txt").write_text("\n".join(map(str, idx)) + "\n")
    # imbalance_ratio None: the split decides it (data_prep/make_longtail.py without --imbalance-ratio)
    m = make_longtail_manifest(DataConfig(dataset="cifar10", root=str(root), split_file=str(tmp_path / "split.txt"),
                                          imbalance_ratio=None))
    assert m["train"]["indices"] == sorted(idx) and m["published_split"]["kind"] == "index_list"
    assert sum(m["train"]["counts"]) == 6 and m["balanced"]["n"] == 6
    assert m["n_min"] == 0 and m["imbalance_ratio"] is None  # some class has no image: no finite ratio


def test_imagefolder_split_file(tmp_path):
    root = write_image_folder(tmp_path / "img", [3, 2, 1], test_per_class=1)
    lines = ["train/c00/0000.png 0", "train/c00/0002.png 0", "train/c02/0000.png 2"]
    (tmp_path / "lt.txt").write_text("\n".join(lines) + "\n")
    m = make_longtail_manifest(DataConfig(dataset="imagefolder", root=str(root), split_file=str(tmp_path / "lt.txt"),
                                          imbalance_ratio=None))
    assert m["train"]["source_ids"] == ["train/c00/0000.png", "train/c00/0002.png", "train/c02/0000.png"]
    assert m["train"]["counts"] == [2, 0, 1] and m["group_scheme"] == "imagenet"
    (tmp_path / "bad.txt").write_text("train/c00/nope.png 0\n")
    with pytest.raises(DataError, match=r"lists train/c00/nope.png, which is not under"):
        make_longtail_manifest(DataConfig(dataset="imagefolder", root=str(root), split_file=str(tmp_path / "bad.txt"),
                                          imbalance_ratio=None))
    with pytest.raises(DataError, match=rf"^data.imbalance_ratio 10 contradicts split file {tmp_path / 'lt.txt'}: class 1 "
                                        r"has no training image, so its n_max / n_min is unbounded$"):
        make_longtail_manifest(DataConfig(dataset="imagefolder", root=str(root), split_file=str(tmp_path / "lt.txt")))


def _published_split(tmp_path: Path, counts: list[int]) -> tuple[Path, Path, Path]:
    """An image folder with ``counts`` train images per class, its 'path label' train list and test list."""
    root = write_image_folder(tmp_path / "img", counts, test_per_class=2, size=(36, 36))
    train = [f"train/c{c:02d}/{i:04d}.png {c}" for c, n in enumerate(counts) for i in range(n)]
    test = [f"val/c{c:02d}/{i:04d}.png {c}" for c in range(len(counts)) for i in range(2)]
    (tmp_path / "lt_train.txt").write_text("\n".join(train) + "\n")
    (tmp_path / "lt_test.txt").write_text("\n".join(test) + "\n")
    return root, tmp_path / "lt_train.txt", tmp_path / "lt_test.txt"


def test_published_split_records_its_own_ratio(tmp_path):
    root, train, test = _published_split(tmp_path, [30, 15, 8, 4])
    common = ["--dataset", "imagefolder", "--root", str(root), "--split-file", str(train), "--test-split-file", str(test)]
    out = _run("data_prep/make_longtail.py", *common, "--out", str(tmp_path / "lt"))
    assert out.returncode == 0, out.stderr
    m = json.loads((tmp_path / "lt" / "manifest.json").read_text())
    assert m["train"]["counts"] == [30, 15, 8, 4]
    assert (m["n_max"], m["n_min"], m["imbalance_ratio"]) == (30, 4, 7.5)
    assert "imbalance ratio 7.5;" in out.stdout
    # a ratio that states the split is accepted (to 0.1 %) and recorded as the split's exact value
    out = _run("data_prep/make_longtail.py", *common, "--imbalance-ratio", "7.501", "--out", str(tmp_path / "lt2"))
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "lt2" / "manifest.json").read_text())["imbalance_ratio"] == 7.5
    # a contradicting one is refused in one line naming the field, and nothing is written
    out = _run("data_prep/make_longtail.py", *common, "--imbalance-ratio", "100", "--out", str(tmp_path / "lt3"))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: data.imbalance_ratio 100 contradicts split file {train}, whose n_max / n_min is 30 / 4 = 7.5: "
        "set data.imbalance_ratio to 7.5"]
    assert not (tmp_path / "lt3").exists()


def test_training_config_with_a_split_states_its_ratio(tmp_path):
    root, train, test = _published_split(tmp_path, [30, 15, 8, 4])
    over = {"data.dataset": "imagefolder", "data.root": str(root), "data.split_file": str(train),
            "data.test_split_file": str(test), "data.image_size": 32, "data.cache_dir": str(tmp_path / "cache")}
    cfg = load_config(overrides=over)  # data.imbalance_ratio keeps its default, 10
    msg = (rf"^data.imbalance_ratio 10 contradicts split file {train}, whose n_max / n_min is 30 / 4 = 7.5: "
           r"set data.imbalance_ratio to 7.5$")
    with pytest.raises(DataError, match=msg):
        check_data_config(cfg.data)  # what a login node can run before submitting
    with pytest.raises(DataError, match=msg):
        prepare_dataset(cfg.data)
    assert not (tmp_path / "cache").exists()  # refused before anything is built
    cfg = load_config(overrides={**over, "data.imbalance_ratio": 7.5})
    ds = prepare_dataset(cfg.data)
    assert ds.class_counts == [30, 15, 8, 4] and ds.manifest["imbalance_ratio"] == cfg.data.imbalance_ratio == 7.5


# ----------------------------------------------------------------------------- manifests


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory) -> Path:
    return write_cifar(tmp_path_factory.mktemp("cifar"), per_class_train=30, per_class_test=5)


def test_cifar_manifest(tiny_cifar):
    cfg = DataConfig(dataset="cifar10", root=str(tiny_cifar), imbalance_ratio=10, seed=2)
    m = make_longtail_manifest(cfg)
    assert m["longtail"]["counts"] == class_counts(30, 10, 10) == m["train"]["counts"]
    assert m["balanced"]["n"] == m["longtail"]["n"] == m["train"]["n"]
    assert m["source"]["checksum"].startswith("sha256:") and m["seed"] == 2
    assert m["groups"] == {"many": [0, 1, 2, 3], "medium": [4, 5, 6], "few": [7, 8, 9]}
    assert m["pairing"]["shared_per_class"] == [min(a, b) for a, b in zip(m["longtail"]["counts"], m["balanced"]["counts"])]
    assert m["test"]["counts"] == [5] * 10 and m["probe"]["counts"] == [30] * 10
    bal = make_longtail_manifest(dataclasses.replace(cfg, balanced=True))
    assert bal["train"]["subset"] == "balanced" and bal["train"]["indices"] == m["balanced"]["indices"]
    assert bal["groups"] == m["groups"]  # groups follow the LT counts, so Delta(n, r) compares like with like
    json.dumps(m)  # JSON-ready


def test_semi_synthetic_layout(tiny_cifar, tmp_path):
    cfg = DataConfig(dataset="cifar10", root=str(tiny_cifar), imbalance_ratio=10, semi_synthetic=True)
    m = make_longtail_manifest(cfg)
    semi = m["semi_synthetic"]
    assert semi["frequent_classes"] == [0, 1, 2, 3, 4] and semi["rare_classes"] == [5, 6, 7, 8, 9]
    src = load_cifar("cifar10", tiny_cifar)
    labels = src.train_labels[m["train"]["indices"]]
    partners = np.asarray(semi["partners"])
    assert (partners[labels < 5] >= 0).all() and (partners[labels >= 5] == -1).all()
    assert np.isin(src.train_labels[partners[partners >= 0]], semi["rare_classes"]).all()
    write_manifest(m, tmp_path)
    write_betons(tmp_path)
    train = read_beton(tmp_path / "train.beton")
    assert train["image"].shape == (m["train"]["n"], 32, 64, 3)
    for pos in (0, int(np.argmax(labels >= 5))):
        own = src.train_images[m["train"]["indices"][pos]]
        assert np.array_equal(train["image"][pos, :, :32], own)
        right = src.train_images[partners[pos]] if partners[pos] >= 0 else np.zeros_like(own)
        assert np.array_equal(train["image"][pos, :, 32:], right)
    test = read_beton(tmp_path / "test.beton")
    assert test["image"].shape[2] == 64 and not test["image"][:, :, 32:].any()


# ----------------------------------------------------------------------------- bad input


def test_bad_sources(tmp_path, tiny_cifar):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=rf"^data.root {missing} does not exist: get cifar-10-python.tar.gz "
                                        r"from https://www.cs.toronto.edu/~kriz/cifar.html \(on the login node: curl -LO "
                                        r"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz\) and unpack it with "
                                        rf"'mkdir -p {missing} && tar xzf cifar-10-python.tar.gz -C {missing}', which makes "
                                        rf"{missing}/cifar-10-batches-py$"):
        make_longtail_manifest(DataConfig(dataset="cifar10", root=str(missing)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"^cifar10 source folder .*/empty holds no data_batch_1 \(expected the CIFAR 'python version' layout; "
                                        r"get cifar-10-python.tar.gz .*\)$"):
        make_longtail_manifest(DataConfig(dataset="cifar10", root=str(tmp_path / "empty")))
    broken = write_cifar(tmp_path / "broken", per_class_train=2, per_class_test=1)
    (broken / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x02not a pickle")
    with pytest.raises(DataError, match=r"^.*/data_batch_3 is not a CIFAR pickle \(.*\)$"):
        make_longtail_manifest(DataConfig(dataset="cifar10", root=str(broken)))
    with pytest.raises(DataError, match=r"^data.imbalance_ratio must be >= 1, got 0.5$"):
        make_longtail_manifest(DataConfig(dataset="cifar10", root=str(tiny_cifar), imbalance_ratio=0.5))
    with pytest.raises(DataError, match=r"^data.n_max 31 is larger than the smallest class holds \(30 images of class 0\)$"):
        make_longtail_manifest(DataConfig(dataset="cifar10", root=str(tiny_cifar), n_max=31))
    with pytest.raises(DataError, match=r"^data.root must name the cifar100 source folder, got None$"):
        make_longtail_manifest(DataConfig(dataset="cifar100"))


def test_source_label_out_of_range(tmp_path):
    root = write_cifar(tmp_path, per_class_train=2, per_class_test=1)
    f = root / "cifar-10-batches-py" / "test_batch"
    batch = pickle.loads(f.read_bytes(), encoding="bytes")
    batch[b"labels"][0] = 12
    f.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match=r"^cifar10 test label 12 out of range 0..9 in .*cifar-10-batches-py$"):
        make_longtail_manifest(DataConfig(dataset="cifar10", root=str(root)))


# ----------------------------------------------------------------------------- entry points


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_help_explains_flags():
    out = _run("data_prep/make_longtail.py", "--help")
    assert out.returncode == 0 and "--imbalance-ratio" in out.stdout and "--semi-synthetic" in out.stdout
    out = _run("data_prep/write_ffcv.py", "--help")
    assert out.returncode == 0 and "manifest.json" in out.stdout


def test_cli_cifar10_then_write_ffcv(tiny_cifar, tmp_path):
    out = _run("data_prep/make_longtail.py", "--dataset", "cifar10", "--root", str(tiny_cifar), "--imbalance-ratio", "10",
               "--out", str(tmp_path / "lt"))
    assert out.returncode == 0, out.stderr
    out = _run("data_prep/write_ffcv.py", str(tmp_path / "lt"))
    assert out.returncode == 0, out.stderr
    m = json.loads((tmp_path / "lt" / "manifest.json").read_text())
    assert m["complete"] and m["files"]["train"]["num_samples"] == sum(class_counts(30, 10, 10))
    for split in ("train", "test", "probe"):
        assert (tmp_path / "lt" / f"{split}.beton").is_file()
    assert not list((tmp_path / "lt").glob(".*tmp"))


def test_cli_digits_in_process_and_errors(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "data_prep"))
    try:
        import make_longtail
        import write_ffcv
    finally:
        sys.path.pop(0)
    assert make_longtail.main(["--dataset", "digits", "--imbalance-ratio", "10", "--out", str(tmp_path / "d")]) == 0
    assert write_ffcv.main([str(tmp_path / "d")]) == 0
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert m["train"]["counts"] == [124, 96, 74, 57, 44, 34, 26, 20, 16, 12]
    assert make_longtail.main(["--dataset", "digits", "--imbalance-ratio", "0.5", "--out", str(tmp_path / "e")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: data.imbalance_ratio must be >= 1, got 0.5"
    assert write_ffcv.main([str(tmp_path / "e")]) == 2
