"""POST /tokenize and POST /detokenize (as vLLM offers them)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
