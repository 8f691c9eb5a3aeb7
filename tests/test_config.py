"""The typed configuration: defaults, YAML overrides, and one-line errors naming the dotted key."""

import pytest
import yaml

from ltssl.config import Config, ConfigError, describe, load_config, save_config


def test_defaults_without_a_file():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.data.dataset == "digits" and cfg.optim.name == "rwsam"


def test_yaml_file_overrides_a_subset(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  rho: 2\n  weighting: label_power\ntrain:\n  epochs: 3\n")
    cfg = load_config(path)
    assert cfg.optim.rho == 2.0 and isinstance(cfg.optim.rho, float)
    assert cfg.optim.weighting == "label_power"
    assert cfg.train.epochs == 3
    assert cfg.model == Config().model  # untouched sections keep their defaults


def test_dotted_overrides_win_over_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim: {rho: 2}\n")
    cfg = load_config(path, ["optim.rho=0.05", "method.tase.enabled=true"])
    assert cfg.optim.rho == 0.05
    assert cfg.method.tase.enabled is True


@pytest.mark.parametrize(
    "tree, message",
    [
        ({"optim": {"rho": -1}}, "optim.rho must be >= 0, got -1"),
        (
            {"optim": {"rhoo": 1}},
            "unknown key optim.rhoo (allowed: name, lr, momentum, weight_decay, schedule, warmup_epochs, rho, "
            "adaptive, weighting, label_power_base, kde_alpha, kde_bandwidth, kde_every)",
        ),
        ({"trian": {}}, "unknown key trian (allowed: data, model, method, optim, train, eval, launch, tracking)"),
        ({"optim": {"rho": "big"}}, "optim.rho must be float, got 'big'"),
        ({"train": {"epochs": 2.5}}, "train.epochs must be int, got 2.5"),
        ({"optim": {"adaptive": "yes"}}, "optim.adaptive must be bool, got 'yes'"),
        ({"optim": {"name": "adam"}}, "optim.name must be one of sgd, sam, rwsam, got 'adam'"),
        ({"data": {"ood_dataset": "svhn"}}, "data.ood_dataset must be one of digits, digits_ood, cifar10, cifar100, imagefolder, got 'svhn'"),
        ({"data": {"imbalance_ratio": 0.5}}, "data.imbalance_ratio must be >= 1, got 0.5"),
        ({"method": {"multiview": {"filter_quantile": 1.5}}}, "method.multiview.filter_quantile must be <= 1, got 1.5"),
        ({"method": {"tase": {"k": 3}}}, "unknown key method.tase.k (allowed: enabled, num_clusters, refresh_every, tau_min, tau_max, weight_power, temperature_power, kmeans_iters, start_epoch)"),
        ({"data": {"class_order": [1, "a"]}}, "data.class_order must be list of int or null, got [1, 'a']"),
        ({"data": {"dataset": "cifar10"}}, "data.root must name the cifar10 source folder, got None"),
        ({"optim": 3}, "optim must be a mapping of keys, got 3"),
    ],
)
def test_errors_name_the_dotted_key(tree, message):
    with pytest.raises(ConfigError) as err:
        load_config(tree)
    assert str(err.value) == message
    assert "\n" not in str(err.value)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^override 'optim.rho' must look like section.key=value$"):
        load_config(None, ["optim.rho"])
    with pytest.raises(ConfigError, match=r"does not exist$"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"must hold a mapping of sections"):
        load_config(tmp_path / "list.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("optim: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(yaml.constructor.ConstructorError):
        load_config(path)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config({"optim": {"rho": 3.5}, "data": {"class_order": [2, 1, 0]}})
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(path) == cfg
    assert not list(path.parent.glob("*.tmp"))  # the atomic write left no temp file


def test_every_field_is_documented():
    rows = describe()
    assert {key for key, _, _ in rows} >= {"optim.rho", "method.tase.tau_min", "launch.partition"}
    assert all(help_text for _, _, help_text in rows), [k for k, _, h in rows if not h]
