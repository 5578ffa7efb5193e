"""The OpenAPI docs (/docs, /redoc) render with no internet: the service serves their assets itself."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urljoin

import httpx
import pytest

from tests.live import LiveServer, start_server, stop_server, wait_ready

API_KEY = "docs-key-0123456789"  # keys configured: the docs must stay readable without one, as before
PAGES = ["/docs", "/redoc"]
# What only a page that fetched /openapi.json and rendered it can contain (the HTML itself holds none of it).
RENDERED = {
    "/docs": ['class="opblock-summary-path" data-path="/vqa"', "Answer a question about an image"],
    "/redoc": ["Answer a question about an image", "/vqa"],
}
REFERENCE = re.compile(r"""(?:href|src|spec-url)="([^"]+)"|\burl: '([^']+)'""")


@pytest.fixture(scope="module")
def docs_server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("docs")
    env = {"DIDE_BUNDLES": str(tiny_bundle), "DIDE_STORE": str(tmp / "store"), "DIDE_API_KEYS": API_KEY}
    server = start_server(env, tmp / "server.log")
    try:
        wait_ready(server)
        yield server
    finally:
        stop_server(server)


def references(html: str) -> list[str]:
    return [a or b for a, b in REFERENCE.findall(html)]


@pytest.mark.parametrize("page", PAGES)
def test_docs_page_loads_every_asset_from_the_service(docs_server: LiveServer, page: str) -> None:
    response = httpx.get(docs_server.url + page, timeout=30)
    assert response.status_code == 200, response.text
    html = response.text
    assert "http://" not in html and "https://" not in html, f"{page} references an external URL:\n{html}"
    refs = references(html)
    assert any(ref.endswith(".js") for ref in refs), f"no script found in {page}:\n{html}"
    assert "/openapi.json" in refs
    for ref in refs:
        assert ref.startswith("/") and not ref.startswith("//"), f"{page} references {ref}, not a local path"
        asset = httpx.get(urljoin(docs_server.url + page, ref), timeout=30)  # no API key, like a browser
        assert asset.status_code == 200, f"{page}: GET {ref} -> {asset.status_code}"
        assert asset.content, f"{page}: {ref} is empty"


def chromium() -> str:
    """The browser; a skip only when none is installed (a failure under `make test`, which installs it)."""
    found = shutil.which("chromium")
    if found:
        return found
    hint = "install it with `apt-get install chromium` (deploy/install-tools.sh does, as root)"
    if os.environ.get("DIDE_REQUIRE_TOOLS") == "1":
        pytest.fail(f"no `chromium` on PATH and DIDE_REQUIRE_TOOLS=1: {hint}")
    pytest.skip(f"no `chromium` browser on PATH to render the docs pages: {hint}")


def rendered_dom(url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran, in headless Chromium that can resolve no host but 127.0.0.1."""
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",  # tests run as root in CI
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={profile}",
        # Offline even on a connected machine: a CDN asset fails to load instead of hiding the bug.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--window-size=1200,900",
        "--virtual-time-budget=10000",
        "--dump-dom",
        url,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, f"chromium exited with {result.returncode}:\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.parametrize("page", PAGES)
def test_docs_page_renders_offline_in_a_real_browser(docs_server: LiveServer, page: str, tmp_path: Path) -> None:
    dom = rendered_dom(docs_server.url + page, tmp_path / "profile")
    for text in RENDERED[page]:
        assert text in dom, f"{page} did not render (no {text!r}); DOM:\n{dom[:3000]}"
