"""GET /metrics: Prometheus metrics with vLLM-like names."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
