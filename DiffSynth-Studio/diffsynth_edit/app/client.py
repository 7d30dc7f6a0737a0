"""A `gradio_client.Client` for the app's API that does not rebuild its TLS context on every request.

gradio_client (2.x, on httpx 0.28) opens a new httpx client for every upload, queue join, result stream and
download, and each one builds an SSL context and loads the CA bundle, even for plain http:// URLs: ≈ 20–25 ms of
CPU per request with OpenSSL 3, ≥ 5 requests per `/edit` call (two uploads, the join, the event stream, the
download), i.e. ≈ 0.1 s of every call spent in the client before any network traffic. Handing gradio_client one
ready context (`ssl_verify=httpx.create_ssl_context()`: the same verification httpx does by default, certificates
checked, `SSL_CERT_FILE` honoured) removes that cost; nothing else changes. Without this package:

    import httpx
    from gradio_client import Client
    client = Client("http://127.0.0.1:7999/", ssl_verify=httpx.create_ssl_context())
"""
from __future__ import annotations

from typing import Any


def connect(url: str, **kwargs: Any):
    """`gradio_client.Client(url, ...)` with one reused TLS context (see the module docstring); kwargs pass through."""
    import httpx
    from gradio_client import Client

    kwargs.setdefault("ssl_verify", httpx.create_ssl_context())
    kwargs.setdefault("verbose", False)
    return Client(url, **kwargs)
