"""POST /v1/completions: OpenAI's legacy text completion (prompt as text or token ids, echo, logprobs).

Choice `i` of prompt `p` has index `p * n + i`; the prompts run concurrently. Generated text
continues the prompt: its ids seed the detokenizer, so SentencePiece's leading space survives
(" is" after "The sky", not "is"). `text_offset` counts characters of the choice's `text`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Annotated, NamedTuple

from fastapi import APIRouter, Depends, Request

from engine.outputs import Logprob
from engine.sampling_params import SamplingParams
from server.deps import serving_state
from server.errors import BadRequest
from server.generation import check_failed, collect, finish_reason, wait_watching
from server.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, now
from server.routes.chat import usage
from server.routes.tokenize import check_token_ids
from server.sampling import completion_sampling_params
from server.sse import event_stream, sse_json
from server.state import AppState, ServedModel

logger = logging.getLogger(__name__)
router = APIRouter()
MAX_PROMPTS = 16
MAX_CHOICES = 64  # prompts x n: the fan-out of one request (RELIABILITY.md item 9)


@dataclass(frozen=True)
class Prompt:
    text: str  # what `echo` prepends: the prompt as sent, or its ids decoded
    ids: list[int]
    params: SamplingParams


def _encode(req: CompletionRequest, model: ServedModel) -> list[tuple[str, list[int]]]:
    raw = req.prompt
    items = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
    if not 0 < len(items) <= MAX_PROMPTS or [] in items:
        raise BadRequest(f"prompt: give 1 to {MAX_PROMPTS} prompts, none an empty id list", param="prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            out.append((item, model.encoder.encode_text(item, bos=True)))
        else:
            check_token_ids(item, model, param="prompt")
            out.append((model.encoder.decode(list(item)), list(item)))
    return out


async def prompts_of(req: CompletionRequest, model: ServedModel) -> list[Prompt]:
    """Every prompt encoded and checked, before any model work."""
    prompts = []
    for text, ids in await asyncio.to_thread(_encode, req, model):
        params = completion_sampling_params(req, len(ids), model)
        if (total := len(ids) + params.max_tokens) > model.max_model_len:
            raise BadRequest(
                f"This model's maximum context length is {model.max_model_len} tokens. However, you "
                f"requested {total} tokens ({len(ids)} in the prompt, {params.max_tokens} to generate).",
                param="prompt",
                code="context_length_exceeded",
            )
        prompts.append(Prompt(text, ids, params))
    if len(prompts) * req.n > MAX_CHOICES:
        raise BadRequest(f"prompts x n: at most {MAX_CHOICES} choices per request", param="n")
    return prompts


class Tok(NamedTuple):
    token: str
    nbytes: int  # UTF-8 bytes it adds to the text
    logprob: float | None = None
    top: dict[str, float] | None = None


def tok(e: Logprob) -> Tok:
    return Tok(e.token, len(e.bytes), e.logprob, {t.token: t.logprob for t in e.top})


def null_tok(token_id: int, model: ServedModel) -> Tok:
    raw = model.encoder.token_bytes(token_id)
    return Tok(raw.decode("utf-8", "replace"), len(raw) if model.encoder.decode([token_id]) else 0)  # <s>: 0


def prompt_toks(p: Prompt, entries: Sequence[Logprob | None] | None, model: ServedModel) -> list[Tok]:
    """The prompt's tokens: the first (and any the engine left out) with a null logprob."""
    entries = list(entries or [None])
    if len(entries) < len(p.ids):  # prefix-cached tokens got no logprobs: keep the rest aligned
        entries = [None] * (len(p.ids) - len(entries) + 1) + entries[1:]
    return [tok(e) if e else null_tok(i, model) for i, e in zip(p.ids, entries, strict=False)]


def add_logprobs(block: CompletionLogprobs, tokens: list[Tok], text: str, base: int) -> None:
    """Append `tokens`, which spell `text`, found at character `base` of the choice's text.

    Offsets map the tokens' bytes onto `text`: a leading space the text lacks (SentencePiece's
    marker on its first word) is skipped; offsets past the end (EOS, a stop string) are clamped.
    """
    char_at = [i for i, ch in enumerate(text) for _ in ch.encode()] + [len(text)]
    lead = next((t for t in tokens if t.nbytes), None)
    pos = -1 if lead and lead.token.startswith(" ") and not text.startswith(" ") else 0
    for t in tokens:
        block.tokens.append(t.token)
        block.token_logprobs.append(t.logprob)
        block.top_logprobs.append(t.top)
        block.text_offset.append(base + char_at[min(max(pos, 0), len(char_at) - 1)])
        pos += t.nbytes


def choice_logprobs(
    req: CompletionRequest,
    p: Prompt,
    model: ServedModel,
    head: str,
    prompt_lps,
    out_lps,
    text: str,
    base: int,
) -> CompletionLogprobs | None:
    """Logprobs of `head` (the echoed prompt, or "") then of the generated `text`, from character `base`."""
    if req.logprobs is None:
        return None
    block = CompletionLogprobs()
    if head:
        add_logprobs(block, prompt_toks(p, prompt_lps, model), head, base)
    add_logprobs(block, [tok(e) for e in out_lps], text, base + len(head))
    return block


@router.post("/v1/completions", response_model=None)
async def completions(
    req: CompletionRequest, request: Request, state: Annotated[AppState, Depends(serving_state)]
):
    if unknown := req.unknown_fields():
        logger.info("ignored unknown fields: %s", ", ".join(unknown[:20]))
    model = state.resolve(req.model)
    prompts = await prompts_of(req, model)
    rid = f"cmpl-{uuid.uuid4().hex}"
    if req.stream:
        stream = CompletionStream(state, req, model, rid, prompts)
        await stream.start(request)  # errors before the first token are plain HTTP errors
        return event_stream(stream.events())
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(collect(request, state.engine, p.ids, p.params, f"{rid}-{k}", p.ids))
                for k, p in enumerate(prompts)
            ]
    except BaseExceptionGroup as failed:  # the first failure cancelled the other prompts
        raise failed.exceptions[0] from None
    choices = []
    for k, (p, task) in enumerate(zip(prompts, tasks, strict=True)):
        for i, c in enumerate(task.result().choices):
            head = p.text if req.echo else ""
            lp = choice_logprobs(req, p, model, head, c.prompt_logprobs, c.logprobs, c.text, 0)
            reason = c.finish_reason
            choices.append(
                CompletionChoice(index=k * req.n + i, text=head + c.text, finish_reason=reason, logprobs=lp)
            )
    completion_tokens = sum(t.result().completion_tokens for t in tasks)
    body = usage(sum(len(p.ids) for p in prompts), completion_tokens)
    return CompletionResponse(id=rid, created=now(), model=req.model, choices=choices, usage=body)


class CompletionStream:
    """SSE `text_completion` chunks of every prompt's choices, interleaved, then `[DONE]`."""

    def __init__(
        self, state: AppState, req: CompletionRequest, model: ServedModel, rid: str, prompts: list[Prompt]
    ) -> None:
        self.req, self.model, self.rid, self.prompts = req, model, rid, prompts
        self.created = now()
        self._gens = [
            state.engine.generate(p.ids, p.params, f"{rid}-{k}", p.ids) for k, p in enumerate(prompts)
        ]
        self._next: dict[asyncio.Future, int] = {}  # each prompt's pending output -> the prompt

    async def start(self, request: Request) -> None:
        """Wait for every prompt's first output, so a request the engine refuses gets a status code
        (and one whose client leaves while queued is aborted, as in chat)."""
        self._next = {asyncio.ensure_future(anext(g, None)): k for k, g in enumerate(self._gens)}
        try:
            await wait_watching(request, self._next)  # raises what the engine raised
            for future in self._next:
                check_failed(future.result())
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Abort whatever still runs (leaving `generate` aborts its request)."""
        for future in self._next:
            future.cancel()
        await asyncio.gather(*self._next, return_exceptions=True)
        for gen in self._gens:
            await gen.aclose()

    def _chunk(self, choices: list[CompletionChoice], body=None) -> str:
        chunk = CompletionResponse(
            id=self.rid, created=self.created, model=self.req.model, choices=choices, usage=body
        )
        return sse_json(chunk)

    async def events(self) -> AsyncIterator[str]:
        req, n = self.req, self.req.n
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        sent = [-1] * (len(self.prompts) * n)  # characters sent per choice; -1: nothing yet
        unfinished = set(range(len(sent)))
        prompt_tokens, completion_tokens = sum(len(p.ids) for p in self.prompts), 0
        try:
            while self._next:
                done, _ = await asyncio.wait(self._next, return_when=asyncio.FIRST_COMPLETED)
                for future in sorted(done, key=self._next.__getitem__):
                    k = self._next.pop(future)
                    if (out := future.result()) is None:
                        continue  # that prompt's choices are all done
                    self._next[asyncio.ensure_future(anext(self._gens[k], None))] = k
                    completion_tokens += len(out.new_token_ids)
                    p, index = self.prompts[k], k * n + out.index
                    unfinished -= {index} if out.finished else set()
                    head, base = (p.text if req.echo and sent[index] < 0 else ""), max(sent[index], 0)
                    lps = out.prompt_logprobs, out.logprobs
                    lp = choice_logprobs(req, p, self.model, head, *lps, out.new_text, base)
                    sent[index] = base + len(head) + len(out.new_text)
                    reason = (
                        ("error" if out.error else finish_reason(out.finish_reason)) if out.finished else None
                    )
                    if head or out.new_text or reason or (lp and lp.tokens):
                        # Mistral style by default: usage rides on the last choice's final chunk.
                        last = not unfinished and not include_usage
                        text = head + out.new_text
                        choice = CompletionChoice(index=index, text=text, finish_reason=reason, logprobs=lp)
                        yield self._chunk([choice], usage(prompt_tokens, completion_tokens) if last else None)
        except Exception as exc:  # after the first byte: report in-band, the stream stays parseable
            logger.warning("stream %s failed: %s", self.rid, type(exc).__name__)
            for index in sorted(unfinished):
                yield self._chunk([CompletionChoice(index=index, text="", finish_reason="error")])
        finally:
            await self.close()
        if include_usage:
            yield self._chunk([], usage(prompt_tokens, completion_tokens))
        yield "[DONE]"
