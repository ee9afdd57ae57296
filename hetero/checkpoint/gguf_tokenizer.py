"""Rebuild tokenizer.json and tokenizer_config.json from a GGUF's `tokenizer.*` metadata.

A GGUF carries the vocabulary, merges, token kinds and special ids as metadata, plus a `pre` name
for the pre-tokenizer regex that llama.cpp hard-codes. The runtime never imports transformers, so
the tokenizer is assembled here with the `tokenizers` library alone, mirroring llama.cpp and
transformers' own GGUF converter.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from hetero.errors import HeteroError

# llama.cpp token types (tokenizer.ggml.token_type)
UNKNOWN, CONTROL, USER_DEFINED = 2, 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` values whose split regex replaces GPT-2's (llama.cpp's llama-vocab.cpp).
_SPLIT_REGEX = {
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3", "pixtral"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}
# These split every digit on its own, then apply GPT-2's regex (SmolLM's tokenizer.json does the same).
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
# Llama 3's tokenizer looks a whole word up in the vocabulary before merging (HF: ignore_merges).
_IGNORE_MERGES = ("llama-bpe", "llama3", "llama-v3")


def build_tokenizer(meta: dict, path: Path) -> tuple[Tokenizer, dict]:
    """The tokenizer and the tokenizer_config.json contents that a GGUF's metadata describes.

    Args:
        meta: the GGUF metadata as plain Python values (key -> value).
        path: the GGUF file, for error messages.

    Returns:
        (tokenizer, tokenizer_config). Raises HeteroError for a tokenizer type it cannot build.
    """
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise HeteroError(f"{path} has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")  # transformers' defaults
    if kind == "gpt2":
        tokenizer = _byte_level(meta, tokens, types)
    elif kind == "llama":
        tokenizer = _sentencepiece(meta, tokens, types, path)
    else:
        supported = "'gpt2' (byte-level BPE) and 'llama' (SentencePiece)"
        raise HeteroError(f"{path} uses a '{kind}' tokenizer; GGUF import supports {supported}")
    _add_special_tokens(tokenizer, tokens, types, path)

    def token(key):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if token_id is not None and token_id < len(tokens) else None

    add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
    head = [token("bos_token_id")] if add_bos and token("bos_token_id") else []
    tail = [token("eos_token_id")] if add_eos and token("eos_token_id") else []
    if head or tail:  # what encode(add_special_tokens=True) adds, as in HF tokenizer.json files
        single = " ".join([f"{t}:0" for t in head] + ["$A:0"] + [f"{t}:0" for t in tail])
        pair = " ".join([single] + [f"{t}:1" for t in head] + ["$B:1"] + [f"{t}:1" for t in tail])
        ends = [(t, tokenizer.token_to_id(t)) for t in dict.fromkeys(head + tail)]
        tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=ends)

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
        "add_bos_token": bool(add_bos),
        "add_eos_token": bool(add_eos),
        "clean_up_tokenization_spaces": False,
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return tokenizer, config


def _byte_level(meta: dict, tokens: list[str], types: list[int]) -> Tokenizer:
    """GPT-2 style byte-level BPE (`tokenizer.ggml.model == "gpt2"`)."""
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    byte_to_char = _bytes_to_unicode()
    vocab = {}
    for i, (token, kind) in enumerate(zip(tokens, types)):
        # Some converters store a token in raw UTF-8 rather than the byte alphabet; respell it.
        # Special tokens keep their raw text: they are matched whole in the input, never merged.
        if kind not in (UNKNOWN, CONTROL, USER_DEFINED) and not set(token) <= alphabet:
            token = "".join(byte_to_char[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, i)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    pre = meta.get("tokenizer.ggml.pre", "default")
    tokenizer = Tokenizer(
        models.BPE(
            vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
            fuse_unk=False, byte_fallback=False, ignore_merges=pre in _IGNORE_MERGES,
        )
    )
    if pre in _SPLIT_REGEX:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_REGEX[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre in _DIGITS_THEN_GPT2:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    else:  # "gpt2", "default" and unknown names: GPT-2's own regex
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if pre in ("qwen2", "deepseek-r1-qwen"):
        tokenizer.normalizer = normalizers.NFC()  # as in Qwen2's own tokenizer.json
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _sentencepiece(meta: dict, tokens: list[str], types: list[int], path: Path) -> Tokenizer:
    """SentencePiece-style BPE with byte fallback (`tokenizer.ggml.model == "llama"`)."""
    vocab = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    elif "tokenizer.ggml.scores" in meta:
        merges = _merges_from_scores(vocab, dict(zip(tokens, meta["tokenizer.ggml.scores"])))
    else:
        raise HeteroError(f"{path} has a SentencePiece vocabulary with neither merges nor scores")
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else "<unk>"
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True, dropout=None))
    prefix_space = meta.get("tokenizer.ggml.add_space_prefix", True)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prefix_space else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a piece into two pieces.

    Ranked best score first, as SentencePiece merges greedily by the merged piece's score (the
    same ordering as transformers' `generate_merges`, so both tokenizers agree).
    """
    merges = []
    for piece, score in scores.items():
        local = [
            (piece[:k], piece[k:], score)
            for k in range(1, len(piece))
            if piece[:k] in vocab and piece[k:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _add_special_tokens(tokenizer: Tokenizer, tokens: list[str], types: list[int], path: Path) -> None:
    """Control/unknown tokens become special added tokens, user-defined ones plain added tokens,
    so that both are matched whole in the input instead of being cut into pieces."""
    special = [(i, t) for i, (t, k) in enumerate(zip(tokens, types)) if k in (UNKNOWN, CONTROL)]
    user = [(i, t) for i, (t, k) in enumerate(zip(tokens, types)) if k == USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for _, t in special])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for _, t in user])
    for i, token in special + user:
        if tokenizer.token_to_id(token) != i and tokens.index(token) == i:
            raise HeteroError(f"{path}: special token {token!r} did not keep its id {i} in the rebuilt tokenizer")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to the printable character that spells it in the vocabulary."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]  # whitespace and control bytes, shifted past 255
    return {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(moved)}
