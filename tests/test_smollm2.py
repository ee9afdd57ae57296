"""The real model: SmolLM2-135M-Instruct from its GGUF, against transformers' own load of the same file."""

import pytest
import torch

import hetero


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                dtype=torch.float32).eval()


@pytest.mark.parametrize("ram", [None, "200MB"])
def test_logits_match_transformers_gguf_load(smollm2_dir, reference, ram):
    model = hetero.load_offloaded(smollm2_dir, ram=ram, context=512)
    ids = torch.tensor([model.encode_prompt("What is the capital of France?")])
    with torch.inference_mode():
        ref = reference(ids).logits
    ours = model(ids).logits
    assert (ours - ref).abs().max().item() <= 1e-3
    if ram is not None:
        assert model.stats()["resident_bytes"]["disk"] > 0.5 * sum(model.stats()["resident_bytes"].values())
        assert model.accountant.snapshot()["cpu"]["peak_bytes"] <= 200 * 10**6


def test_answers_paris_from_disk(smollm2_dir):
    model = hetero.load_offloaded(smollm2_dir, ram="200MB")
    answer = "".join(model.stream("What is the capital of France?", max_new_tokens=20))
    assert "Paris" in answer
    assert model.stats()["decode_disk_read_bytes_per_token"] > 100 * 2**20


def test_stream_stops_at_a_stop_string_and_reports_counts(smollm2_dir):
    model = hetero.load_offloaded(smollm2_dir, context=512)
    stats = {}
    text = "".join(model.stream("What is the capital of France?", max_new_tokens=30, stop=["Paris"], stats=stats))
    assert "Paris" not in text and "capital" in text
    assert 0 < stats["generated_tokens"] < 30 and stats["prompt_tokens"] > 10
    messages = [{"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "What is the capital of France?"}]
    assert "Paris" in "".join(model.stream(messages, max_new_tokens=10))
