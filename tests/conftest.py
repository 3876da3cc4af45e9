"""Fixtures shared by the test modules."""

import pytest


@pytest.fixture(scope="module")
def cluster():
    """Two local worker processes (one torch thread each), shared by a module's tests (passed as a Client)."""
    from volrestore.cluster.client import make_client

    client = make_client("local", workers=2)
    yield client
    client.close()
    client.volrestore_cluster.close()
