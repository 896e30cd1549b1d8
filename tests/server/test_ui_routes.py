"""The playground's routes (server/routes/ui.py): open, same-origin only, out of the schema, in the
wheel, and gone with --no-ui. The page itself is tested in a browser (tests/ui/)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest

from server.routes.ui import ASSETS, CSP, UI_DIR, UI_PATHS
from tests.server.conftest import start_server, stop_server

ROOT = Path(__file__).resolve().parents[2]
# What a first visit downloads, uncompressed: the page and its assets (README states it).
PAGE_BUDGET_BYTES = 64 * 1024


def test_the_page_and_its_assets_are_open_and_same_origin_only(server):
    with httpx.Client(base_url=server.url, timeout=10) as client:  # no key
        for path in ("/", "/ui"):
            r = client.get(path)
            assert r.status_code == 307 and r.headers["location"] == "/ui/"
        types = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
        for path, (body, _) in ASSETS.items():
            r = client.get(path)
            assert r.status_code == 200 and r.content == body, path
            suffix = Path(path).suffix or ".html"
            assert r.headers["content-type"].startswith(types[suffix]), path
            assert r.headers["content-security-policy"] == CSP
            assert r.headers["x-content-type-options"] == "nosniff"
        assert "default-src 'none'" in CSP and "connect-src 'self'" in CSP and "'unsafe-inline'" not in CSP
        # The API behind the page still needs the key.
        assert client.get("/v1/models").status_code == 401
        assert client.get("/ui/missing.js").status_code == 401  # not an asset: not open
        schema = client.get("/openapi.json", headers=server.headers()).json()
        assert not [p for p in schema["paths"] if p == "/" or p.startswith("/ui")]


def test_the_open_paths_are_exactly_the_files_of_the_page():
    files = {p.name for p in UI_DIR.iterdir()}
    assert {"index.html", "app.js", "api.js", "markdown.js", "snippets.js", "store.js", "style.css"} <= files
    expected = {"/", "/ui", "/ui/"} | {f"/ui/{name}" for name in files if name != "index.html"}
    assert expected == UI_PATHS


def test_the_page_weighs_less_than_its_budget():
    total = sum(len(body) for body, _ in ASSETS.values())
    assert total < PAGE_BUDGET_BYTES, total


def test_no_ui_serves_nothing_there(hf_dir, tmp_path):
    running = start_server(hf_dir, tmp_path / "server.log", "--no-ui")
    try:
        for path in ("/", "/ui", "/ui/", "/ui/app.js"):
            r = httpx.get(f"{running.url}{path}", headers=running.headers(), timeout=10)
            assert r.status_code == 404, path
        # and without the UI its paths are not open either
        assert httpx.get(f"{running.url}/ui/app.js", timeout=10).status_code == 401
    finally:
        stop_server(running)


@pytest.mark.slow
def test_the_wheel_ships_the_page(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("mixtral_server-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in UI_DIR.iterdir():
        assert f"server/ui/{path.name}" in names, path.name
    assert not [n for n in names if n.startswith("tests/")]  # axe-core and the tests stay out
