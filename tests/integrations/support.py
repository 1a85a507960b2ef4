"""Helpers for tests that run gradguard inside real training stacks."""

from __future__ import annotations

import importlib
import os
import socket
from types import ModuleType

import pytest

REQUIRE_VAR = "GRADGUARD_REQUIRE_INTEGRATIONS"


def require(module: str) -> ModuleType:
    """Import ``module``; skip the test without it, or fail when CI requires integrations.

    CI sets ``GRADGUARD_REQUIRE_INTEGRATIONS=1`` after installing the
    ``integrations`` extra, so a stack that failed to install cannot pass as
    skipped.
    """
    if os.environ.get(REQUIRE_VAR) == "1":
        try:
            return importlib.import_module(module)
        except ImportError as exc:
            pytest.fail(f"{module} is not importable and {REQUIRE_VAR}=1: {exc}")
    return pytest.importorskip(module)


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
