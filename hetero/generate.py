"""Prefill, decode and sampling — shared by the CLI, the Python API, the chat REPL and the server.

Shape legend: B batch, T prompt tokens, V vocabulary, N new tokens.
"""

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .errors import HeteroError


@dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 (or do_sample False) is greedy decoding."""

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple = ()
    eos_token_ids: frozenset = field(default_factory=frozenset)

    def __post_init__(self):
        checks = [
            (self.max_new_tokens >= 0, "max_new_tokens must be >= 0"),
            (self.min_new_tokens >= 0, "min_new_tokens must be >= 0"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise HeteroError(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def process_logits(logits: torch.Tensor, history: torch.Tensor, params: SamplingParams, n_new: int) -> torch.Tensor:
    """Apply penalties and truncation to next-token logits, in transformers' order.

    Args:
        logits: [B, V] float32 next-token logits.
        history: [B, S] every token so far (prompt and generated), for the repetition penalty.
        n_new: tokens generated so far, for min_new_tokens.
    Returns:
        [B, V] logits with -inf where a token may not be picked.
    """
    logits = logits.clone()
    if params.repetition_penalty != 1.0:
        seen = torch.gather(logits, 1, history)
        seen = torch.where(seen < 0, seen * params.repetition_penalty, seen / params.repetition_penalty)
        logits.scatter_(1, history, seen)
    if n_new < params.min_new_tokens and params.eos_token_ids:
        logits[:, list(params.eos_token_ids)] = float("-inf")
    if params.greedy:
        return logits
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1 - params.top_p)
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] processed logits -> [B] token ids."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    g = torch.Generator()
    if params.seed is not None:
        g.manual_seed(params.seed)
    else:
        g.seed()
    return g


def prefill(executor, cache, input_ids: torch.Tensor) -> torch.Tensor:
    """Run the prompt [B, T]; returns next-token logits [B, V] in float32 on the CPU."""
    if input_ids.shape[1] == 0:
        raise HeteroError("the prompt is empty: give at least one token")
    return executor.forward(input_ids, cache, last_only=True)[:, -1].float().cpu()


def decode_step(executor, cache, next_ids: torch.Tensor) -> torch.Tensor:
    """Run one new token per sequence ([B]); returns next-token logits [B, V] (float32, CPU)."""
    return executor.forward(next_ids[:, None], cache, last_only=True)[:, -1].float().cpu()


def generate_ids(executor, input_ids: torch.Tensor, params: SamplingParams, pad_token_id: int | None = None) -> torch.Tensor:
    """Generate like transformers' `generate`: [B, T] -> [B, T + N].

    Sequences that finish early (EOS) are padded with `pad_token_id` (or their EOS) until all finish.
    """
    cache = executor.new_cache()
    gen = _generator(params)
    try:
        history = input_ids.cpu()
        if params.max_new_tokens == 0:
            return history
        logits = prefill(executor, cache, input_ids)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        pad = pad_token_id if pad_token_id is not None else min(params.eos_token_ids, default=0)
        eos = torch.tensor(sorted(params.eos_token_ids), dtype=torch.long)
        for n in range(params.max_new_tokens):
            nxt = pick(process_logits(logits, history, params, n), params, gen)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            history = torch.cat([history, nxt[:, None]], dim=1)
            done |= torch.isin(nxt, eos)
            if done.all() or n + 1 == params.max_new_tokens:
                break
            logits = decode_step(executor, cache, nxt)
        return history
    finally:
        cache.free()


@dataclass
class Piece:
    """One streamed piece of an answer; the last one has finish_reason set ("stop" or "length")."""

    text: str
    token_id: int | None = None
    finish_reason: str | None = None


def stream_generate(executor, tokenizer, prompt_ids: list[int], params: SamplingParams, cache=None,
                    stats: dict | None = None) -> Iterator[Piece]:
    """Stream the answer to one prompt as text pieces, stopping on EOS, a stop string or the length limit.

    Args:
        executor: runtime executor.
        tokenizer: hetero.tokenizer.Tokenizer (for incremental decoding).
        prompt_ids: the prompt's token ids.
        cache: a KV cache to use (a fresh one is made and freed otherwise).
        stats: if given, filled with prompt/generated token counts and timings.
    """
    from .tokenizer import StopChecker

    own_cache = cache is None
    cache = cache or executor.new_cache()
    gen = _generator(params)
    decoder, stopper = tokenizer.stream_decoder(), StopChecker(list(params.stop))
    eos = params.eos_token_ids or frozenset(tokenizer.eos_token_ids)
    history = torch.tensor([prompt_ids], dtype=torch.long)
    t0 = time.perf_counter()
    finish, n = "length", 0
    try:
        logits = prefill(executor, cache, history)
        t_first = time.perf_counter()
        for n in range(1, params.max_new_tokens + 1):
            tok = int(pick(process_logits(logits, history, params, n - 1), params, gen)[0])
            history = torch.cat([history, torch.tensor([[tok]])], dim=1)
            if tok in eos:
                finish = "stop"
                break
            text, hit = stopper.feed(decoder.push(tok))
            if text:
                yield Piece(text, tok)
            if hit:
                finish = "stop"
                break
            if n < params.max_new_tokens:
                logits = decode_step(executor, cache, torch.tensor([tok]))
        if finish == "length":
            text, _ = stopper.feed(decoder.flush())
            text += stopper.flush()
            if text:
                yield Piece(text)
        yield Piece("", finish_reason=finish)
    finally:
        if stats is not None:
            end = time.perf_counter()
            stats.update(
                prompt_tokens=len(prompt_ids), generated_tokens=n,
                prefill_s=(t_first - t0) if "t_first" in locals() else end - t0,
                decode_s=(end - t_first) if "t_first" in locals() else 0.0,
            )
        if own_cache:
            cache.free()
