"""Which trial runs next: the sweep's plan (random/grid) or Optuna TPE, through Ray Tune's Searcher API.

Every trial is created in the ledger here, in the driver, before its job starts, with a stable
id (``t0000``, ``t0001``, ...) and its resolved config, so a resumed sweep knows each trial
without Tune's snapshot.

* random / grid: the whole plan is known up front (:meth:`SweepSpec.plan`); the searcher hands
  out the trials that are not over yet, unfinished ones of an earlier run first.
* TPE: one Optuna study per group of grid cells that differ only by seed; trial ``i`` of cell
  ``c`` asks that cell's study for its sampled values (TPE after ``search.n_startup_trials``
  random ones). Results are told back when a trial ends (stopped trials as pruned, with their
  intermediate values). On resume the studies are rebuilt from the ledger's finished trials.
"""

from __future__ import annotations

import json
from pathlib import Path

from ray.tune.search import Searcher

from ltssl.config import to_dict
from ltssl.sweep.ledger import FINISHED, Ledger
from ltssl.sweep.spec import SweepSpec, TrialPlan


# Optuna is imported inside the TPE functions on purpose: only TPE sweeps need it, and it is a slow
# import that a random or grid sweep's driver would otherwise pay at start-up.


def _optuna_distributions(spec: SweepSpec) -> dict:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for key, dist in spec.sample.items():
        if dist.kind == "loguniform":
            out[key] = FloatDistribution(dist.low, dist.high, log=True)
        elif dist.kind == "uniform":
            out[key] = FloatDistribution(dist.low, dist.high)
        elif dist.kind == "randint":
            out[key] = IntDistribution(int(dist.low), int(dist.high))
        else:
            out[key] = CategoricalDistribution(list(dist.values))
    return out


def ledger_entry(plan: TrialPlan, output_dir: Path, partition: str | None) -> dict:
    return {
        "trial_id": plan.trial_id,
        "params": plan.params,
        "config": plan.config,
        "group": plan.group,
        "study": plan.study,
        "run_dir": str((output_dir / "trials" / plan.trial_id).resolve()),
        "partition": partition,
    }


class SweepSearcher(Searcher):
    """Hands out the sweep's trials as Tune configs ``{"trial_key", "group", <dotted key>: value}``."""

    def __init__(self, spec: SweepSpec, output_dir: str | Path, partition: str | None, *, metric: str, mode: str):
        super().__init__(metric=metric, mode=mode)
        self.spec = spec
        self.output_dir = Path(output_dir)
        self.partition = partition
        self.ledger = Ledger(output_dir)
        self.live: dict[str, str] = {}            # the loop's trial id -> trial key
        self.records = {r["trial_id"]: r for r in self.ledger.all()}
        # Unfinished trials of an earlier run go first, on their own run_dir.
        self.queue: list[str] = [k for k, r in sorted(self.records.items()) if r["status"] not in FINISHED]
        self.tpe = spec.search.algorithm == "tpe"
        self.planned: list[TrialPlan] = spec.plan(partition)  # TPE: the cells only
        self.next_index = 0
        self.studies: dict = {}
        self.asked: dict = {}                      # trial key -> optuna trial asked in this run
        self.pending_tells: list[str] = []
        if self.tpe:
            self._rebuild_studies()

    def __getstate__(self) -> dict:
        # A pickled searcher (Tune's own controller saves it) keeps no study: the ledger is the
        # record, and Optuna's in-memory studies (locks) are rebuilt from it on resume.
        state = dict(self.__dict__)
        state["studies"], state["asked"], state["pending_tells"] = {}, {}, []
        return state

    # ------------------------------------------------------------------ optuna

    def _study(self, name: str):
        import optuna

        if name not in self.studies:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            seed = self.spec.search.seed * 1_000_003 + len(self.studies)
            sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.spec.search.n_startup_trials)
            self.studies[name] = optuna.create_study(direction="maximize" if self._mode == "max" else "minimize", sampler=sampler)
        return self.studies[name]

    def _rebuild_studies(self) -> None:
        for plan in self.planned:  # create the studies in plan order: their seeds do not depend on history
            self._study(plan.study)
        for record in self.records.values():
            if record["status"] in FINISHED:
                self._tell(record["trial_id"], record)

    def _tell(self, key: str, record: dict) -> None:
        import optuna
        from optuna.trial import TrialState, create_trial

        study = self._study(record.get("study", ""))
        dists = _optuna_distributions(self.spec)
        params = {k: v for k, v in record["params"].items() if k in dists}
        value = record.get("metric_value")
        history = {int(e): float(v) for e, v in (record.get("metric_history") or [])}
        status = record["status"]
        trial = self.asked.pop(key, None)
        if status == "completed" and value is not None:
            state, kwargs = TrialState.COMPLETE, {"value": float(value)}
        elif status == "stopped_early":
            state, kwargs = TrialState.PRUNED, {}
        else:
            state, kwargs = TrialState.FAIL, {}
        if trial is not None:
            for epoch, v in sorted(history.items()):
                trial.report(v, epoch)
            study.tell(trial, kwargs.get("value"), state=state)
        elif len(params) == len(dists):
            try:
                study.add_trial(create_trial(params=params, distributions=dists, state=state,
                                             intermediate_values=history, **kwargs))
            except (ValueError, optuna.exceptions.OptunaError):
                pass  # a value outside today's ranges: the study goes on without it

    # ------------------------------------------------------------------ Searcher API

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def _new_trial(self) -> str | None:
        """Create the ledger record of the next trial not in the ledger yet; its key, or None."""
        while self.next_index < len(self.planned):
            plan = self.planned[self.next_index]
            self.next_index += 1
            if plan.trial_id in self.records:
                continue
            if self.tpe and not all(k in plan.params for k in self.spec.sample):
                trial = self._study(plan.study).ask(_optuna_distributions(self.spec))
                params = {**{k: _plain(v) for k, v in trial.params.items()}, **plan.params}
                cfg = self.spec.resolve(params, self.partition, plan.trial_id)
                tree = to_dict(cfg)
                plan = TrialPlan(plan.trial_id, params, tree, self.spec.group_of(tree), plan.study)
                self.asked[plan.trial_id] = trial
            record = self.ledger.create(ledger_entry(plan, self.output_dir, self.partition))
            self.records[plan.trial_id] = record
            return plan.trial_id
        return None

    def suggest(self, trial_id: str):
        self._flush_tells()
        key = self.queue.pop(0) if self.queue else self._new_trial()
        if key is None:
            return Searcher.FINISHED
        record = self.records[key]
        self.live[trial_id] = key
        return {"trial_key": key, "group": record["group"], **record["params"]}

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        key = self.live.pop(trial_id, None)
        if key is not None and self.tpe:
            # The searcher hears of a trial's end before the driver writes its final status
            # and metric to the ledger: tell the study at the next suggestion.
            self.pending_tells.append(key)

    def _flush_tells(self) -> None:
        while self.pending_tells:
            key = self.pending_tells.pop(0)
            try:
                record = self.ledger.read(key)
            except (OSError, json.JSONDecodeError):
                continue
            self.records[key] = record
            self._tell(key, record)

    def remaining(self) -> int:
        return len(self.queue) + sum(1 for p in self.planned[self.next_index:] if p.trial_id not in self.records)


def _plain(v):
    return v.item() if hasattr(v, "item") else v
