"""Data faults (issue 14): a truncated or corrupt .beton is caught by the manifest's checksum before
training, a pipeline that raises mid-epoch ends the epoch with its error instead of hanging, and a
dataset folder that is not there says how to get it."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

import ltssl.data.ffcv as lf
import ltssl.data.prepare as prep
from ltssl.config import load_config
from ltssl.data import DataError, PreparedDataset, prepare_dataset
from ltssl.data.ffcv import SSLLoader

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> PreparedDataset:
    cfg = load_config(overrides={"data.cache_dir": str(tmp_path_factory.mktemp("cache")), "data.imbalance_ratio": 10})
    return prepare_dataset(cfg.data)


def _copy(prepared: PreparedDataset, tmp_path: Path):
    """A copy of the prepared folder in a cache of its own: (its DataConfig, its folder)."""
    cache = tmp_path / "cache"
    shutil.copytree(prepared.root, cache / prepared.root.name)
    cfg = load_config(overrides={"data.cache_dir": str(cache), "data.imbalance_ratio": 10})
    return cfg.data, cache / prepared.root.name


def test_truncated_beton_is_caught_before_training(prepared, tmp_path):
    data_cfg, root = _copy(prepared, tmp_path)
    beton = root / "train.beton"
    size = beton.stat().st_size
    beton.write_bytes(beton.read_bytes()[: size // 2])
    with pytest.raises(DataError, match=rf"^{beton} is truncated or corrupt: {size // 2} bytes, the manifest records "
                                        rf"{size}; delete {root} to rebuild it$"):
        prepare_dataset(data_cfg)
    assert beton.stat().st_size == size // 2  # reported, not silently rebuilt under running jobs


def test_corrupt_beton_is_caught_by_the_manifest_checksum(prepared, tmp_path):
    data_cfg, root = _copy(prepared, tmp_path)
    beton = root / "test.beton"
    good = beton.read_bytes()
    raw = bytearray(good)
    raw[len(raw) // 2] ^= 0xFF  # inside the image data: same size, FFCV would read it without a word
    beton.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"^{beton} is corrupt: sha256 [0-9a-f]{{12}}\.\.\. differs from the manifest's "
                                        rf"[0-9a-f]{{12}}\.\.\.; delete {root} to rebuild it$"):
        prepare_dataset(data_cfg)
    beton.write_bytes(good)
    assert prepare_dataset(data_cfg).root == root
    (root / "probe.beton").unlink()
    with pytest.raises(DataError, match=rf"^{root / 'probe.beton'} is missing from the prepared dataset: delete {root} to rebuild it$"):
        prepare_dataset(data_cfg)


def test_big_files_are_hashed_once_per_size_and_mtime(prepared, tmp_path, monkeypatch):
    data_cfg, root = _copy(prepared, tmp_path)
    monkeypatch.setattr(prep, "STAMP_MIN_BYTES", 0)  # every file counts as big
    hashed = []

    def counting_sha256(path):
        hashed.append(Path(path).name)
        return real_sha256(path)

    real_sha256 = prep.file_sha256
    monkeypatch.setattr(prep, "file_sha256", counting_sha256)
    prepare_dataset(data_cfg)
    assert sorted(hashed) == ["probe.beton", "test.beton", "train.beton"]
    assert (root / prep.VERIFIED_STAMPS).is_file()
    hashed.clear()
    ds = prepare_dataset(data_cfg)
    assert hashed == [] and ds.root == root
    beton = root / "train.beton"
    raw = bytearray(beton.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    beton.write_bytes(bytes(raw))  # a rewrite changes the mtime: the stamp no longer vouches for it
    with pytest.raises(DataError, match=rf"^{beton} is corrupt: sha256 "):
        prepare_dataset(data_cfg)
    assert hashed == ["train.beton"]


def test_pipeline_error_mid_epoch_ends_the_epoch_with_the_error(prepared, monkeypatch):
    # Deferred: importing ffcv at collection would set torch's thread count to 1 for every test module.
    from ffcv.fields.basics import IntDecoder
    from ffcv.pipeline.operation import Operation
    from ffcv.transforms import ToTensor

    class FailOnThirdBatch(Operation):
        """A stage that works for two batches, then raises (as a bad sample's decoder would)."""

        def generate_code(self):
            calls = []

            def stage(inp, dst):
                calls.append(1)
                if len(calls) == 3:
                    raise RuntimeError("decoder failed on batch 3")
                return inp

            return stage

        def declare_state_and_memory(self, previous_state):
            return replace(previous_state, jit_mode=False), None

    monkeypatch.setattr(lf, "_int_pipeline", lambda: [IntDecoder(), ToTensor(), FailOnThirdBatch()])
    # The stall timeout stays at its default (minutes): the error itself must end the epoch.
    loader = SSLLoader(prepared.train_beton, batch_size=32, num_views=2, image_size=32, recipe="cifar", seed=0,
                       distributed=False, device=CPU, num_workers=1, batches_ahead=1)
    assert loader.fetch_timeout_s == lf.DEFAULT_FETCH_TIMEOUT_S
    seen = []
    with pytest.raises(DataError, match=rf"^loading {prepared.train_beton} failed in the FFCV pipeline: "
                                        r"RuntimeError: decoder failed on batch 3$"):
        for batch in loader.epoch(0):
            seen.append(batch["index"].clone())
    assert len(seen) == 2 < len(loader)  # the batches before the failing one arrive; the epoch does not finish


def _sweep_data(sweep: str, cache: Path):
    base = yaml.safe_load((REPO / "sweeps" / sweep).read_text())["base"]
    return load_config(base, overrides={"data.cache_dir": str(cache)}).data


def test_missing_dataset_folder_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a fresh clone: the sweeps' relative data/ folders are not there
    data = _sweep_data("cifar10_lt/rwsam.yaml", tmp_path / "cache")
    root = tmp_path / "data" / "cifar-10-batches-py"
    expected = (f"data.root {root} does not exist: get cifar-10-python.tar.gz from "
                f"https://www.cs.toronto.edu/~kriz/cifar.html (on the login node: curl -LO "
                f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz) and unpack it with "
                f"'mkdir -p {tmp_path / 'data'} && tar xzf cifar-10-python.tar.gz -C {tmp_path / 'data'}', "
                f"which makes {root}")
    with pytest.raises(DataError) as err:
        prepare_dataset(data)
    assert str(err.value) == expected
    with pytest.raises(DataError) as err:
        prep.check_data_config(data)  # the same line from the login-node check
    assert str(err.value) == expected

    data = _sweep_data("cifar100_lt/rwsam.yaml", tmp_path / "cache")
    with pytest.raises(DataError, match=r"^data.root .*/data/cifar-100-python does not exist: get "
                                        r"cifar-100-python.tar.gz from .* which makes .*/data/cifar-100-python$"):
        prepare_dataset(data)

    data = load_config(overrides={"data.dataset": "imagefolder", "data.root": "data/imagenet",
                                  "data.cache_dir": str(tmp_path / "cache")}).data
    with pytest.raises(DataError, match=r"^data.root .*/data/imagenet does not exist: expected layout: "
                                        r"root/train/<class>/<image>.jpg and root/val/<class>/<image>.jpg \(or root/test\), "
                                        r"or data.split_file / data.test_split_file listing 'relative/path label' lines under root$"):
        prepare_dataset(data)
    data = load_config(overrides={"data.ood_dataset": "cifar100", "data.ood_root": "data/cifar-100-python",
                                  "data.cache_dir": str(tmp_path / "cache")}).data
    with pytest.raises(DataError, match=rf"^data.ood_root {tmp_path}/data/cifar-100-python does not exist: get "
                                        r"cifar-100-python.tar.gz from .* which makes .*/data/cifar-100-python$"):
        prepare_dataset(data)  # checked before the main dataset is built
    assert not (tmp_path / "cache").exists()  # refused before anything was made
