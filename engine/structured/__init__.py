"""Structured output: a grammar per request (a JSON schema, or any JSON object) that masks the
tokens the sampler may choose, so every reply that stops is an instance of it.

- `spec`: what a request asks for (`StructuredOutput`), checked and bounded;
- `backend`: the small interface a grammar engine meets (compile, match, mask);
- `llguidance_backend`: that interface over llguidance, with our own view of the vocabulary;
- `compiler`: grammars compiled off the engine thread, into a bounded cache keyed by the spec;
- `masks`: one step's bitmask rows for the sequences that sample under a grammar.
"""

from engine.structured.backend import CompiledGrammar, GrammarBackend, GrammarMatcher
from engine.structured.compiler import GrammarCompiler
from engine.structured.masks import GrammarBitmask
from engine.structured.spec import InvalidStructuredOutput, StructuredOutput

__all__ = [
    "CompiledGrammar",
    "GrammarBackend",
    "GrammarBitmask",
    "GrammarCompiler",
    "GrammarMatcher",
    "InvalidStructuredOutput",
    "StructuredOutput",
]
