"""Shared test set-up.

Hypothesis' per-example deadline is a wall-clock threshold, and these machines are shared and
noisy, so it is off; ``HYPOTHESIS_PROFILE=thorough`` runs many more examples.
"""

import logging
import os
from collections.abc import Iterator

import pytest
import structlog
from hypothesis import HealthCheck, settings

# a real mosquitto per test that asks for it (``broker``), on its own free port
pytest_plugins = ["tests.support.broker"]

settings.register_profile("default", deadline=None)
settings.register_profile(
    "thorough", deadline=None, max_examples=2000, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """A test that runs the CLI configures structlog; the next test starts from the defaults
    (a logger left writing to a finished test's captured stream fails with a closed file)."""
    handlers = list(logging.getLogger().handlers)
    yield
    structlog.reset_defaults()
    logging.getLogger().handlers = handlers
