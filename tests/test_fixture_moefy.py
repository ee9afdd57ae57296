"""The MoE fixture recipe (benchmarks/fixtures): corpus split, clustering, router fit, Mixtral export.

Fast pieces only; the full build (minutes) is run by `python benchmarks/fixtures/moefied_smollm2.py`.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "fixtures"))
import corpus  # noqa: E402
import moefied_smollm2  # noqa: E402
import moefy  # noqa: E402


def test_corpus_is_deterministic_disjoint_prose(tmp_path):
    assert not set(corpus.TRAIN_FILES) & set(corpus.EVAL_FILES)
    train, ev = corpus.train_text(20_000), corpus.eval_text(20_000)
    if len(train) < 10_000 or len(ev) < 10_000:
        pytest.skip("the local documentation files are not on this machine")
    assert train == corpus.train_text(20_000)
    assert not set(train.split("\n\n")) & set(ev.split("\n\n"))
    path = corpus.write_sample(tmp_path / "sample.txt", "eval", 5_000)
    assert path.read_text().strip() == corpus.eval_text(5_000)


def test_prose_filter_drops_code_and_tables():
    text = "if (x) { y = *p++; } /* 0x1f */ [a-z]+ $1 $2 $3\n\nThis paragraph is ordinary English prose about files and manuals."
    assert corpus.prose_paragraphs(text) == ["This paragraph is ordinary English prose about files and manuals."]


def test_balanced_kmeans_finds_planted_equal_clusters():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 32, generator=gen) * 5
    points = centers.repeat_interleave(6, 0) + 0.1 * torch.randn(24, 32, generator=gen)  # 4 clusters of 6
    groups = moefy.balanced_kmeans(points, 4)
    assert groups.shape == (4, 6)
    assert sorted(groups.flatten().tolist()) == list(range(24))
    assert sorted(sorted((g // 6).tolist()) for g in groups) == [[c] * 6 for c in range(4)]


def test_fit_router_recovers_a_planted_linear_router():
    gen = torch.Generator().manual_seed(1)
    true = torch.randn(8, 16, generator=gen)
    x = torch.randn(4000, 16, generator=gen)
    norms = torch.exp(x @ true.T)  # expert output norms that a linear router can rank exactly
    router = moefy.fit_router(x, norms, top_k=2, steps=20)
    assert moefy.topk_overlap((x @ router.T).topk(2, 1).indices, norms.topk(2, 1).indices) > 0.9  # chance: 0.25


def test_mixtral_export_with_all_experts_equals_the_dense_model():
    transformers = pytest.importorskip("transformers")
    cfg = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, hidden_act="silu", rms_norm_eps=1e-5,
               rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    E = 4
    groups = [torch.randperm(48).reshape(E, -1) for _ in range(2)]
    # zero routers: uniform weights 1/E; with k = E and w2 scaled by k, the MoE is the dense MLP exactly
    sd = moefied_smollm2.moe_tensors(dense.state_dict(), [torch.zeros(E, 32)] * 2, groups, top_k=E, scale=1.0)
    mcfg = moefied_smollm2.mixtral_config(cfg, E, E)
    assert mcfg["intermediate_size"] == 12 and "lm_head.weight" not in sd
    moe = transformers.MixtralForCausalLM(transformers.MixtralConfig(**mcfg)).eval()
    missing, unexpected = moe.load_state_dict(_fuse(sd, E), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)
    moe.tie_weights()
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        assert (moe(ids).logits - dense(ids).logits).abs().max().item() <= 1e-5


def _fuse(sd, E):
    """The checkpoint's per-expert w1/w3/w2 in transformers 5's in-memory fused layout (as its loader does)."""
    out = {k: v for k, v in sd.items() if ".experts." not in k}
    for L in range(2):
        pre = f"model.layers.{L}.block_sparse_moe"
        w = {r: [sd[f"{pre}.experts.{e}.{r}.weight"] for e in range(E)] for r in ("w1", "w2", "w3")}
        new = f"model.layers.{L}.mlp"
        out[f"{new}.experts.gate_up_proj"] = torch.stack([torch.cat([a, b]) for a, b in zip(w["w1"], w["w3"])])
        out[f"{new}.experts.down_proj"] = torch.stack(w["w2"])
        out[f"{new}.gate.weight"] = out.pop(f"{pre}.gate.weight")
    return out
