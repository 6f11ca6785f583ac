"""Fixtures: the real mock provider and gateway for the integration tests."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import Gateway, Mock, tidegate_bin  # noqa: E402


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def _require_bin() -> Path:
    path = tidegate_bin()
    if not path.is_file():
        pytest.fail(
            f"tidegate binary not found at {path}: build it with `cargo build --release` at the repo root "
            "or point TIDEGATE_BIN at it",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def mock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mock]:
    _require_bin()
    m = Mock(tmp_path_factory.mktemp("mock"))
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture
def gateway(request: pytest.FixtureRequest, tmp_path: Path, mock: Mock) -> Iterator[Gateway]:
    """A started gateway (generation 1); the test may stop it and start more."""
    gw = Gateway(tmp_path, mock.url)
    try:
        gw.start()
        yield gw
    finally:
        gw.stop_all()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(gw.logs())
            print(mock.proc.log_tail(20))
