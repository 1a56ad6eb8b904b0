"""Fail at once when start weights must be downloaded on a node that cannot download them.

Compute nodes are often offline. A URL or preset start (``student.pretrained_weights=dinobloom_l``)
not yet in the cache (:func:`dinov2.models.weights.cached_path`) would be fetched by each node's
first process while the other ranks wait in a collective, and on an offline node that waits
until a network timeout. :func:`check_download_possible` runs on every rank before any
collective: when the file is not cached it opens one TCP connection to the URL's host (or to
the proxy that urllib would use) with a short timeout, and when that fails it raises an error
that names the file to fetch and where to put it.
"""

import os
import socket
import threading
import urllib.parse
import urllib.request
from pathlib import Path

from dinov2.errors import CheckpointError
from dinov2.models.weights import PRESETS, cached_path, default_cache_dir

CONNECT_TIMEOUT_S = 5.0


def download_url(source: str) -> str | None:
    """The URL that loading ``source`` would download; None for a local file or an unknown name."""
    text = str(source)
    if not text or os.path.exists(text):
        return None
    if "://" in text:
        return text
    return PRESETS[text].url if text in PRESETS else None


def connection_problem(url: str, timeout_s: float = CONNECT_TIMEOUT_S) -> str:
    """Why no TCP connection to ``url``'s host (or its proxy) opens within ``timeout_s``; '' when one does.
    Name resolution counts against the timeout too (it runs in a thread)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        return ""
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_parts.hostname or "", proxy_parts.port or 80
    outcome = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append("")
        except OSError as error:
            outcome.append(f"{type(error).__name__}: {error}")

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    where = f"{host}:{port}" + (" (the proxy)" if proxy and host != parts.hostname else "")
    if not outcome:
        return f"{where}: no answer within {timeout_s:g} s"
    return f"{where}: {outcome[0]}" if outcome[0] else ""


def check_download_possible(
    source: str, what: str = "student.pretrained_weights", cache_dir=None, timeout_s: float = CONNECT_TIMEOUT_S
) -> None:
    """Raise :class:`CheckpointError` when ``source`` needs a download that this node cannot make."""
    url = download_url(source)
    if url is None:
        return
    target = cached_path(url, cache_dir)
    if target.exists():
        return
    problem = connection_problem(url, timeout_s)
    if not problem:
        return
    cache = Path(cache_dir or default_cache_dir())
    raise CheckpointError(
        f"{what}={source} must be downloaded from {url}, but this node ({socket.gethostname()}) cannot reach "
        f"it ({problem}); compute nodes are often offline. Fetch the file on a machine with internet, e.g. "
        f"the login node: `curl -L --create-dirs -o {target} {url}` (the cache, {cache}: $DINO_HIER_CACHE or "
        f"~/.cache/dino_hier, must be visible from this node), or put it anywhere and pass its path: "
        f"{what}=/path/to/{Path(urllib.parse.urlsplit(url).path).name}"
    )
