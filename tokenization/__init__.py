"""Torch-free tokenization: chat messages -> prompt token ids (mistral-common or HF tokenizers + template)."""

from tokenization.errors import InvalidConversationError, TokenizerNotFoundError, UnsupportedFeatureError
from tokenization.guardrail import SAFE_PROMPT, with_safe_prompt
from tokenization.loader import TokenizerMode, load_prompt_encoder
from tokenization.messages import ChatMessage, parse_messages
from tokenization.prompt_encoder import PromptEncoder

__all__ = [
    "SAFE_PROMPT",
    "ChatMessage",
    "InvalidConversationError",
    "PromptEncoder",
    "TokenizerMode",
    "TokenizerNotFoundError",
    "UnsupportedFeatureError",
    "load_prompt_encoder",
    "parse_messages",
    "with_safe_prompt",
]
