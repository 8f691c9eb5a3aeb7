"""Pieces of the driver without Ray running: ASHA per group, the searcher (plan and TPE), the ledger."""

from __future__ import annotations

import json

import pytest
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher

from ltssl.sweep import SweepError, run_sweep
from ltssl.sweep.folder import driver_lock
from ltssl.sweep.ledger import Ledger
from ltssl.sweep.scheduler import GroupedASHA
from ltssl.sweep.searcher import SweepSearcher
from ltssl.sweep.spec import load_sweep
from ltssl.sweep.trial import describe


class FakeTrial:
    def __init__(self, trial_id: str, group: str):
        self.trial_id = trial_id
        self.config = {"trial_key": trial_id, "group": group}


def feed(sched: GroupedASHA, trial: FakeTrial, epoch: int, acc: float) -> str:
    return sched.on_trial_result(None, trial, {"epoch": epoch, "knn_acc": acc})


def test_asha_ranks_trials_only_within_their_group():
    sched = GroupedASHA(metric="knn_acc", mode="max", max_t=8, grace_period=1, reduction_factor=2)
    easy = [FakeTrial(f"a{i}", "digits/r=1/lt/simsiam") for i in range(2)]
    hard = [FakeTrial(f"b{i}", "digits/r=100/lt/simsiam") for i in range(3)]
    for t in easy + hard:
        sched.on_trial_add(None, t)
    assert feed(sched, easy[0], 1, 0.90) == TrialScheduler.CONTINUE
    # 0.40 at r = 100 is far below 0.90 at r = 1, but it is the first of its group: it goes on
    assert feed(sched, hard[0], 1, 0.40) == TrialScheduler.CONTINUE
    assert feed(sched, hard[1], 1, 0.30) == TrialScheduler.STOP      # below the r = 100 cutoff
    assert feed(sched, easy[1], 1, 0.50) == TrialScheduler.STOP      # below the r = 1 cutoff
    assert feed(sched, hard[2], 1, 0.45) == TrialScheduler.CONTINUE  # above the r = 100 median
    assert sched.stopped == {"b1", "a1"}
    assert set(sched.groups) == {"digits/r=1/lt/simsiam", "digits/r=100/lt/simsiam"}
    # results without the metric (step lines, heartbeats) are no decision
    assert sched.on_trial_result(None, hard[2], {"epoch": 2, "loss": 0.1}) == TrialScheduler.CONTINUE


def test_asha_never_stops_a_trial_that_has_trained_all_its_epochs():
    sched = GroupedASHA(metric="knn_acc", mode="max", max_t=4, grace_period=1, reduction_factor=2)
    good, bad = FakeTrial("g", "x"), FakeTrial("b", "x")
    for t in (good, bad):
        sched.on_trial_add(None, t)
    for epoch in (1, 2, 4):
        feed(sched, good, epoch, 0.9)
    # epoch 4 = max_t: only the final evaluation is left; stopping would waste the training
    assert sched.on_trial_result(None, bad, {"epoch": 4, "knn_acc": 0.1}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, bad, {"epoch": 4, "knn_acc": 0.1, "final": True}) == TrialScheduler.CONTINUE
    assert "b" not in sched.stopped


def test_asha_seeded_with_finished_trials_of_an_earlier_run():
    sched = GroupedASHA(metric="loss", mode="min", max_t=8, grace_period=2, reduction_factor=2)
    sched.seed_history("g", "t0000", [(2, 0.5), (4, 0.3)])
    late = FakeTrial("t0005", "g")
    sched.on_trial_add(None, late)
    assert sched.on_trial_result(None, late, {"epoch": 2, "loss": 0.9}) == TrialScheduler.STOP


def sweep(tmp_path, **extra):
    tree = {"base": {"data": {"dataset": "digits"}, "train": {"epochs": 2}},
            "grid": {"imbalance_ratio": [1, 10]}, "sample": {"rho": {"loguniform": [0.1, 10]}}, "num_samples": 3, **extra}
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps(tree))
    return load_sweep(path)


def test_searcher_hands_out_the_plan_and_records_it(tmp_path):
    spec = sweep(tmp_path)
    searcher = SweepSearcher(spec, tmp_path, None, metric="knn_acc", mode="max")
    configs = [searcher.suggest(f"tune{i}") for i in range(6)]
    assert searcher.suggest("tune6") == Searcher.FINISHED
    plan = spec.plan(None)
    assert [c["trial_key"] for c in configs] == [p.trial_id for p in plan]
    assert configs[1]["optim.rho"] == plan[1].params["optim.rho"] and configs[1]["group"] == "digits/r=10/lt/simsiam"
    records = Ledger(tmp_path).all()
    assert [r["status"] for r in records] == ["pending"] * 6
    assert records[0]["run_dir"] == str((tmp_path / "trials" / "t0000").resolve())
    # a resumed searcher: finished trials are not handed out again, unfinished ones come first
    ledger = Ledger(tmp_path)
    ledger.update("t0000", status="completed")
    ledger.update("t0003", status="running", job_id="17")
    ledger.update("t0004", status="stopped_early")
    resumed = SweepSearcher(spec, tmp_path, None, metric="knn_acc", mode="max")
    keys = []
    while (c := resumed.suggest(f"r{len(keys)}")) != Searcher.FINISHED:
        keys.append(c["trial_key"])
    assert keys == ["t0001", "t0002", "t0003", "t0005"]


def test_tpe_asks_per_cell_and_rebuilds_its_studies_from_the_ledger(tmp_path):
    spec = sweep(tmp_path, search={"algorithm": "tpe", "seed": 3, "n_startup_trials": 2}, num_samples=4)
    searcher = SweepSearcher(spec, tmp_path, None, metric="knn_acc", mode="max")
    ledger = Ledger(tmp_path)
    for i in range(8):
        config = searcher.suggest(f"tune{i}")
        assert 0.1 <= config["optim.rho"] <= 10
        key = config["trial_key"]
        # the driver records the end of each trial; TPE reads it back at its next suggestion
        value = 1.0 - abs(config["optim.rho"] - 1.0) / 10
        ledger.update(key, status="completed", metric_value=value, metric_history=[[1, value / 2]])
        searcher.on_trial_complete(f"tune{i}", result={"knn_acc": value})
    assert searcher.suggest("tune8") == Searcher.FINISHED
    studies = searcher.studies
    assert len(studies) == 2  # one per imbalance ratio (seed axes would share a study)
    assert sorted(len(s.trials) for s in studies.values()) == [4, 4]
    assert all(t.value is not None for s in studies.values() for t in s.trials)
    rebuilt = SweepSearcher(spec, tmp_path, None, metric="knn_acc", mode="max")
    assert sorted(len(s.trials) for s in rebuilt.studies.values()) == [4, 4]
    assert rebuilt.remaining() == 0


def test_ledger_updates_are_atomic_records(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.create({"trial_id": "t0000", "params": {}, "config": {}, "group": "g", "run_dir": "x"})
    ledger.update("t0000", status="running", job_id="5")
    ledger.update("t0000", job_id="9")
    record = ledger.read("t0000")
    assert record["job_ids"] == ["5", "9"] and record["status"] == "running"
    assert ledger.create({"trial_id": "t0000", "status": "pending"})["job_id"] == "9"  # kept as is
    assert ledger.counts()["running"] == 1
    assert not list((tmp_path / "ledger").glob("*.tmp"))


@pytest.mark.parametrize("status", ["completed", "stopped_early", "failed"])
def test_finished_statuses_are_not_resumed(tmp_path, status):
    spec = sweep(tmp_path, num_samples=1)
    searcher = SweepSearcher(spec, tmp_path, None, metric="knn_acc", mode="max")
    first = searcher.suggest("a")["trial_key"]
    Ledger(tmp_path).update(first, status=status)
    resumed = SweepSearcher(spec, tmp_path, None, metric="knn_acc", mode="max")
    assert resumed.suggest("b")["trial_key"] != first


def test_a_second_driver_on_the_same_sweep_is_refused(tmp_path):
    """--resume while the first driver still runs would hand out the same trials twice."""
    spec = sweep(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep.yaml").write_text(spec.to_yaml())
    (out / "sweep.json").write_text(json.dumps({"sweep_id": "out", "name": spec.name, "partition": None}))
    with driver_lock(out):
        with pytest.raises(SweepError, match="another driver .* is running the sweep in"):
            run_sweep(resume=True, output_dir=out)


def test_trial_name_names_the_trial_and_its_parameters_as_the_sweep_file_does():
    """The console and Ray's dashboard (the trial's placement group) show this name: the sweep file's
    names (optimizer, rho), not the config's dotted keys."""
    config = {"trial_key": "t0001", "group": "digits/r=10/lt/simsiam", "optim.name": "rwsam",
              "optim.rho": 0.52412, "data.imbalance_ratio": 10, "method.multiview.filter_quantile": 0.1}
    assert describe(config) == ("t0001 [digits/r=10/lt/simsiam] imbalance_ratio=10 "
                                "method.multiview.filter_quantile=0.1 optimizer=rwsam rho=0.5241")


def test_ray_that_does_not_start_is_one_line_after_a_second_try(monkeypatch):
    """Ray's own start-up wait is fixed (30 s); a loaded login node can miss it: one retry, then one line."""
    from ltssl.sweep import run as tune_run

    tries = []

    def timed_out(run):
        tries.append(run)
        raise Exception("The current node timed out during startup. This could happen because some of the raylet failed to startup.\nmore")

    monkeypatch.setattr(tune_run, "_init_ray", timed_out)
    with pytest.raises(SweepError) as err:
        tune_run.start_ray("the run")
    assert len(tries) == 2
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("Ray did not start on this machine (2 tries): The current node timed out during startup.")
