"""POST /v1/completions: OpenAI's legacy text completion."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
