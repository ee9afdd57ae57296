"""The runtime's tokenizer: a `tokenizers` model plus the chat template, read from a model folder.

It matches transformers' fast tokenizer and `apply_chat_template` without importing transformers,
which is too slow to import and too heavy a dependency for a runtime.
"""

import json
from datetime import datetime
from pathlib import Path

from jinja2 import TemplateError, ext, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as _Backend

from hetero.errors import HeteroError

# The named special tokens transformers knows; their strings are chat template variables.
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HeteroError(f"cannot read {path}: {e}") from e


def _token_str(value) -> str | None:
    # tokenizer_config.json stores a token either as its string or as a serialized AddedToken
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) else None


def _ids(value) -> list[int]:
    # generation_config.json and config.json give eos_token_id as one int or a list
    return [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int)]


class _GenerationTag(ext.Extension):
    """`{% generation %}` marks assistant text for training masks; for inference it renders its body."""

    tags = {"generation"}

    def parse(self, parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str):
    raise HeteroError(f"chat template: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters and non-ASCII text, which would change the prompt
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile_template(source: str):
    # The same environment as transformers, so that Hub templates render byte for byte alike;
    # sandboxed because a template is untrusted code shipped with the model.
    extensions = [_GenerationTag, ext.loopcontrols]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=extensions)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise HeteroError(f"the model's chat template does not compile: {e}") from e


def _read_templates(model_dir: Path, tok_cfg: dict) -> dict[str, str]:
    # A separate chat_template.jinja takes priority over tokenizer_config.json, as in transformers
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return {"default": jinja_file.read_text(encoding="utf-8")}
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return {k: v for k, v in named.items() if isinstance(k, str) and isinstance(v, str)}
    return {"default": template} if isinstance(template, str) else {}


class Tokenizer:
    """Encode, decode and chat-template rendering for one model. Build it with `from_dir`."""

    def __init__(self, backend: _Backend, tok_cfg: dict, templates: dict[str, str], eos_ids: set[int]):
        self._tok = backend
        self.special_tokens = {n: s for n in _SPECIAL_NAMES if (s := _token_str(tok_cfg.get(n))) is not None}
        self.bos_token_id, self.pad_token_id = self._special_id("bos_token"), self._special_id("pad_token")
        self._eos_ids = eos_ids | ({eos} if (eos := self._special_id("eos_token")) is not None else set())
        # "default", else the first named one; transformers picks "tool_use" when tools are passed
        self.chat_template = templates.get("default") or next(iter(templates.values()), None)
        self._templates = {name: _compile_template(src) for name, src in templates.items()}
        self._template = self._templates.get("default") or next(iter(self._templates.values()), None)
        # sentencepiece byte-fallback tokens <0x00>..<0xFF>: their decoding depends on the whole run
        self._byte_ids = {i for b in range(256) if (i := backend.token_to_id(f"<0x{b:02X}>")) is not None}
        self._special_ids = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}

    @classmethod
    def from_dir(cls, model_dir: Path) -> "Tokenizer":
        """Load the tokenizer of a model folder in the Hugging Face layout.

        Args:
            model_dir: folder holding tokenizer.json, and optionally tokenizer_config.json,
                special_tokens_map.json, chat_template.jinja, generation_config.json, config.json.

        Returns:
            The tokenizer. Raises HeteroError when tokenizer.json is missing or a file is unreadable.
        """
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise HeteroError(f"tokenizer.json is missing in {model_dir}; hetero needs the fast-tokenizer file")
        try:
            backend = _Backend.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception on a malformed file
            raise HeteroError(f"cannot load {path}: {e}") from e
        tok_cfg = _read_json(model_dir / "special_tokens_map.json") | _read_json(model_dir / "tokenizer_config.json")
        _register_special_tokens(backend, tok_cfg)
        _apply_bos_eos(backend, tok_cfg)
        config = _read_json(model_dir / "config.json")
        configs = (_read_json(model_dir / "generation_config.json"), config, config.get("text_config") or {})
        eos_ids = {i for cfg in configs for i in _ids(cfg.get("eos_token_id"))}
        return cls(backend, tok_cfg, _read_templates(model_dir, tok_cfg), eos_ids)

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self._tok.token_to_id(token)

    @property
    def eos_token_ids(self) -> set[int]:
        """Every id that ends generation: generation_config, config and tokenizer_config together."""
        return set(self._eos_ids)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (transformers' `len(tokenizer)`)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`.

        Args:
            text: the text; special token strings in it (e.g. "<|im_start|>") become their ids.
            add_special_tokens: add what the model's post-processor adds (usually BOS).

        Returns:
            The ids.
        """
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (any iterable of ints); special tokens are dropped unless asked for."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False, **kwargs
    ) -> str | list[int]:
        """Render a conversation into the model's prompt format, as transformers does.

        Args:
            messages: dicts with "role" and "content" (or "tool_calls"); keys set to None are dropped.
            add_generation_prompt: end with the header that opens the assistant's turn.
            tokenize: return ids (encoded without adding BOS again) instead of text.
            **kwargs: extra template variables, e.g. tools=[...], enable_thinking=False.

        Returns:
            The prompt text, or its ids when tokenize is true.
        """
        if not messages:
            raise HeteroError("the conversation is empty: give at least one message")
        messages = [_check_message(i, m) for i, m in enumerate(messages)]
        if self._template is None:
            text = "".join(f"{m['role']}: {m.get('content', '')}\n" for m in messages)
            text += "assistant: " if add_generation_prompt else ""
        else:
            # transformers always defines tools and documents, so templates test them with `is not none`
            context = {"tools": None, "documents": None, **self.special_tokens, **kwargs}
            tool_use = self._templates.get("tool_use") if context["tools"] is not None else None
            try:
                text = (tool_use or self._template).render(
                    messages=messages, add_generation_prompt=add_generation_prompt, **context
                )
            except (TemplateError, TypeError) as e:  # TypeError: e.g. a list content where text was expected
                raise HeteroError(f"the model's chat template failed on these messages: {e}") from e
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        """A fresh incremental detokenizer for one generated sequence."""
        return StreamDecoder(self, skip_special_tokens)


def _check_message(index: int, message) -> dict:
    if not isinstance(message, dict):
        raise HeteroError(f"message {index} must be a dict with 'role' and 'content', got {type(message).__name__}")
    message = {k: v for k, v in message.items() if v is not None}
    if "role" not in message or ("content" not in message and "tool_calls" not in message):
        raise HeteroError(f"message {index} needs both 'role' and 'content', got keys {sorted(message)}")
    return message


def _register_special_tokens(backend: _Backend, tok_cfg: dict) -> None:
    # transformers makes the named special tokens "special" (one id, skipped by decode) even when
    # tokenizer.json lists them as plain vocabulary; tokens already added keep their own flags.
    extra = tok_cfg.get("additional_special_tokens") or tok_cfg.get("extra_special_tokens") or []
    extra = list(extra.values()) if isinstance(extra, dict) else extra  # transformers 5 may name them
    names = [_token_str(tok_cfg.get(n)) for n in _SPECIAL_NAMES] + [_token_str(t) for t in extra]
    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    missing = [AddedToken(s, special=True, normalized=False) for s in dict.fromkeys(names) if s and s not in added]
    if missing:
        backend.add_special_tokens(missing)


def _apply_bos_eos(backend: _Backend, tok_cfg: dict) -> None:
    # An explicit add_bos_token / add_eos_token in tokenizer_config.json decides what encode adds, as
    # transformers 4's Llama/Gemma tokenizers did. Without them tokenizer.json's post-processor
    # decides (transformers 5 always does this). A missing post-processor means nothing is added.
    if "add_bos_token" not in tok_cfg and "add_eos_token" not in tok_cfg:
        return

    def wanted(name: str, flag: str) -> list[str]:
        token = _token_str(tok_cfg.get(name))
        return [token] if tok_cfg.get(flag) and token and backend.token_to_id(token) is not None else []

    head, tail = wanted("bos_token", "add_bos_token"), wanted("eos_token", "add_eos_token")
    single = " ".join([f"{t}:0" for t in head] + ["$A:0"] + [f"{t}:0" for t in tail])
    pair = " ".join([single] + [f"{t}:1" for t in head] + ["$B:1"] + [f"{t}:1" for t in tail])
    ends = [(t, backend.token_to_id(t)) for t in dict.fromkeys(head + tail)]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=ends)


class StreamDecoder:
    """Turns generated ids into text one id at a time; the pieces join to exactly `decode(ids)`.

    Each push decodes a short window twice, with and without the newest ids, and emits the
    difference. Decoding a window rather than a lone token keeps sentencepiece's leading spaces
    (a lone "▁word" decodes as "word") and the bytes of a character split over several tokens.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        # A run of byte-fallback tokens that is not valid UTF-8 decodes to one U+FFFD per byte, valid
        # characters included, so a run is decoded only once a token that ends it arrives; a skipped
        # special token does not end it, as decode drops it before the decoder sees the run.
        self._hold = tokenizer._byte_ids | (tokenizer._special_ids if skip_special_tokens else set())
        self._ids: list[int] = []
        self._prefix = 0  # window start: the last emitted chunk, kept as context
        self._read = 0  # ids before this are emitted

    def _text(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one generated id.

        Args:
            token_id: the id.

        Returns:
            The text it completes; "" while a character or a byte-fallback run is incomplete.
        """
        self._ids.append(int(token_id))
        if self._ids[-1] in self._hold:
            return ""
        prefix_text = self._text(self._prefix, self._read)
        new_text = self._text(self._prefix, len(self._ids))
        # U+FFFD at the end means the window stops inside a character: wait for its other bytes
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Text still held back at the end of the sequence, replacement characters included."""
        prefix_text = self._text(self._prefix, self._read)
        new_text = self._text(self._prefix, len(self._ids))
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text) :]


class StopChecker:
    """Cuts generated text at the first stop string, which may arrive split over several pieces."""

    def __init__(self, stop: list[str]):
        self._stop = [s for s in stop if s]
        self._longest = max((len(s) for s in self._stop), default=0)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        """Add the next piece of generated text.

        Args:
            text: the piece.

        Returns:
            (text safe to show now, whether a stop string was reached). The stop string and anything
            after it are never returned; once stopped every later call returns ("", True).
        """
        if self.stopped:
            return "", True
        buf = self._held + text
        hits = [i for s in self._stop if (i := buf.find(s)) >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return buf[: min(hits)], True
        # hold back the longest tail that a stop string could still begin with
        tails = range(min(len(buf), self._longest - 1), 0, -1)
        keep = next((k for k in tails if any(s.startswith(buf[-k:]) for s in self._stop)), 0)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """The held-back tail at the end of generation (it turned out not to be a stop string)."""
        held, self._held = self._held, ""
        return held
