"""Fixtures every suite may use."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway_testkit.process import GatewayProcesses


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[GatewayProcesses]:
    """Starts ``gateway`` processes; kills every one still running at teardown."""
    with GatewayProcesses(tmp_path) as processes:
        yield processes
