"""Fixtures of the flow tests: one real Prefect test server per module that runs flows."""
import pytest


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=120):
        yield
