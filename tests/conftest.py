"""Fixtures shared by the test modules."""

import pytest


@pytest.fixture(scope="module")
def cluster():
    """Two local worker processes (one torch thread each), shared by a module's tests (passed as a Client)."""
    from volrestore.cluster.client import connect

    with connect("local", workers=2, echo=lambda *_: None) as client:
        yield client
