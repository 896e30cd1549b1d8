"""The playground, driven in headless Chromium against the real server (tests/ui/conftest.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from urllib.parse import urlsplit

import httpx
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select

from tests.server.conftest import API_KEY, MODEL, launch, start_server, stop_server
from tests.ui.conftest import Page, axe_source, chrome, running_requests, until, wait_for

LONG = "3000"  # max_tokens of a reply that outlasts the click on Stop


def api_reply(server, body: dict) -> dict:
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=server.headers(), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def words(text: str) -> str:
    return " ".join(text.split())


def test_a_reply_streams_in_token_by_token_and_matches_the_api(page, ui_server):
    page.set("temperature", "0")
    page.set("max_tokens", "48")
    # Record the reply's length at every DOM change while it streams.
    page.driver.execute_script(
        "window.__lengths = []; new MutationObserver(() => { const r = document.querySelector("
        "'.message.assistant .body'); if (r) window.__lengths.push(r.textContent.length); })"
        ".observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});"
    )
    page.send("Tell me a story.")
    stats = page.wait_done()
    lengths = page.driver.execute_script("return window.__lengths")
    assert len(set(lengths)) >= 10, lengths  # many partial replies, growing, before the last
    assert lengths == sorted(lengths)
    question = [{"role": "user", "content": "Tell me a story."}]
    expected = api_reply(
        ui_server, {"model": MODEL, "temperature": 0, "max_tokens": 48, "messages": question}
    )
    assert words(page.replies()[0]) == words(expected["choices"][0]["message"]["content"])
    usage = expected["usage"]
    assert (
        f"usage: {usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion = "
        f"{usage['total_tokens']} tokens" in stats
    )
    assert re.search(r"TTFT \d+ ms · [\d.]+ tokens/s", stats), stats


def test_stop_aborts_the_stream_and_the_server_frees_the_sequence(page, ui_server):
    page.set("max_tokens", LONG)
    page.send("Count to a thousand.")
    page.wait_streaming(min_chars=20)
    page.el("stop").click()
    page.wait_done()
    assert "(stopped)" in page.replies()[0]
    assert until(lambda: running_requests(ui_server) == 0, timeout=5)
    shown = page.replies()[0]
    assert until(lambda: page.replies()[0] == shown, timeout=1)  # nothing more arrives


def test_regenerate_with_a_fixed_seed_gives_the_same_text(page):
    page.set("temperature", "1")
    page.set("random_seed", "7")
    page.set("max_tokens", "24")
    page.send("Say something.")
    page.wait_done()
    first = page.replies()
    page.el("regenerate").click()
    page.wait_done()
    assert page.replies() == first and len(first) == 1 and first[0]
    page.set("random_seed", "8")
    page.el("regenerate").click()
    page.wait_done()
    assert page.replies() != first  # the seed is what made them equal


def test_the_apis_errors_are_shown_as_it_gives_them(browser, ui_server):
    page = Page(browser, ui_server).open(key="wrong-key")
    assert page.error() == "401: Invalid or missing API key [invalid_api_key]"
    page = Page(browser, ui_server).open()
    assert page.error() == ""
    page.set("temperature", "5")
    page.send("hi")
    page.wait_done()
    assert page.error() == (
        "400: temperature: must be a finite number between 0.0 and 2.0, got 5.0 (temperature) [invalid_value]"
    )
    assert page.replies() == []  # the failed reply is not kept; the question is, to resend
    page.set("temperature", "")
    Select(page.el("response_format")).select_by_value("json_schema")
    page.set("schema", '{"type": "bogus"}')
    page.el("regenerate").click()
    page.wait_done()
    assert page.error().startswith("400: response_format.json_schema.schema: cannot be enforced")
    assert page.error().endswith("(response_format.json_schema.schema) [invalid_response_format]")
    page.set("schema", "{not json")
    page.el("regenerate").click()
    assert page.error().startswith("JSON schema: not valid JSON")


def test_a_schema_reply_follows_the_schema(page):
    Select(page.el("response_format")).select_by_value("json_schema")
    digit = {"type": "integer", "minimum": 0, "maximum": 9}
    schema = {"type": "object", "properties": {"n": digit}, "required": ["n"], "additionalProperties": False}
    page.set("schema", json.dumps(schema))
    page.set("max_tokens", "40")
    page.send("A number, as JSON.")
    page.wait_done()
    assert page.error() == ""
    assert json.loads(page.replies()[0])["n"] in range(10)


def test_model_output_is_text_never_html(page):
    payload = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> **bold**'
    page.set("prefix", payload)  # the reply continues it, so the reply shown contains it
    page.set("max_tokens", "8")
    page.send("Repeat after me.")
    page.wait_done()
    reply = page.driver.find_element(By.CSS_SELECTOR, ".message.assistant .body")
    assert reply.text.startswith(
        '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> bold'
    )
    assert reply.find_elements(By.TAG_NAME, "strong")[0].text == "bold"  # the Markdown subset
    assert not reply.find_elements(By.CSS_SELECTOR, "script, img")
    assert page.driver.execute_script("return window.__pwned") is None


def press(browser, *keys: str) -> None:
    """Keys as a user types them (a fresh chain each time: a chain replays what it held)."""
    chain = ActionChains(browser)
    for key in keys:
        chain.send_keys(key)
    chain.perform()


def tab_to(browser, id_: str, limit: int = 40) -> None:
    for _ in range(limit):
        if browser.switch_to.active_element.get_attribute("id") == id_:
            return
        press(browser, Keys.TAB)
    raise AssertionError(f"Tab never reached #{id_}")


def test_keyboard_only_type_send_and_stop(browser, ui_server):
    page = Page(browser, ui_server)
    browser.get(f"{ui_server.url}/ui/")
    assert browser.switch_to.active_element.get_attribute("id") == "message"  # autofocus
    tab_to(browser, "key")  # on around the page to the key field
    press(browser, API_KEY, Keys.TAB)  # leaving the field applies the key
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
    tab_to(browser, "max_tokens")
    press(browser, Keys.CONTROL + "a", LONG)
    tab_to(browser, "message")
    press(browser, "Count to a thousand.", Keys.ENTER)
    page.wait_streaming(min_chars=20)
    press(browser, Keys.ESCAPE)
    page.wait_done()
    assert "(stopped)" in page.replies()[0]
    assert until(lambda: running_requests(ui_server) == 0, timeout=5)
    # The focus stayed in the message box; the buttons follow it.
    assert browser.switch_to.active_element.get_attribute("id") == "message"
    press(browser, Keys.TAB)
    assert browser.switch_to.active_element.get_attribute("id") == "send"


def test_no_horizontal_scroll_at_400_px(ui_server):
    driver = chrome(width=400, height=800)
    try:
        page = Page(driver, ui_server).open()
        page.set("prefix", "```\n" + "x = 1  # " + "long line " * 40 + "\n```\n" + "W" * 300 + "\n\n")
        page.set("max_tokens", "8")
        page.send("A long answer please.")
        page.wait_done()
        width, scroll = driver.execute_script(
            "return [document.documentElement.clientWidth, document.documentElement.scrollWidth]"
        )
        assert width <= 400 and scroll <= width, (width, scroll)
    finally:
        driver.quit()


def test_no_request_leaves_the_origin(page, ui_server):
    page.set("max_tokens", "8")
    page.send("hi")
    page.wait_done()
    page.el("copy-curl").click()
    origin = urlsplit(ui_server.url)
    urls = []
    for entry in page.driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    assert any(u.endswith("/v1/chat/completions") for u in urls) and any(u.endswith("/app.js") for u in urls)
    for url in urls:
        parts = urlsplit(url)
        assert (parts.scheme, parts.netloc) == (origin.scheme, origin.netloc), url
        assert API_KEY not in url  # the key travels in a header only


def test_axe_finds_no_serious_or_critical_violations(page):
    page.set("max_tokens", "16")
    page.send("Hello, **world**.")
    page.wait_done()
    page.driver.execute_script(axe_source())
    page.driver.set_script_timeout(60)
    result = page.driver.execute_async_script(
        "const done = arguments[0]; axe.run().then(done, (e) => done(String(e)));"
    )
    assert isinstance(result, dict), result
    bad = [(v["id"], v["impact"], [n["target"] for n in v["nodes"]]) for v in result["violations"]
           if v["impact"] in ("serious", "critical")]  # fmt: skip
    assert bad == []


def test_the_copied_requests_run_and_match_the_reply(page, ui_server, tmp_path):
    page.set("temperature", "0")
    page.set("max_tokens", "16")
    page.set("top_p", "0.9")
    page.set("presence_penalty", "0.5")
    page.set("frequency_penalty", "0.25")
    page.set("stop_text", "zzz, qqq")
    page.set("n", "2")
    page.el("safe_prompt").click()
    page.set("system", "Be brief.")
    page.send("Name a color.")
    page.wait_done()
    shown = [words(r.text) for r in page.driver.find_elements(By.CSS_SELECTOR, ".message.assistant .choice")]
    assert len(shown) == 2 and all(s.startswith(f"choice {i + 1} of 2") for i, s in enumerate(shown))
    page.el("copy-curl").click()
    snippet = page.el("snippet").get_attribute("value")
    body = json.loads(re.search(r"-d '(.*)'$", snippet, flags=re.DOTALL).group(1))
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert body["messages"][1] == {"role": "user", "content": "Name a color."}
    sent = {k: body[k] for k in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "n")}
    assert sent == {
        "temperature": 0,
        "top_p": 0.9,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "n": 2,
    }
    assert body["stop"] == ["zzz", "qqq"] and body["safe_prompt"] is True and body["stream"] is False
    assert API_KEY not in snippet
    assert len(body["messages"]) == 2  # the request of the reply shown
    env = os.environ | {"MISTRAL_API_KEY": API_KEY}
    done = subprocess.run(["bash", "-c", snippet], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    by_curl = [c["message"]["content"] for c in json.loads(done.stdout)["choices"]]
    page.el("snippet-close").click()
    page.el("copy-python").click()
    code = page.el("snippet").get_attribute("value")
    assert "import Mistral" in code and API_KEY not in code
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    # Both reproduce the reply shown (greedy, n = 2).
    assert [f"choice {i + 1} of 2 {words(text)}" for i, text in enumerate(by_curl)] == shown
    assert done.stdout == "".join(f"{text}\n" for text in by_curl)


def test_edit_and_resend_replaces_the_rest_of_the_conversation(page):
    page.set("max_tokens", "8")
    page.send("First question.")
    page.wait_done()
    page.send("Second question.")
    page.wait_done()
    assert len(page.replies()) == 2
    page.driver.find_element(By.CSS_SELECTOR, "button[aria-label='Edit message 1']").click()
    area = page.driver.find_element(By.CSS_SELECTOR, "textarea[aria-label='Edit message 1']")
    area.clear()
    area.send_keys("A better first question.")
    page.driver.find_element(By.XPATH, "//button[text()='Resend']").click()
    page.wait_done()
    users = [e.text for e in page.driver.find_elements(By.CSS_SELECTOR, ".message.user .body")]
    assert users == ["A better first question."] and len(page.replies()) == 1


def test_conversations_are_kept_and_the_key_is_not(page, ui_server):
    page.set("max_tokens", "8")
    page.send("Remember this chat.")
    page.wait_done()
    reply = page.replies()
    page.el("new-chat").click()
    assert page.replies() == []
    page.driver.refresh()
    wait_for(page.driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#conversation-list li"))
    page.driver.find_element(
        By.CSS_SELECTOR, "button[aria-label='Open conversation: Remember this chat.']"
    ).click()
    assert page.replies() == reply
    stored = page.driver.execute_script("return JSON.stringify(localStorage)")
    assert "Remember this chat." in stored and API_KEY not in stored
    assert page.driver.execute_script("return sessionStorage.getItem('mixtral-ui.key')") == API_KEY
    assert page.el("key").get_attribute("value") == API_KEY  # kept for the tab, not on disk
    assert API_KEY not in page.driver.current_url


def test_a_server_still_loading_shows_not_ready_then_the_models(browser, hf_dir, tmp_path):
    """503 `not_ready` as the API gives it while the model loads; the page asks again and lists
    the models once the server is ready (tests/server/gated_server.py holds the load)."""
    gate = tmp_path / "load"
    args = ["--model", str(hf_dir), "--served-model-name", MODEL, "--kv-cache-memory-gb", "0.05"]
    args += ["--api-key", API_KEY]
    gated = "tests.server.gated_server"
    server = launch(
        args, tmp_path / "server.log", module=gated, env={"GATE_LOAD": str(gate)}, until="/health"
    )
    try:
        page = Page(browser, server).open()
        assert page.error().startswith("503: ") and page.error().endswith("[not_ready]"), page.error()
        assert not browser.find_elements(By.CSS_SELECTOR, "#model option")
        gate.touch()
        wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"), timeout=60)
        assert page.error() == "" and Select(page.el("model")).first_selected_option.text == MODEL
    finally:
        stop_server(server)


def test_a_reply_the_server_ends_with_an_error_keeps_its_text_and_says_so(browser, hf_dir, tmp_path):
    """A forward that fails mid-way ends the stream in-band (`finish_reason: "error"`, then
    [DONE]): the page keeps what came and shows the error (tests/server/faulty_server.py)."""
    from tests.server.faulty_server import BREAKS_MID_WAY

    server = start_server(hf_dir, tmp_path / "server.log", module="tests.server.faulty_server")
    try:
        page = Page(browser, server).open()
        page.set("random_seed", str(BREAKS_MID_WAY))
        page.set("max_tokens", "32")
        page.send("Break, please.")
        page.wait_done()
        assert page.error() == "500: the server ended the reply with an error; what came before is kept"
        (reply,) = page.replies()
        assert reply.endswith("(ended by an error)") and len(reply) > len("(ended by an error)")
    finally:
        stop_server(server)
