"""GET /metrics (RELIABILITY.md item 23): vLLM-like names that move with traffic, behind the API key.

Every route is measured (chat and text completions, streamed or not); a disconnect counts as
`abort`, a request refused with a 400 is not counted at all.
"""

from __future__ import annotations

import json
import time

import httpx

from engine.config import ENGINE_DEFAULTS
from tests.server.conftest import API_KEY, MODEL, scrape

NAMES = [
    "num_requests_running",
    "num_requests_waiting",
    "kv_cache_usage_perc",
    "num_preemptions_total",
    "engine_steps_total",
    "engine_retried_steps_total",
    "server_tasks",
    "max_batch_size",
    "prompt_tokens_total",
    "generation_tokens_total",
    "prefix_cache_queries_total",
    "prefix_cache_hits_total",
    *(
        f'request_success_total{{finished_reason="{r}"}}'
        for r in ("stop", "length", "error", "abort", "queue_timeout")
    ),
    *(
        f"{h}_{part}"
        for h in (
            "time_to_first_token_seconds",
            "inter_token_latency_seconds",
            "e2e_request_latency_seconds",
            "request_prompt_tokens",
            "request_generation_tokens",
            "request_queue_time_seconds",
            "batch_size",
        )
        for part in ("count", "sum")
    ),
]


def idle(server) -> dict[str, float]:
    """A scrape once nothing runs, so earlier tests' requests cannot move the counters under us."""
    deadline = time.monotonic() + 20
    while True:
        now = scrape(server)
        if now["num_requests_running"] == now["num_requests_waiting"] == 0 or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after[name] - before[name]


def success(reason: str) -> str:
    return f'request_success_total{{finished_reason="{reason}"}}'


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(
        f"{server.url}{path}", json={"model": MODEL} | body, headers=server.headers(), timeout=60
    )


def stream_usage(server, path: str, body: dict) -> dict:
    """Run a streamed request to the end; its `usage` (stream_options.include_usage)."""
    body = {"model": MODEL, "stream": True, "stream_options": {"include_usage": True}} | body
    usage = None
    with httpx.stream("POST", f"{server.url}{path}", json=body, headers=server.headers(), timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                usage = json.loads(line[6:]).get("usage") or usage
    assert usage is not None
    return usage


def test_metrics_expose_the_names_and_move_with_every_route(server):
    before = idle(server)
    missing = [n for n in NAMES if n not in before]
    assert not missing, missing
    assert 0 <= before["kv_cache_usage_perc"] <= 1
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0}
    usages = [post(server, "/v1/chat/completions", chat).json()["usage"] for _ in range(2)]
    usages.append(stream_usage(server, "/v1/chat/completions", chat))
    ids = post(server, "/tokenize", {"prompt": "Once upon a time"}).json()["tokens"]
    usages.append(stream_usage(server, "/v1/completions", {"prompt": ids, "max_tokens": 6, "temperature": 0}))
    usages.append(post(server, "/v1/completions", {"prompt": ids, "max_tokens": 3}).json()["usage"])
    after = idle(server)

    requests = len(usages)
    tokens = sum(u["completion_tokens"] for u in usages)
    assert delta(after, before, "generation_tokens_total") == tokens
    assert delta(after, before, "prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert delta(after, before, success("stop")) + delta(after, before, success("length")) == requests
    assert delta(after, before, success("error")) == delta(after, before, success("abort")) == 0
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_prompt_tokens"):
        assert delta(after, before, f"{histogram}_count") == requests, histogram
    # one token per engine output: every token after a request's first is one inter-token gap
    assert delta(after, before, "inter_token_latency_seconds_count") == tokens - requests
    assert delta(after, before, "request_generation_tokens_sum") == tokens
    assert delta(after, before, "engine_steps_total") >= tokens / requests
    ttft_le_inf = 'time_to_first_token_seconds_bucket{le="+Inf"}'
    assert delta(after, before, ttft_le_inf) == requests
    assert delta(after, before, "request_queue_time_seconds_count") == requests
    assert (
        0
        <= delta(after, before, "request_queue_time_seconds_sum")
        <= delta(after, before, "time_to_first_token_seconds_sum")
    )  # the wait before the first step is part of the time to the first token
    # one observation per step, of its sequences: every token came out of one sequence-step
    assert delta(after, before, "batch_size_count") == delta(after, before, "engine_steps_total")
    assert delta(after, before, "batch_size_sum") >= tokens
    assert after['batch_size_bucket{le="+Inf"}'] == after["batch_size_count"]


def test_a_disconnect_counts_as_abort_and_a_refused_request_not_at_all(server):
    before = idle(server)
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "stream": True}
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body, headers=server.headers(), timeout=60
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # leave after the first chunk
    too_long = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}
    assert post(server, "/v1/chat/completions", too_long).status_code == 400
    deadline = time.monotonic() + 20
    while (after := idle(server)) and delta(after, before, success("abort")) < 1:
        assert time.monotonic() < deadline, "the disconnect was never counted"
        time.sleep(0.05)
    assert delta(after, before, success("abort")) == 1
    for reason in ("stop", "length", "error"):
        assert delta(after, before, success(reason)) == 0
    assert delta(after, before, "e2e_request_latency_seconds_count") == 0  # finished requests only
    assert delta(after, before, "time_to_first_token_seconds_count") == 1
    assert delta(after, before, "request_prompt_tokens_count") == 1


def test_metrics_need_the_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.get(f"{server.url}/metrics", headers=headers, timeout=10)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_prefix_cache_hits_count_the_prompt_tokens_served_from_cached_blocks(server):
    import uuid

    block = ENGINE_DEFAULTS.block_size  # the test server's
    words = " ".join(f"word{i}" for i in range(60))
    # a fresh word first, so the leading block is no earlier request's
    body = {"messages": [{"role": "user", "content": f"{uuid.uuid4().hex} {words}"}], "max_tokens": 1}
    before = idle(server)
    first = post(server, "/v1/chat/completions", body).json()["usage"]["prompt_tokens"]
    middle = idle(server)
    post(server, "/v1/chat/completions", body)
    after = idle(server)
    assert first > 4 * block
    assert delta(middle, before, "prefix_cache_queries_total") == first
    assert delta(middle, before, "prefix_cache_hits_total") == 0
    assert delta(after, middle, "prefix_cache_queries_total") == first
    hits = delta(after, middle, "prefix_cache_hits_total")
    # every full block but the one holding the last prompt token, which is computed again
    assert hits == (first - 1) // block * block, (hits, first)


# The model-server protocol's table (Gateway API Inference Extension, proposal 003, and vLLM's
# production-stack router): name -> (type, lowest value, highest value or None).
ROUTER_SERIES = {
    "vllm:num_requests_waiting": ("gauge", 0, None),
    "vllm:num_requests_running": ("gauge", 0, None),
    "vllm:kv_cache_usage_perc": ("gauge", 0.0, 1.0),
    "vllm:gpu_cache_usage_perc": ("gauge", 0.0, 1.0),
    "vllm:cache_config_info": ("gauge", 1, 1),
}


def kv_blocks(server) -> int:
    """The KV pool's blocks, from the startup line that sizes it ("KV cache 0.05 GiB (N tokens)")."""
    import re

    (tokens,) = re.findall(r"KV cache [\d.]+ GiB \((\d+) tokens\)", server.log.read_text())
    return int(tokens) // ENGINE_DEFAULTS.block_size


def router_series(server) -> dict[str, float]:
    """Each `vllm:` series with its type and label checked against the table; name -> value."""
    text = httpx.get(f"{server.url}/metrics", headers=server.headers(), timeout=10).text
    types = dict(line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE vllm:"))
    values = {}
    for line in text.splitlines():
        if line.startswith("vllm:"):
            sample, _, value = line.rpartition(" ")
            name, _, labels = sample.partition("{")
            pairs = dict(pair.split("=", 1) for pair in labels.removesuffix("}").split(","))
            expected = {"model_name": f'"{MODEL}"'}
            if name == "vllm:cache_config_info":  # the configuration in labels, as vLLM
                expected |= {
                    "block_size": f'"{ENGINE_DEFAULTS.block_size}"',
                    "num_gpu_blocks": f'"{kv_blocks(server)}"',
                }
            assert pairs == expected, line
            values[name] = float(value)
    assert set(values) == set(ROUTER_SERIES) and types == {n: t for n, (t, _, _) in ROUTER_SERIES.items()}
    for name, (_, low, high) in ROUTER_SERIES.items():
        assert values[name] >= low and (high is None or values[name] <= high), (name, values[name])
        if high is None:  # counts of requests are whole numbers
            assert values[name] == int(values[name])
    return values


def test_the_series_routers_read_under_vllm_names_under_load_and_at_idle(server):
    import threading

    idle = router_series(server)
    assert idle["vllm:num_requests_running"] == idle["vllm:num_requests_waiting"] == 0
    assert httpx.get(f"{server.url}/get_load", headers=server.headers(), timeout=10).json() == {"load": 0}
    messages = [{"role": "user", "content": "Count to a hundred."}]
    body = {"model": MODEL, "max_tokens": 120, "min_tokens": 120, "ignore_eos": True, "messages": messages}
    threads = [
        threading.Thread(target=lambda: httpx.post(
            f"{server.url}/v1/chat/completions", headers=server.headers(), json=body, timeout=60))
        for _ in range(3)
    ]  # fmt: skip
    for thread in threads:
        thread.start()
    loaded, load, deadline = None, 0, time.monotonic() + 20
    while time.monotonic() < deadline:  # bounded: until the requests show
        loaded = router_series(server)
        load = httpx.get(f"{server.url}/get_load", headers=server.headers(), timeout=10).json()["load"]
        if loaded["vllm:num_requests_running"] > 0 and load > 0:
            break
        time.sleep(0.05)
    for thread in threads:
        thread.join(60)
    assert loaded is not None and loaded["vllm:num_requests_running"] > 0 and 0 < load <= 3
    assert (
        loaded["vllm:kv_cache_usage_perc"] > 0
        and loaded["vllm:gpu_cache_usage_perc"] == loaded["vllm:kv_cache_usage_perc"]
    )
    assert router_series(server)["vllm:num_requests_running"] == 0
