"""The soak of bench/soak.py, for 30 s, against a real server on the tiny checkpoint: steady load
at 70% of its measured capacity, abandoned streams and bad requests, with the soak's own pass
rule: no unexpected error, resident memory at the end within 50 MB of the middle, the KV cache
back to 0 when idle."""

from __future__ import annotations

import asyncio

import pytest

from bench.soak import Soak
from tests.server.conftest import API_KEY, MODEL, start_server, stop_server


@pytest.fixture(scope="module")
def soak_server(hf_dir, tmp_path_factory):
    server = start_server(hf_dir, tmp_path_factory.mktemp("soak") / "server.log", "--max-num-seqs", "32")
    yield server
    stop_server(server)


def test_a_30_second_soak_passes(soak_server):
    report = asyncio.run(
        Soak(soak_server.url, MODEL, API_KEY, seed=1).run(duration=30, capacity_s=5, clients=8)
    )
    print("\n".join(report.lines()))
    assert report.tally.outcomes["ok"] and report.tally.outcomes["ok-stream"]  # the mix really ran
    assert report.tally.outcomes["abandoned"] and report.tally.outcomes["invalid-refused"]
    assert not report.tally.unexpected, report.tally.first_unexpected
    assert report.passed, report.lines()
    assert soak_server.process.poll() is None
