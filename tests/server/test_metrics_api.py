"""/metrics: vLLM-like names, counters that move with traffic, protected by the API key."""

from __future__ import annotations

import re

import httpx

from tests.server.conftest import MODEL


def scrape(server) -> str:
    r = httpx.get(f"{server.url}/metrics", headers=server.headers(), timeout=10)
    assert r.status_code == 200
    return r.text


def value(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert match, name
    return float(match.group(1))


def test_metrics_move_with_traffic(server):
    before = scrape(server)
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert f"mixtral:{name} " in before
    tokens = 0
    for _ in range(2):
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5,
            "temperature": 0,
        }
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=server.headers(), timeout=60)
        tokens += r.json()["usage"]["completion_tokens"]
    after = scrape(server)
    gen = "mixtral:generation_tokens_total"
    assert value(after, gen) - value(before, gen) == tokens
    ttft = "mixtral:time_to_first_token_seconds_count"
    assert value(after, ttft) - value(before, ttft) == 2
    done = lambda t: sum(  # noqa: E731
        value(t, f'mixtral:request_success_total{{finished_reason="{r}"}}') for r in ("stop", "length")
    )
    assert done(after) - done(before) == 2


def test_metrics_need_the_key(server):
    assert httpx.get(f"{server.url}/metrics", timeout=10).status_code == 401
