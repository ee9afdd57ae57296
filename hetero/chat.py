"""The chat REPL: multi-turn history through the model's chat template, streamed answers, slash commands.

`ChatSession` is the testable core; `repl()` wires it to a terminal (Ctrl-C stops the current
answer and keeps the session, Ctrl-D or /exit leaves).
"""

import sys
from typing import Callable, Iterator

from .errors import HeteroError
from .generate import SamplingParams, stream_generate

HELP = """commands:
  /help    this help
  /clear   forget the conversation
  /stats   speed, bytes moved per token and memory per tier
  /exit    leave (Ctrl-D works too; Ctrl-C stops an answer)"""


class ChatSession:
    """A conversation with one model.

    Args:
        model: an OffloadedModel.
        params: sampling parameters for every answer.
        system: an optional system prompt.
    """

    def __init__(self, model, params: SamplingParams, system: str | None = None):
        if model.tokenizer is None:
            raise HeteroError(f"{model.path}: no tokenizer.json, so hetero cannot chat with this model")
        self.model, self.params, self.system = model, params, system
        self.messages: list[dict] = []
        self.last_stats: dict = {}
        self.dropped_turns = 0

    def clear(self):
        self.messages = []

    def _prompt_ids(self) -> list[int]:
        """The conversation as tokens, dropping the oldest turns if it would overflow the KV cache."""
        budget = self.model.context_tokens - self.params.max_new_tokens
        system = [{"role": "system", "content": self.system}] if self.system else []
        alone = len(self.model.encode_prompt(system + self.messages[-1:]))
        if alone > budget:
            raise HeteroError(
                f"this message is {alone} tokens; with {self.params.max_new_tokens} tokens for the answer it "
                f"does not fit the {self.model.context_tokens}-token context; send something shorter"
            )
        while True:
            ids = self.model.encode_prompt(system + self.messages)
            if len(ids) <= budget:
                return ids
            self.messages = self.messages[2:]  # the oldest user/assistant pair
            self.dropped_turns += 1

    def send(self, text: str) -> Iterator[str]:
        """Add a user message and stream the assistant's answer; the answer joins the history as it
        arrives, so an interrupted answer is kept as far as it got."""
        self.messages.append({"role": "user", "content": text})
        answer = {"role": "assistant", "content": ""}
        try:
            ids = self._prompt_ids()
        except HeteroError:
            self.messages.pop()
            raise
        self.messages.append(answer)
        self.last_stats = {}
        for piece in stream_generate(self.model.executor, self.model.tokenizer, ids, self.params, stats=self.last_stats):
            if piece.text:
                answer["content"] += piece.text
                yield piece.text

    def command(self, line: str) -> tuple[str, bool]:
        """Run a /command; returns (text to show, whether to leave)."""
        cmd = line.strip().split()[0].lower()
        if cmd in ("/exit", "/quit", "/bye"):
            return "", True
        if cmd == "/help":
            return HELP, False
        if cmd == "/clear":
            self.clear()
            return "conversation cleared", False
        if cmd == "/stats":
            return format_stats(self.model.stats()), False
        return f"unknown command {cmd}; /help lists them", False


def format_stats(s: dict) -> str:
    from .sizes import format_size

    def rate(x):
        return "-" if x is None else f"{x:.2f}"

    lines = [
        f"prefill: {s['prefill_tokens']} tokens, {rate(s['prefill_tokens_per_s'])} tokens/s",
        f"decode:  {s['decode_tokens']} tokens, {rate(s['decode_tokens_per_s'])} tokens/s",
        f"read per decoded token: disk {format_size(s['decode_disk_read_bytes_per_token'] or 0)}, "
        f"host->gpu {format_size(s['decode_host_to_device_bytes_per_token'] or 0)}",
        "resident weights: " + ", ".join(f"{t} {format_size(n)}" for t, n in s["resident_bytes"].items()),
        "memory held (peak / budget): " + ", ".join(
            f"{t} {format_size(m['peak_bytes'])} / {format_size(m['budget_bytes'])}"
            for t, m in s["memory"].items() if m["peak_bytes"] or m["budget_bytes"]
        ),
    ]
    return "\n".join(lines)


def repl(session: ChatSession, read: Callable[[str], str] = input, write=sys.stdout.write, flush=sys.stdout.flush):
    """Read-eval-print loop on a terminal."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    write("hetero chat — /help for commands, Ctrl-D to leave\n")
    while True:
        try:
            line = read(">>> ")
        except EOFError:
            write("\n")
            return
        except KeyboardInterrupt:
            write("\n(Ctrl-D or /exit to leave)\n")
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            text, leave = session.command(line)
            if text:
                write(text + "\n")
            if leave:
                return
            continue
        try:
            for piece in session.send(line):
                write(piece)
                flush()
            write("\n")
        except KeyboardInterrupt:
            write("\n(stopped)\n")
        except HeteroError as e:
            write(f"error: {e}\n")
        flush()
