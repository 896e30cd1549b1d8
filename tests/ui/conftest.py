"""The playground in a real headless Chromium (Debian's, driven by its chromedriver through
Selenium) against a real server on the tiny checkpoint, on 127.0.0.1.

`.ci/run` installs chromium and chromium-driver; elsewhere these tests skip and say why.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.checkpoints import TinyShape, hf_mixtral, write_hf_mixtral
from tests.server.conftest import API_KEY, RunningServer, start_server, stop_server

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
VENDOR = Path(__file__).parent / "vendor"
AXE_SHA256 = "e9e5863c33a874f09bc01acd9234b7e3c871479f5eef8802fa582544465e6d01"  # axe-core 4.11.0

if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("apt-get install chromium chromium-driver (.ci/run does)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="session")
def ui_server(tmp_path_factory):
    """The tiny checkpoint with a 4,096-token context, so a reply can outlast a click on Stop."""
    shape = TinyShape(max_position_embeddings=4096)
    model = write_hf_mixtral(hf_mixtral(shape), shape, tmp_path_factory.mktemp("ui-model"))
    running = start_server(
        model, tmp_path_factory.mktemp("ui-server") / "server.log", "--max-model-len", "4096"
    )
    yield running
    stop_server(running)


def chrome(width: int = 1280, height: int = 900) -> WebDriver:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    if width < 500:  # headless Chromium's narrowest window: narrower is a viewport of its own
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    return driver


@pytest.fixture
def browser():
    driver = chrome()
    yield driver
    driver.quit()


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], object], timeout: float = 20) -> object:
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


class Page:
    """The playground as a user drives it."""

    def __init__(self, driver: WebDriver, server: RunningServer) -> None:
        self.driver = driver
        self.server = server

    def open(self, key: str = API_KEY) -> Page:
        self.driver.get(f"{self.server.url}/")
        self.set("key", key)
        self.driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", self.el("key"))
        wait_for(
            self.driver, lambda d: self.driver.find_elements(By.CSS_SELECTOR, "#model option") or self.error()
        )
        return self

    def el(self, id_: str):
        return self.driver.find_element(By.ID, id_)

    def set(self, id_: str, value: str) -> None:
        element = self.el(id_)
        if not element.is_displayed():  # in the folded settings (a narrow screen): unfold them
            self.driver.find_element(By.CSS_SELECTOR, "#settings-panel > summary").click()
        element.clear()
        if value:
            element.send_keys(value)

    def error(self) -> str:
        element = self.el("error")
        return element.text if element.is_displayed() else ""

    def send(self, text: str) -> None:
        self.set("message", text)
        self.el("send").click()

    def replies(self) -> list[str]:
        return [e.text for e in self.driver.find_elements(By.CSS_SELECTOR, ".message.assistant .body")]

    def wait_done(self, timeout: float = 60) -> str:
        """Until the reply has ended (Send enabled again); the stats line."""
        try:
            wait_for(self.driver, lambda d: self.idle(), timeout)
        except TimeoutException:
            raise AssertionError(f"the reply did not end within {timeout:g} s: {self.state()}") from None
        return self.el("stats").text

    def idle(self) -> bool:
        return self.el("send").is_enabled() and not self.el("stop").is_enabled()

    def state(self) -> dict:
        """What the page shows, for a failure's message."""
        return {
            "send": self.el("send").is_enabled(), "stop": self.el("stop").is_enabled(), "error": self.error(),
            "stats": self.el("stats").text, "replies": self.replies(),
            "console": [e["message"][:300] for e in self.driver.get_log("browser")],
        }  # fmt: skip

    def wait_streaming(self, min_chars: int = 1) -> None:
        wait_for(
            self.driver, lambda d: self.el("stop").is_enabled() and len("".join(self.replies())) >= min_chars
        )


@pytest.fixture
def page(browser, ui_server) -> Page:
    return Page(browser, ui_server).open()


def axe_source() -> str:
    source = (VENDOR / "axe.min.js").read_bytes()
    assert hashlib.sha256(source).hexdigest() == AXE_SHA256, (
        "tests/ui/vendor/axe.min.js is not axe-core 4.11.0"
    )
    return source.decode()


def running_requests(server: RunningServer) -> float:
    from tests.server.conftest import scrape

    return scrape(server)["num_requests_running"]


def until(predicate: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()
