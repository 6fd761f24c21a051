"""``ramserve ps``: what running servers hold, read from their ``GET /status``."""

from __future__ import annotations

import contextlib
from typing import Any

from . import service
from .errors import RamserveError
from .fmt import human_bytes, table
from .settings import ServerSettings


def default_urls(server: ServerSettings) -> list[str]:
    """Where a server is expected: the configured host and port, and the launchd service's."""
    host = "127.0.0.1" if server.host in ("0.0.0.0", "::") else server.host
    urls = [f"http://{host}:{server.port}"]
    paths = service.Paths.here()
    if paths.settings.is_file():
        with contextlib.suppress(service.ServiceError, KeyError, TypeError, ValueError):
            urls.append(service.service_url(service.load_service_settings(paths), server))
    return list(dict.fromkeys(urls))


def probe(urls: list[str], api_key: str | None) -> list[dict[str, Any]]:
    """The status of each server that answers; raises when none does."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    found, tried = [], []
    for url in urls:
        try:
            r = httpx.get(f"{url}/status", headers=headers, timeout=3)
        except httpx.HTTPError as e:
            tried.append(f"{url} ({type(e).__name__})")
            continue
        if r.status_code == 401:
            raise RamserveError(f"{url} needs its API key: pass --api-key or set RAMSERVE_API_KEY")
        if r.status_code != 200:
            tried.append(f"{url} (HTTP {r.status_code})")
            continue
        found.append({"url": url, **r.json()})
    if not found:
        raise RamserveError("no ramserve server answers at " + ", ".join(tried))
    return found


def render_status(servers: list[dict[str, Any]]) -> str:
    rows = [(s["model"], s["url"], s["stage"], human_bytes(s["weight_bytes"] or 0),
             human_bytes(s["rss_bytes"]), f"{s['active']}/{s['parallel']}",
             f"{s['queued']}/{s['queue_size']}", f"{s['uptime_s'] / 60:.0f} min")
            for s in servers]  # fmt: skip
    return table(["model", "url", "stage", "weights", "RSS", "active", "queued", "up"], rows)
