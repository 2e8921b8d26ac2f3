"""What a test needs from outside Python's own: a skip on a developer's machine, a failure
in CI (`CI=true`, which `.ci/run` sets), where `make test` installs every tool and a
missing one is a broken set-up, not a reason to test less."""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest


def missing(reason: str) -> NoReturn:
    """Skip with ``reason``, or fail with it under ``CI=true``."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: a missing tool fails)", pytrace=False)
    pytest.skip(reason)


def need_module(name: str, reason: str) -> ModuleType:
    """``import name``, or `missing(reason)` when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"{name}: {reason}")
