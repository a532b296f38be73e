"""Network checks made before any download, so nothing hangs on a machine without network."""

from __future__ import annotations

import os
import socket
import urllib.request
from urllib.parse import urlparse


def hub_offline() -> bool:
    """Whether the user asked the Hugging Face libraries to stay offline."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the URL's host, or to the proxy the environment names for it (HTTPS_PROXY, ALL_PROXY, ...;
    NO_PROXY respected), opens within `timeout` seconds (no request is sent). Behind a proxy the host itself is never
    reachable directly: probing it would take a machine that downloads through the proxy for an offline one."""
    parsed = urlparse(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parsed.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(parsed.hostname or ""):
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False
