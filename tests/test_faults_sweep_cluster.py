"""Cluster faults as whole sweeps on the real local Slurm (issue 14, faults 1, 2 and 9).

tests/test_faults_cluster.py proves each fault on one job's handle; here a sweep runs through it,
driven by ``launch/sweep.py`` in a child process as a user runs it, and the outcome is read where a
user reads it: results.parquet (every trial exactly once, its status and error) and the ledger.

1. slurmctld stopped mid-sweep (SIGTERM, as a restart does: a SIGKILL moments after a job started
   can make Slurm start it twice) and started again once the driver has seen it gone: the jobs
   train on without it, no trial fails, the sweep completes every trial once. Past
   ``launch.controller_downtime_s`` the trials fail with one line naming slurmctld, their jobs are
   left running, and ``--resume`` picks them up (the same jobs, not resubmitted).
2. slurmdbd down while the jobs end: their states come from squeue, nothing fails for lack of
   accounting (a trial whose job raises fails with its own error), and accounting records the ends
   once it is back.
9. One trial's job allocates past its ``--mem``: that trial fails with OUT_OF_MEMORY and Slurm's
   line first in its error; the other trials complete.

The jobs run :func:`job` (the stand-in trainer of test_sweep_standin.py, short epochs), which can
wait for the test: for ``$FAULTS_HOLD/train`` before training and, through the stand-in's
``$STANDIN_HOLD``, for ``$FAULTS_HOLD/finish`` before writing its result; so "the jobs are running
when the fault starts" and "they end while it lasts" are states the tests wait for, not timings.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_faults_cluster import daemon_down
from test_sweep_standin import FAIL_RHO, REPO, TESTS, checkpoint_epoch, end_ray_orphans, ledger_records
from test_sweep_standin import train as standin_train
from waiting import wait_until

pytestmark = pytest.mark.slurm

TARGET = "test_faults_sweep_cluster:job"
EPOCHS = 2
MEM_GB = 0.25
HOG_RHO = 0.0321  # the trial whose job allocates past its --mem
HOG_MB = 600


def job(cfg, run_dir, **kwargs) -> dict:
    """The trials' target (module docstring). The trial with ``optim.rho == HOG_RHO`` instead holds
    HOG_MB MiB of touched memory until Slurm kills it."""
    run_dir = Path(run_dir)
    if cfg.optim.rho == HOG_RHO:
        ballast = bytearray(os.urandom(1 << 20)) * HOG_MB  # random bytes: pages that stay resident
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            time.sleep(0.5)
        raise RuntimeError(f"{len(ballast) >> 20} MiB held for 300 s past --mem {cfg.launch.mem_gb} GB: memory is not enforced")
    hold = os.environ.get("FAULTS_HOLD")
    if hold:
        (run_dir / "waiting").touch()
        while not (Path(hold) / "train").exists():
            time.sleep(0.2)
    return standin_train(cfg, run_dir, epoch_s=0.6)


# ----------------------------------------------------------------------------- helpers


def squeue_states(job_ids) -> dict[str, str]:
    """{job id: state} of ``job_ids`` from squeue (the test's own call, not the driver's)."""
    out = subprocess.run(["squeue", "-h", "--states=all", "-j", ",".join(sorted(job_ids)), "-o", "%i|%T"],
                         capture_output=True, text=True).stdout
    return dict(line.split("|", 1) for line in out.split() if "|" in line)


def sacct_states(job_ids) -> dict[str, str]:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", ",".join(sorted(job_ids)), "-o", "JobID,State"],
                         capture_output=True, text=True).stdout
    return {f[0]: f[1].split(" ")[0] for f in (line.split("|") for line in out.splitlines()) if len(f) == 2}


class Sweep:
    """One sweep folder driven through ``launch/sweep.py`` (its runs, its jobs' holds, its clean-up)."""

    def __init__(self, tmp_path: Path, data_cache: Path, rhos: list[float], hold: bool = False, **launch) -> None:
        self.tmp_path, self.out = tmp_path, tmp_path / "out"
        self.hold = tmp_path / "hold"
        self.hold.mkdir()
        base = {"data": {"dataset": "digits", "cache_dir": str(data_cache)},
                "train": {"epochs": EPOCHS, "eval_every": 1},
                "launch": {"mem_gb": MEM_GB, "timeout_min": 10, **launch}}
        self.file = tmp_path / "sweep.yaml"
        self.file.write_text(yaml.safe_dump({"name": "faults", "base": base, "grid": {"rho": rhos},
                                             "max_concurrent": len(rhos)}, sort_keys=False))
        # squeue on the driver's PATH logs each call's exit status: the test sees the driver's own view
        self.bin, self.squeue_log = tmp_path / "bin", tmp_path / "squeue.log"
        self.bin.mkdir()
        self.squeue_log.touch()
        (self.bin / "squeue").write_text(f'#!/bin/bash\n"{shutil.which("squeue")}" "$@"\nrc=$?\n'
                                         f'echo "$rc" >> "{self.squeue_log}"\nexit $rc\n')
        (self.bin / "squeue").chmod(0o755)
        self.env = dict(os.environ, PATH=f"{self.bin}:{os.environ['PATH']}",
                        PYTHONPATH=f"{TESTS}:{os.environ.get('PYTHONPATH', '')}",
                        RAY_TMPDIR=f"/tmp/ltf-{os.getpid()}-{abs(hash(str(tmp_path))) % 10**6}")
        if hold:
            self.env.update(FAULTS_HOLD=str(self.hold), STANDIN_HOLD=str(self.hold / "finish"))
        self.drivers: list[subprocess.Popen] = []

    def start(self, *args: str) -> subprocess.Popen:
        log = self.tmp_path / f"driver{len(self.drivers) + 1}.log"
        with open(log, "ab") as out:
            driver = subprocess.Popen([sys.executable, str(REPO / "launch" / "sweep.py"), *args, "--output-dir", str(self.out),
                                       "--no-analyze", "--no-dashboard"],
                                      stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.tmp_path)
        driver.log = log
        self.drivers.append(driver)
        return driver

    def run(self) -> subprocess.Popen:
        return self.start("--config", str(self.file), "--partition", "cpu", "--target", TARGET)

    def ended(self, driver: subprocess.Popen, timeout: float = 300) -> int:
        """The driver's exit status, once it has exited."""
        try:
            return driver.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the driver still runs after {timeout} s:\n{driver.log.read_text()[-3000:]}") from None

    def until(self, driver: subprocess.Popen, predicate, timeout: float, what: str):
        """wait_until(predicate) while ``driver`` runs: a driver that exits first fails the test at once, with its log."""
        def check():
            value = predicate()
            if not value and driver.poll() is not None:
                raise AssertionError(f"the driver exited ({driver.returncode}) before {what}:\n{driver.log.read_text()[-3000:]}")
            return value

        return wait_until(check, timeout, what)

    def release(self, what: str) -> None:
        (self.hold / what).touch()

    def records(self) -> dict[str, dict]:
        return ledger_records(self.out)

    def jobs(self) -> dict[str, str]:
        """{trial id: job id} of the trials the ledger shows submitted and not over."""
        return {k: r["job_id"] for k, r in self.records().items() if r["status"] == "running" and r.get("job_id")}

    def all_running_and_waiting(self, n: int) -> dict[str, str] | None:
        """{trial: job} once ``n`` trials' jobs are RUNNING in squeue and wait for ``hold/train``."""
        jobs, records = self.jobs(), self.records()
        if len(jobs) < n or not all((Path(records[k]["run_dir"]) / "waiting").exists() for k in jobs):
            return None
        states = squeue_states(jobs.values())
        return jobs if all(states.get(j) == "RUNNING" for j in jobs.values()) else None

    def squeue_exits(self) -> list[int]:
        return [int(line) for line in self.squeue_log.read_text().split()]

    def results(self):
        import pandas as pd  # (deferred: the jobs import this module and need no pandas)

        return pd.read_parquet(self.out / "results.parquet").set_index("trial_id")

    def clean_up(self) -> None:
        for driver in self.drivers:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
        end_ray_orphans(self.env["RAY_TMPDIR"])
        self.release("train")
        self.release("finish")
        jobs = sorted({j for r in self.records().values() for j in r.get("job_ids") or []})
        if jobs:  # a failed test leaves no job behind (an ended one is not touched by scancel)
            subprocess.run(["scancel", *jobs], capture_output=True)


def every_trial_once(sweep: Sweep, trials: list[str], untrained: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Each trial is one row and one job, which started training once (``untrained``: never);
    returns {trial: job ids}."""
    df = sweep.results()
    assert sorted(df.index) == trials and df.index.is_unique
    jobs = {k: r["job_ids"] for k, r in sweep.records().items()}
    every_job = [j for ids in jobs.values() for j in ids]
    assert len(every_job) == len(set(every_job)) == len(trials), jobs
    for key in trials:
        starts = Path(df.loc[key, "run_dir"]) / "starts.log"
        if key in untrained:
            assert not starts.exists(), key
        else:
            assert len(starts.read_text().splitlines()) == 1, (key, starts.read_text())
    return jobs


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    """One dataset cache for the module's sweeps: digits is prepared by the first one only."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def new_sweep(slurm_cluster, data_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    made = []

    def make(rhos: list[float], hold: bool = False, **launch) -> Sweep:
        made.append(Sweep(tmp_path, data_cache, rhos, hold=hold, **launch))
        return made[-1]

    yield make
    for sweep in made:
        sweep.clean_up()


# ----------------------------------------------------------------------------- 1. slurmctld


def test_slurmctld_stopped_mid_sweep_and_started_again_no_trial_fails_and_every_trial_completes_once(new_sweep):
    sweep = new_sweep([1.0, 0.5], hold=True)
    driver = sweep.run()
    jobs = sweep.until(driver, lambda: sweep.all_running_and_waiting(2), 240, "both trials' jobs RUNNING and waiting")
    with daemon_down("slurmctld", kill=False):
        seen = len(sweep.squeue_exits())
        sweep.release("train")
        # the jobs train on without their controller, to their last epoch (then wait for "finish")
        sweep.until(driver, lambda: all(checkpoint_epoch(sweep.out / "trials" / k) == EPOCHS for k in jobs), 180,
                    "the jobs to train every epoch while slurmctld is down")
        # the driver's monitor has asked twice and got no answer: its handles count the downtime
        sweep.until(driver, lambda: len([rc for rc in sweep.squeue_exits()[seen:] if rc != 0]) >= 2, 180,
                    "two failed squeue calls of the driver")
        records = sweep.records()
        assert {k: r["status"] for k, r in records.items()} == {k: "running" for k in jobs}, records
        assert not any(r.get("error") for r in records.values()), records
        assert driver.poll() is None
    sweep.release("finish")
    assert sweep.ended(driver) == 0, driver.log.read_text()[-3000:]
    df = sweep.results()
    assert set(df["status"]) == {"completed"} and df["error"].isna().all(), df["error"].tolist()
    assert (df["epochs_run"] == EPOCHS).all() and df["knn_acc"].notna().all()
    assert every_trial_once(sweep, sorted(jobs)) == {k: [j] for k, j in jobs.items()}


def test_slurmctld_down_past_the_tolerated_downtime_fails_the_trials_in_one_line_and_resume_picks_them_up(new_sweep):
    sweep = new_sweep([1.0, 0.5], hold=True, controller_downtime_s=5)
    driver = sweep.run()
    jobs = sweep.until(driver, lambda: sweep.all_running_and_waiting(2), 240, "both trials' jobs RUNNING and waiting")
    with daemon_down("slurmctld", kill=False):
        code = sweep.ended(driver)
        lost = sweep.results()
    assert code == 0, driver.log.read_text()[-3000:]
    assert set(lost["status"]) == {"failed"}, lost[["status", "error"]]
    for key, error in lost["error"].items():
        assert "\n" not in error, error
        assert error.startswith("slurmctld has not answered for "), error
        assert f"(more than launch.controller_downtime_s=5), so the state of job {jobs[key]} is unknown" in error
        assert error.endswith("restart slurmctld, then --resume re-attaches to the job if it still runs"), error
    # the driver left the jobs alone: they still run, waiting for the test
    assert squeue_states(jobs.values()) == {j: "RUNNING" for j in jobs.values()}

    resumed = sweep.start("--resume")
    # --resume takes the lost trials up again (running, error cleared) before their jobs may end
    sweep.until(resumed, lambda: all(r["status"] == "running" and not r.get("error") for r in sweep.records().values()),
                240, "the resumed driver to take the lost trials up again")
    sweep.release("train")
    sweep.release("finish")
    assert sweep.ended(resumed) == 0, resumed.log.read_text()[-3000:]
    df = sweep.results()
    assert set(df["status"]) == {"completed"} and df["error"].isna().all(), df["error"].tolist()
    assert every_trial_once(sweep, sorted(jobs)) == {k: [j] for k, j in jobs.items()}  # the same jobs: re-attached


# ----------------------------------------------------------------------------- 2. accounting


def test_slurmdbd_down_while_the_jobs_end_nothing_fails_for_lack_of_accounting(new_sweep):
    sweep = new_sweep([1.0, 0.5, FAIL_RHO], hold=True)
    sweep.env.pop("STANDIN_HOLD")  # the jobs end as soon as they have trained
    driver = sweep.run()
    jobs = sweep.until(driver, lambda: sweep.all_running_and_waiting(3), 240, "the three trials' jobs RUNNING and waiting")
    with daemon_down("slurmdbd"):
        assert subprocess.run(["sacct", "-n", "-X", "-j", jobs["t0000"]], capture_output=True).returncode != 0
        sweep.release("train")
        assert sweep.ended(driver) == 0, driver.log.read_text()[-3000:]
        df = sweep.results()
        assert subprocess.run(["sacct", "-n", "-X", "-j", jobs["t0000"]], capture_output=True).returncode != 0
    assert dict(df["status"]) == {"t0000": "completed", "t0001": "completed", "t0002": "failed"}, df["error"].tolist()
    assert df.loc[["t0000", "t0001"], "error"].isna().all() and (df.loc[["t0000", "t0001"], "epochs_run"] == EPOCHS).all()
    # the failing trial ended by its own error (its job's FAILED state came from squeue), first line first
    error = df.loc["t0002", "error"]
    assert error.splitlines()[0].startswith(f"job {jobs['t0002']} failed"), error
    assert error.splitlines()[0].endswith(f"ValueError: stand-in failure at epoch 1 (rho {FAIL_RHO})"), error
    assert "Traceback" in error
    # the console's line of the failed trial shows that summary, not the traceback
    assert any("t0002 failed" in line and "ValueError: stand-in failure" in line
               for line in driver.log.read_text().splitlines()), driver.log.read_text()
    assert every_trial_once(sweep, ["t0000", "t0001", "t0002"]) == {k: [j] for k, j in jobs.items()}
    # accounting back: the ends that happened without it are recorded
    expected = {jobs["t0000"]: "COMPLETED", jobs["t0001"]: "COMPLETED", jobs["t0002"]: "FAILED"}
    wait_until(lambda: sacct_states(jobs.values()) == expected, 180, f"accounting to record {expected}", poll=1.0)


# ----------------------------------------------------------------------------- 9. out of memory


def test_a_trial_whose_job_exceeds_its_memory_fails_with_out_of_memory_and_the_others_complete(new_sweep):
    sweep = new_sweep([1.0, HOG_RHO, 0.5])
    driver = sweep.run()
    assert sweep.ended(driver) == 0, driver.log.read_text()[-3000:]
    df = sweep.results()
    assert dict(df["status"]) == {"t0000": "completed", "t0001": "failed", "t0002": "completed"}, df["error"].tolist()
    error = df.loc["t0001", "error"]
    first = error.splitlines()[0]
    assert first.startswith(f"job {df.loc['t0001', 'slurm_job_id']} ended OUT_OF_MEMORY ("), error
    assert "exceeded memory limit" in first and "raise launch.mem_gb" in first, error
    assert any("t0001 failed" in line and "ended OUT_OF_MEMORY" in line
               for line in driver.log.read_text().splitlines()), driver.log.read_text()  # the console says so too
    others = df.loc[["t0000", "t0002"]]
    assert others["error"].isna().all() and (others["epochs_run"] == EPOCHS).all() and others["knn_acc"].notna().all()
    every_trial_once(sweep, ["t0000", "t0001", "t0002"], untrained=("t0001",))
