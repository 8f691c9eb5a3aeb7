"""benchmarks/gpu.py, the device check, runs on the CPU (--device cpu --quick) without FFCV, Ray or submitit."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("machine", "sizes", "setup", "augmentation", "steps", "end_to_end", "kde_refresh", "ddp", "digits", "compile",
            "goals", "section_s", "total_s")

# Run the benchmark as a bare GPU machine would: importing ffcv, ray or submitit (or a submodule) fails.
BLOCKED_RUN = """
import runpy, sys
from importlib.abc import MetaPathFinder

class Blocked(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('ffcv', 'ray', 'submitit'):
            raise ImportError(f'{name} is not installed on a bare GPU machine')
        return None

sys.meta_path.insert(0, Blocked())
sys.argv = ['benchmarks/gpu.py', *sys.argv[1:]]
runpy.run_path('benchmarks/gpu.py', run_name='__main__')
assert not [m for m in sys.modules if m.split('.')[0] in ('ffcv', 'ray', 'submitit')]
"""


def numbers(tree, where="") -> list[tuple[str, float]]:
    """Every number in a JSON tree, with its path."""
    if isinstance(tree, dict):
        return [x for k, v in tree.items() for x in numbers(v, f"{where}.{k}")]
    if isinstance(tree, list):
        return [x for i, v in enumerate(tree) for x in numbers(v, f"{where}[{i}]")]
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return [(where, float(tree))]
    return []


@pytest.mark.timeout(2400)  # about a minute on 2 idle cores; far longer on a loaded CI machine
def test_quick_cpu_run_writes_every_section_without_ffcv_ray_submitit(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-c", BLOCKED_RUN, "--device", "cpu", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=2300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert [s for s in SECTIONS if s not in result] == []
    values = numbers(result)
    assert [p for p, v in values if not math.isfinite(v)] == []
    steps = result["steps"]
    assert set(steps) == {"simsiam", "simclr", "moco_v2"}
    for method in steps.values():
        assert set(method) == set(result["sizes"]["modes"])
        for row in method.values():
            assert set(row) == {"sgd", "sam", "rwsam_label_power", "rwsam_kde"}
            assert row["sgd"]["ratio_to_sgd"] == 1.0
            assert all(r["images_per_s"] > 0 and r["peak_memory_mib"] > 0 and r["step_s"] > 0 for r in row.values())
    assert set(result["compile"]) >= {"sgd", "rwsam_label_power"}
    assert result["ddp"]["backend"] == "gloo" and result["ddp"]["sgd"]["ddp"]["step_s"] > 0
    digits = result["digits"]
    assert len(digits["device"]["knn_acc"]) == len(digits["cpu"]["knn_acc"]) == result["sizes"]["digits_seeds"]
    assert all(0 <= a <= 1 for a in digits["device"]["knn_acc"] + digits["cpu"]["knn_acc"])
    # on the CPU "the device" is the CPU: same seeds, same precision, same code -> the same accuracies
    assert digits["device"]["knn_acc"] == digits["cpu"]["knn_acc"]
    assert result["augmentation"]["images_per_s"] > 0 and result["kde_refresh"]["density_s"] > 0
    assert set(result["goals"]["met"]) == set(result["goals"]["targets"])
    check_augmentation_sides(result)


def check_augmentation_sides(result):
    """The loader's default, eager and compiled augmentation measured side by side, none failed, compiled == eager."""
    aug, e2e = result["augmentation"], result["end_to_end"]
    assert [k for k in {**aug, **e2e} if k.endswith("error")] == []
    assert (aug["default_pixels"], aug["eager_pixels"], aug["compiled_pixels"]) == ("fused", "eager", "compiled")  # on the CPU
    for row in (aug, e2e):
        assert all(row[f"{side}_images_per_s"] > 0 for side in ("default", "eager", "compiled"))
        assert row["images_per_s"] == row["default_images_per_s"]
    assert aug["compile_s"] > 0 and aug["host_draw_and_copy_ms_per_batch"] > 0
    assert aug["compiled_vs_eager_max_abs_diff"] < 1e-5


@pytest.mark.timeout(600)
def test_sections_runs_only_the_named_ones(tmp_path):
    out = tmp_path / "gpu.json"
    args = [sys.executable, "-c", BLOCKED_RUN, "--device", "cpu", "--quick", "--out", str(out)]
    proc = subprocess.run(args + ["--sections", "augmentation,end_to_end"], cwd=REPO, capture_output=True, text=True, timeout=550)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["sections"] == ["augmentation", "end_to_end"] and set(result["section_s"]) == {"augmentation", "end_to_end"}
    assert not {"steps", "kde_refresh", "ddp", "digits", "compile"} & set(result)
    assert set(result["goals"]["measured"]) == {"augmentation_images_per_s", "simsiam_sgd_bf16_channels_last_images_per_s"}
    check_augmentation_sides(result)
    bad = subprocess.run(args + ["--sections", "augmentation,steps,nope"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1] == (
        "benchmarks/gpu.py: --sections 'augmentation,steps,nope': each name must be one of "
        "augmentation, steps, end_to_end, kde_refresh, ddp, digits, compile")
