"""One switch for tests whose prerequisites are missing: skip here, fail in CI.

Some tests need what a developer's machine may lack: the shared data
(``../shared/data`` beside the project, or ``$MEDSEG_SHARED_DATA``), optional
codecs (imagecodecs), ``taskset``, or real services (SLURM, PostgreSQL, an
mlflow server; see tests/services.py). Without them such a test skips and
gives the reason. CI (``.ci/run``) sets ``MEDSEG_REQUIRE_ALL_TESTS=1``, which
turns such a skip into a failure, so no test can silently stop running there.
``MEDSEG_REQUIRE_SERVICE_TESTS=1``, the switch's older name, is read the same.

Under the switch, tests/conftest.py also turns any other skip into a failure,
except for tests marked ``cuda``: those skip on a CPU-only machine by design.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

__all__ = ["REQUIRE_ALL_TESTS_ENV", "all_tests_required", "import_or_skip_or_fail", "skip_or_fail"]

REQUIRE_ALL_TESTS_ENV = "MEDSEG_REQUIRE_ALL_TESTS"
_OLD_NAME = "MEDSEG_REQUIRE_SERVICE_TESTS"  # accepted as an alias


def all_tests_required() -> bool:
    """Whether a test that cannot run must fail rather than skip."""
    return any(os.environ.get(name) == "1" for name in (REQUIRE_ALL_TESTS_ENV, _OLD_NAME))


def skip_or_fail(reason: str) -> None:
    """Skip the test with ``reason``; under the switch, fail it instead."""
    __tracebackhide__ = True  # the report names the caller's line, not this one
    if all_tests_required():
        pytest.fail(f"test cannot run, but {REQUIRE_ALL_TESTS_ENV}=1: {reason}", pytrace=False)
    pytest.skip(reason)


def import_or_skip_or_fail(module: str) -> ModuleType:
    """``pytest.importorskip`` that fails under the switch; returns the module."""
    __tracebackhide__ = True
    try:
        return importlib.import_module(module)
    except ImportError as err:
        skip_or_fail(f"could not import {module!r}: {err}")
        raise  # not reached: skip_or_fail always raises
