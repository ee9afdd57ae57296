"""Sampling and the generation loops: transformers' logits processors as the reference."""

import pytest
import torch

import hetero
from hetero.errors import HeteroError
from hetero.generate import SamplingParams, pick, process_logits

from helpers import EOS, VOCAB, tiny_checkpoint


def _reference(logits, history, p: SamplingParams):
    from transformers.generation.logits_process import (
        LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    procs.append(TemperatureLogitsWarper(p.temperature))
    if p.top_k:
        procs.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1:
        procs.append(TopPLogitsWarper(p.top_p))
    return procs(history, logits.clone())


@pytest.mark.parametrize("kw", [
    dict(temperature=0.7), dict(temperature=1.3, top_k=5), dict(temperature=0.9, top_p=0.8),
    dict(temperature=0.8, top_k=20, top_p=0.5, repetition_penalty=1.3), dict(temperature=1.0, repetition_penalty=0.8),
])
def test_processing_matches_transformers(kw):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3
    history = torch.randint(0, 50, (3, 12), generator=g)
    p = SamplingParams(**kw)
    ours, ref = process_logits(logits, history, p, 0), _reference(logits, history, p)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    finite = ~torch.isinf(ref)
    assert torch.allclose(ours[finite], ref[finite], atol=1e-6)


def test_min_new_tokens_masks_eos_and_greedy_picks_argmax():
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    p = SamplingParams(min_new_tokens=2, eos_token_ids=frozenset({1}))
    assert pick(process_logits(logits, torch.zeros(1, 1, dtype=torch.long), p, 0), p, None).item() == 2
    assert pick(process_logits(logits, torch.zeros(1, 1, dtype=torch.long), p, 2), p, None).item() == 1


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                 dict(max_new_tokens=-1), dict(repetition_penalty=0)])
def test_bad_sampling_parameters_are_refused(bad):
    with pytest.raises(HeteroError):
        SamplingParams(**bad)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir, hf = tiny_checkpoint(tmp_path_factory.mktemp("gen"), "llama")
    return hetero.load_offloaded(model_dir, ram="64MB"), hf


def test_seeded_sampling_is_reproducible_and_varies_with_the_seed(tiny):
    model, _ = tiny
    ids = torch.randint(2, VOCAB - 1, (1, 10), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=True, temperature=1.5, top_k=0, top_p=1.0,
              eos_token_id=EOS)
    a = model.generate(ids, seed=7, **kw)
    assert torch.equal(a, model.generate(ids, seed=7, **kw))
    assert any(not torch.equal(a, model.generate(ids, seed=s, **kw)) for s in range(8, 12))


def test_generate_stops_at_eos_and_pads_finished_rows(tiny):
    model, hf = tiny
    ids = torch.randint(2, VOCAB - 1, (2, 8), generator=torch.Generator().manual_seed(5))
    free = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=EOS)
    stop_at = int(free[0, 8 + 2])  # make the 3rd token of row 0 an end-of-sequence token
    out = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=stop_at, pad_token_id=0)
    with torch.inference_mode():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                          eos_token_id=stop_at, pad_token_id=0)
    assert torch.equal(out, ref)


def test_model_call_and_generate_check_their_input(tiny):
    model, _ = tiny
    with pytest.raises(HeteroError, match="outside the vocabulary"):
        model(torch.tensor([[VOCAB + 5]]))
    with pytest.raises(HeteroError, match="padded batches"):
        model.generate(torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[0, 1, 1]]))
    assert model(torch.tensor([1, 2, 3])).logits.shape == (1, 3, VOCAB)  # a 1-D prompt is one sequence


def test_the_prefill_hands_lm_head_a_fresh_last_position(tiny, monkeypatch):
    # a [B, 1, C] view of [B, T, C] keeps T's row stride, and torch's CPU linear then copies the whole
    # weight it multiplies (lm_head: its size again in unaccounted memory)
    model, _ = tiny
    store, seen = model.executor.store, []
    real = store.logits
    monkeypatch.setattr(store, "logits", lambda h: seen.append(h.stride()) or real(h))
    model.generate(torch.randint(2, VOCAB - 1, (1, 9), generator=torch.Generator().manual_seed(5)), max_new_tokens=2)
    C = model.config.hidden_size
    assert seen and all(s == (C, C, 1) for s in seen), seen
