"""Under CI=true a skipped test is a failure, so a missing Slurm or FFCV can never pass silently."""

from pathlib import Path

pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()
SKIPPING = """
import pytest

def test_needs_something():
    pytest.skip("Slurm is not installed")

def test_fine():
    assert 1 + 1 == 2
"""


def test_skip_fails_under_ci(pytester, monkeypatch):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(SKIPPING)
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest_subprocess("-rA")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*skipped under CI=true, which counts as a failure*Slurm is not installed*"])


def test_skip_is_a_skip_outside_ci(pytester, monkeypatch):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(SKIPPING)
    monkeypatch.delenv("CI", raising=False)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1, skipped=1)
