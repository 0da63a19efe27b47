"""MEDSEG_REQUIRE_ALL_TESTS=1 (CI) turns every skip into a failure, except for
tests marked ``cuda``; xfail is untouched. Checked on a throw-away test suite
that uses this suite's conftest.py and requirements_switch.py."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

HERE = Path(__file__).resolve().parent

SUITE = '''
import pytest
from requirements_switch import import_or_skip_or_fail, skip_or_fail

@pytest.fixture
def missing_data():
    skip_or_fail("no data here")

def test_runs():
    pass

def test_plain_skip():
    pytest.skip("plain skip")

def test_importorskip():
    pytest.importorskip("no_such_module_medseg")

def test_import_or_skip_or_fail():
    import_or_skip_or_fail("no_such_module_medseg")

def test_import_found():
    assert import_or_skip_or_fail("json").dumps([]) == "[]"

@pytest.mark.skipif(True, reason="skipif mark")
def test_skipif():
    pass

def test_fixture_skip(missing_data):
    pass

@pytest.mark.cuda
@pytest.mark.skipif(True, reason="no CUDA here")
def test_gpu():
    pass

@pytest.mark.xfail(reason="known")
def test_known_bug():
    assert False
'''


@pytest.fixture
def suite(pytester):
    pytester.makeini('[pytest]\nmarkers =\n    cuda: needs a CUDA GPU\n')
    pytester.makeconftest((HERE / "conftest.py").read_text())
    pytester.makepyfile(requirements_switch=(HERE / "requirements_switch.py").read_text(), test_suite=SUITE)
    return pytester


def _run(pytester, monkeypatch, env: dict[str, str]):
    for name in ("MEDSEG_REQUIRE_ALL_TESTS", "MEDSEG_REQUIRE_SERVICE_TESTS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")


def test_without_the_switch_skips_stay_skips(suite, monkeypatch):
    result = _run(suite, monkeypatch, {})
    result.assert_outcomes(passed=2, skipped=6, xfailed=1)


@pytest.mark.parametrize("name", ["MEDSEG_REQUIRE_ALL_TESTS", "MEDSEG_REQUIRE_SERVICE_TESTS"])
def test_with_the_switch_every_skip_fails_but_cuda_and_xfail(suite, monkeypatch, name):
    result = _run(suite, monkeypatch, {name: "1"})
    # Skips in the test body fail; skips while setting up (skipif, fixtures) are errors.
    result.assert_outcomes(passed=2, failed=3, errors=2, skipped=1, xfailed=1)
    output = result.stdout.str()
    for test in ("test_plain_skip", "test_importorskip", "test_import_or_skip_or_fail"):
        assert f"FAILED test_suite.py::{test}" in output
    for test in ("test_skipif", "test_fixture_skip"):
        assert f"ERROR test_suite.py::{test}" in output
    assert "SKIPPED [1] test_suite.py" in output and "no CUDA here" in output  # the cuda test
    assert "forbids skips: Skipped: plain skip" in output  # the reason is kept
    assert "MEDSEG_REQUIRE_ALL_TESTS=1: no data here" in output
    assert "could not import 'no_such_module_medseg'" in output


def test_a_module_skipped_while_collected_fails_under_the_switch(suite, monkeypatch):
    suite.makepyfile(test_gone='import pytest\npytest.skip("whole module", allow_module_level=True)\n')
    _run(suite, monkeypatch, {}).assert_outcomes(passed=2, skipped=7, xfailed=1)
    result = _run(suite, monkeypatch, {"MEDSEG_REQUIRE_ALL_TESTS": "1"})
    assert "ERROR test_gone.py" in result.stdout.str()
    assert "whole module" in result.stdout.str()
