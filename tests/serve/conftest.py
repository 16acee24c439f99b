"""Ray Serve on a free loopback port (never 8000), once per test module."""

import socket

import pytest


@pytest.fixture(scope="module")
def serve_url(ray_session):
    from ray import serve

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
