"""hetero.tokenizer against transformers' fast tokenizer, on tokenizers trained here (no hub)."""

import json
import random
import subprocess
import sys

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from hetero.errors import HeteroError
from hetero.tokenizer import StopChecker, Tokenizer

transformers = pytest.importorskip("transformers")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.",
    "Offloading lets a large language model run on a small GPU by streaming weights from memory and disk.",
    "Il était une fois un café où l'on parlait français: naïve façade, résumé, crème brûlée, déjà vu.",
    "Hello world! How are you today? I'm fine, thanks. What is the capital of France? It is Paris.",
    "def main():\n    print('hello')\n    return 0\n",
]

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama-3 style: bos_token in the text, strftime_now, tools through tojson, trim, raise_exception,
# a {% generation %} block and a loop control, i.e. every extra transformers gives templates.
LLAMA3_TEMPLATE = r"""{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none %}
    {%- for t in tools %}
        {{- t | tojson(indent=4) + "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message + "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.role not in ['user', 'assistant'] %}
        {{- raise_exception('Only user and assistant roles are supported') }}
    {%- endif %}
    {%- if message.content == 'SKIP' %}{% continue %}{% endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
    {%- if message.role == 'assistant' %}
        {% generation %}{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}
    {%- else %}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# Mistral's v1 template: bos/eos in the text and raise_exception on roles that do not alternate.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

TRICKY = "naïve café, 日本語のテキスト, 中文, emoji 😀🎉👩‍👩‍👧 and ü ß é — done.\n  indented"

CONVERSATION = [
    {"role": "user", "content": "Hello! What is the capital of France?"},
    {"role": "assistant", "content": "  It is Paris. Déjà vu? 😀  "},
    {"role": "user", "content": "And of 日本?"},
]


def _write(d, name, obj):
    (d / name).write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


def _byte_level(specials: list[str]) -> Backend:
    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _sentencepiece(post_processor: bool) -> Backend:
    """Llama-2 style: Metaspace words, BPE with byte fallback tokens <0x00>..<0xFF> at ids 3..258."""
    tok = Backend(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=350, special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(tok.to_str())
    learned = sorted((i, t) for t, i in spec["model"]["vocab"].items() if i >= 3)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    vocab |= {t: 259 + n for n, (_, t) in enumerate(learned)}
    spec["model"]["vocab"] = vocab
    tok = Backend.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    if post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    return tok


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    out = {}

    d = out["chatml"] = root / "chatml"
    d.mkdir()
    _byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]).save(str(d / "tokenizer.json"))
    _write(d, "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": SMOLLM2_TEMPLATE,
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    })
    _write(d, "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})

    d = out["llama3"] = root / "llama3"
    d.mkdir()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = _byte_level(specials)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", 0)],
    )
    tok.save(str(d / "tokenizer.json"))
    _write(d, "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>", "chat_template": [
            {"name": "default", "template": LLAMA3_TEMPLATE}, {"name": "rag", "template": "unused"}],
    })
    _write(d, "generation_config.json", {"eos_token_id": [1]})
    _write(d, "config.json", {"model_type": "llama", "eos_token_id": 3, "bos_token_id": 0})

    d = out["sp"] = root / "sp"
    d.mkdir()
    _sentencepiece(post_processor=True).save(str(d / "tokenizer.json"))
    _write(d, "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": MISTRAL_TEMPLATE,
    })
    return out


def _pair(d):
    return Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(str(d))


@pytest.mark.parametrize("name", ["chatml", "llama3", "sp"])
def test_encode_decode_match_transformers(dirs, name):
    ours, ref = _pair(dirs[name])
    for text in [TRICKY, CORPUS[2], " leading space", "two\n\nlines ", "<|im_end|> and <s> inline", ""]:
        for add in (True, False):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == ref.encode(text, add_special_tokens=add), (text, add)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert ours.vocab_size == len(ref)
    assert ours.bos_token_id == ref.bos_token_id and ours.pad_token_id == ref.pad_token_id


@pytest.mark.parametrize("name", ["chatml", "llama3", "sp"])
def test_bos_added_only_when_asked(dirs, name):
    ours = Tokenizer.from_dir(dirs[name])
    wants_bos = name != "chatml"
    assert (ours.encode("hi")[:1] == [ours.bos_token_id]) == wants_bos
    assert ours.encode("hi", add_special_tokens=False)[:1] != [ours.bos_token_id]


@pytest.mark.parametrize("name", ["chatml", "llama3", "sp"])
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(dirs, name, gen):
    ours, ref = _pair(dirs[name])
    assert ours.has_chat_template
    convs = [CONVERSATION, CONVERSATION[:1], CONVERSATION[:2]]
    if name != "sp":  # Mistral's template rejects a system turn
        convs.append([{"role": "system", "content": " Be brief. "}] + CONVERSATION)
    for msgs in convs:
        extra = {"date_string": "26 Jul 2024"} if name == "llama3" else {}
        text = ours.apply_chat_template(msgs, add_generation_prompt=gen, **extra)
        assert text == ref.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False, **extra)
        ids = ours.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True, **extra)
        ref_ids = ref.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True, return_dict=False, **extra)
        assert ids == ref_ids
        assert ids.count(ours.bos_token_id) <= 1 or name == "chatml"  # BOS from the text, not added again


def test_llama3_template_extras_match_transformers(dirs):
    ours, ref = _pair(dirs["llama3"])
    tools = [{"name": "météo", "description": "température à Zürich", "parameters": {"city": "東京"}}]
    msgs = CONVERSATION + [{"role": "assistant", "content": "SKIP"}, {"role": "user", "content": "ok", "x": None}]
    for kwargs in ({}, {"tools": tools}, {"tools": tools, "date_string": "1 Jan 2025"}):
        text = ours.apply_chat_template(msgs, **kwargs)
        assert text == ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, **kwargs)
    assert "météo" in ours.apply_chat_template(msgs, tools=tools) and "SKIP" not in text
    with pytest.raises(HeteroError, match="Only user and assistant"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_eos_token_ids_union(dirs):
    # generation_config.json [1], config.json 3, tokenizer_config.json "<|eot_id|>" = 4
    assert Tokenizer.from_dir(dirs["llama3"]).eos_token_ids == {1, 3, 4}
    assert Tokenizer.from_dir(dirs["chatml"]).eos_token_ids == {2}
    assert Tokenizer.from_dir(dirs["sp"]).eos_token_ids == {2}


@pytest.mark.parametrize("name", ["chatml", "llama3", "sp"])
@pytest.mark.parametrize("skip", [True, False])
def test_stream_decoder_joins_to_decode(dirs, name, skip):
    ours, ref = _pair(dirs[name])
    chat = CONVERSATION + [{"role": "assistant", "content": TRICKY}]
    prompt = ours.apply_chat_template(chat, add_generation_prompt=False)
    for ids in (ours.encode(TRICKY), ours.encode(prompt, add_special_tokens=False), ours.encode("  x \n 😀")):
        stream = ours.stream_decoder(skip_special_tokens=skip)
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        expected = ref.decode(ids, skip_special_tokens=skip)
        assert "".join(pieces) == ours.decode(ids, skip_special_tokens=skip) == expected
        assert not any("\ufffd" in p for p in pieces)
    # the emoji and CJK characters span several byte tokens, so some pushes must have waited
    stream = ours.stream_decoder()
    assert "" in [stream.push(i) for i in ours.encode("😀🎉日本語")]


@pytest.mark.parametrize("name", ["chatml", "sp"])
def test_stream_decoder_on_random_ids(dirs, name):
    # garbage ids make invalid UTF-8 and byte-fallback runs broken by special tokens: still exact
    tok, rng = Tokenizer.from_dir(dirs[name]), random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 25))]
        for skip in (True, False):
            stream = tok.stream_decoder(skip_special_tokens=skip)
            pieces = [stream.push(i) for i in ids] + [stream.flush()]
            assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip), ids


def test_add_bos_token_from_tokenizer_config(tmp_path):
    # tokenizer.json without a post-processor: tokenizer_config's add_bos_token decides (as in
    # transformers 4; transformers 5 ignores the flag when tokenizer.json is present)
    _sentencepiece(post_processor=False).save(str(tmp_path / "tokenizer.json"))
    cfg = {"add_bos_token": True, "add_eos_token": True, "bos_token": "<s>", "eos_token": "</s>"}
    _write(tmp_path, "tokenizer_config.json", cfg)
    ids = Tokenizer.from_dir(tmp_path).encode("hello")
    assert ids[0] == 1 and ids[-1] == 2
    _write(tmp_path, "tokenizer_config.json", {**cfg, "add_bos_token": False, "add_eos_token": False})
    assert 1 not in Tokenizer.from_dir(tmp_path).encode("hello")


def test_no_template_falls_back(tmp_path):
    _byte_level(["<|endoftext|>"]).save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_dir(tmp_path)
    assert not tok.has_chat_template and tok.eos_token_ids == set() and tok.bos_token_id is None
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == "user: hi\nassistant: "
    assert tok.apply_chat_template(msgs, add_generation_prompt=False, tokenize=True) == tok.encode("user: hi\n")


def test_tool_use_template_picked_with_tools(dirs, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((dirs["chatml"] / "tokenizer.json").read_bytes())
    _write(tmp_path, "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": [
        {"name": "default", "template": SMOLLM2_TEMPLATE}, {"name": "tool_use", "template": "T {{ tools | tojson }}"}]})
    ours, ref = _pair(tmp_path)
    msgs, tools = CONVERSATION[:1], [{"name": "café"}]
    for kwargs in ({}, {"tools": tools}):
        assert ours.apply_chat_template(msgs, **kwargs) == ref.apply_chat_template(
            msgs, add_generation_prompt=True, tokenize=False, **kwargs
        )
    assert ours.apply_chat_template(msgs, tools=tools) == 'T [{"name": "café"}]'


def test_chat_template_jinja_file_wins(dirs, tmp_path):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_bytes((dirs["chatml"] / f).read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}]) == "[user]hi"


def test_errors(dirs, tmp_path):
    with pytest.raises(HeteroError, match=f"tokenizer.json is missing in {tmp_path}"):
        Tokenizer.from_dir(tmp_path)
    tok = Tokenizer.from_dir(dirs["sp"])
    for bad in ([{"content": "no role"}], [{"role": "user"}], [{"role": "user", "content": None}], ["text"]):
        with pytest.raises(HeteroError, match="message 0"):
            tok.apply_chat_template(bad)
    with pytest.raises(HeteroError, match="empty"):
        tok.apply_chat_template([])
    with pytest.raises(HeteroError, match="must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_runtime_does_not_import_transformers():
    code = "import sys, hetero.tokenizer; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def _run_stop(stop, pieces):
    checker, out, hit = StopChecker(stop), [], False
    for p in pieces:
        text, hit = checker.feed(p)
        out.append(text)
        if hit:
            break
    return "".join(out) + ("" if hit else checker.flush()), hit


def test_stop_checker():
    assert _run_stop(["</answer>"], ["Hello </ans", "wer> trailing"]) == ("Hello ", True)
    assert _run_stop(["STOP"], list("abc STOP def")) == ("abc ", True)
    assert _run_stop(["aab"], list("aaab")) == ("a", True)  # overlapping candidates
    assert _run_stop(["</answer>"], ["a </b", "> c </", "an"]) == ("a </b> c </an", False)
    assert _run_stop(["y", "xyz"], ["axyz"]) == ("a", True)  # the earliest stop wins
    assert _run_stop([], ["plain ", "text"]) == ("plain text", False)

    checker = StopChecker(["</s>"])
    assert checker.feed("ok </") == ("ok ", False)  # "</" is held back...
    assert checker.feed("div>") == ("</div>", False)  # ...and released once it cannot match
    assert checker.feed("x</s>y") == ("x", True)
    assert checker.feed("more") == ("", True) and checker.flush() == ""
