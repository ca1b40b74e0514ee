"""`kgrank serve` end to end: the CLI server on a free loopback port, its request path importing
no training code, and the demo page driven in headless Chromium (type a query, read results)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.export.tiny import TinyExport, tiny_export


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyExport:
    return tiny_export(tmp_path_factory)  # made once per session (cached in tests.export.tiny)

# Run in the server process before anything else: any training module imported on the serving
# path (kgrank.*.train, Ray, kgrank.distributed) makes the import fail, so the server dies.
SERVER = """
import re, sys
FORBIDDEN = re.compile(r"^(ray|kgrank\\.distributed)(\\.|$)|^kgrank\\..*\\.train$")
class Block:
    def find_spec(self, name, path=None, target=None):
        if FORBIDDEN.search(name):
            raise ImportError(f"training module {name} imported on the serving path")
        return None
sys.meta_path.insert(0, Block())
from kgrank.cli import main
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(export_dir: Path, log: Path, *extra: str, timeout: float = 120
                   ) -> Iterator[str]:
    """``kgrank serve EXPORT --port P *extra`` (through :data:`SERVER`) on a free loopback
    port, its URL once ``/healthz`` answers; terminated on exit."""
    port = free_port()
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-c", SERVER, "-q", "serve", str(export_dir),
                                 "--port", str(port), *extra],
                                stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"kgrank serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"kgrank serve did not come up:\n{log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tiny: TinyExport, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_server(tiny.export_dir, tmp_path_factory.mktemp("server") / "server.log",
                        timeout=90) as url:
        yield url


def test_cli_server_answers_over_http(server: str) -> None:
    r = httpx.post(f"{server}/search", json={"query": "shoes", "k": 3}, timeout=30)
    assert r.status_code == 200 and len(r.json()["results"]) == 3
    bad = httpx.post(f"{server}/search", json={"k": 0}, timeout=30)
    assert bad.status_code == 422 and "k:" in bad.json()["error"]


def chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("needs Debian's chromium + chromium-driver (.ci/run installs them)")
    return browser, driver


def test_page_in_headless_chromium(server: str) -> None:
    browser, driver_path = chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    profile = tempfile.mkdtemp(prefix="kgrank-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    try:
        driver.set_page_load_timeout(30)
        driver.get(server + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-ready") == "1")
        users = driver.find_elements(By.CSS_SELECTOR, "#user option")
        assert len(users) > 1
        users[1].click()  # a known user
        driver.find_elements(By.CSS_SELECTOR, "#device option")[1].click()
        driver.find_element(By.ID, "query").send_keys("red shoes")
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-done"))
        hits = driver.find_elements(By.CSS_SELECTOR, "#results li.hit")
        assert len(hits) == 12
        titles = [h.find_element(By.CSS_SELECTOR, ".title").text for h in hits]
        assert all(titles)
        badges = driver.find_elements(By.CSS_SELECTOR, "#results .badge")
        assert badges and all(b.text.startswith("why: ") for b in badges)
        assert "known user" in driver.find_element(By.ID, "status").text
        # product photos load (the demo shop's 64 px PNGs served by the API)
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#results img')]"
            ".some(i => i.complete && i.naturalWidth > 0)"))
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_worker_processes_serve_concurrent_requests(tiny: TinyExport,
                                                   tmp_path_factory: pytest.TempPathFactory
                                                   ) -> None:
    """``kgrank serve --workers 2``: the HTTP process's searcher and a ranking process answer
    concurrent searches from one queue, each the same ranking as the in-process searcher."""
    from concurrent.futures import ThreadPoolExecutor

    from kgrank.export import load
    from kgrank.serve.searcher import Context, Searcher

    log = tmp_path_factory.mktemp("workers") / "server.log"
    with running_server(tiny.export_dir, log, "--workers", "2") as url:
        searcher = Searcher(load(tiny.export_dir))
        queries = ["shoes", "red linen shirt", None, "blue"]

        def post(i: int) -> list[str]:
            body = {"k": 5, **({"query": queries[i % 4]} if queries[i % 4] else {})}
            r = httpx.post(f"{url}/search", json=body, timeout=60)
            assert r.status_code == 200, r.text
            return [h["item_id"] for h in r.json()["results"]]

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, range(24)))
        for i, got in enumerate(answers):
            want = searcher.search(None, queries[i % 4], Context(), k=5)
            assert got == [h.item_id for h in want.hits]
