"""Replay of routing traces through simulated expert caches: hand-checked cases and Belady's optimality."""

import functools
import itertools

import numpy as np
import pytest
import torch

from hetero.errors import HeteroError
from hetero.experts.replay import POLICIES, compare, hit_shares, parse_share, replay
from hetero.experts.trace import RoutingTrace


def _trace(rows, E=4, layers=(0,), expert_bytes=1):
    """rows: per token, per layer, the expert ids it picks (same k everywhere)."""
    rows = np.asarray(rows)  # [N, L, k]
    idx = {l: rows[:, i] for i, l in enumerate(layers)}
    w = {l: np.full(rows[:, i].shape, 0.5, np.float32) for i, l in enumerate(layers)}
    return RoutingTrace(E, rows.shape[2], idx, w, meta={"expert_bytes": expert_bytes})


def test_lru_and_belady_by_hand():
    tr = _trace([[[0]], [[1]], [[0]], [[2]], [[1]]])  # A B A C B, 2 slots of 4 experts = 50%
    lru, bel = replay(tr, "lru", 0.5), replay(tr, "belady", 0.5)
    assert (lru.hits, bel.hits) == (1, 2)  # LRU evicts B for C; Belady evicts A (never needed again)
    assert lru.accesses == bel.accesses == 5 and bel.slots == 2
    assert bel.hit_rate_bytes == pytest.approx(0.4) and bel.miss_bytes_per_token == pytest.approx(0.6)


def test_hit_rate_is_by_bytes_across_layers():
    # layer 0 experts weigh 3, layer 1 experts 1; layer 0 always hits after its first use; layer 1 cycles
    # 0 1 2 3 0 1 2 3 through one slot: keeping expert 0 and bypassing 1, 2, 3 hits it once, at t=4
    rows = [[[0], [t % 4]] for t in range(8)]
    tr = _trace(rows, layers=(0, 1), expert_bytes={0: 3, 1: 1})
    r = replay(tr, "belady", 0.25, scope="layer")  # one slot per layer
    assert r.slots == 2 and r.hits == 7 + 1 and r.hit_bytes == 21 + 1 and r.total_bytes == 32
    assert replay(tr, "lru", 0.25, scope="layer").hits == 7  # LRU caches every miss: layer 1 never hits


def _brute_force_hits(tr, cap):
    """The most hits any sequence of evictions and bypasses reaches (exhaustive; tiny traces only)."""
    steps = [[(l, int(e)) for e in tr.idx[l][t]] for t in range(tr.num_tokens) for l in tr.layers]

    @functools.lru_cache(maxsize=None)
    def go(i, held):
        """The most hits from step i on, holding `held` before it."""
        if i == len(steps):
            return 0
        need = steps[i]
        new = [k for k in need if k not in held]
        hits = len(need) - len(new)
        free = [k for k in held if k not in need]
        best = 0
        for n_in in range(len(new) + 1):  # cache some of the misses (any n_in of them), bypass the rest
            for come in itertools.combinations(new, n_in):
                out_n = max(0, len(held) + n_in - cap)
                if out_n > len(free):
                    continue
                for out in itertools.combinations(free, out_n):
                    best = max(best, go(i + 1, (held - frozenset(out)) | frozenset(come)))
        return hits + best

    return go(0, frozenset())


@pytest.mark.parametrize("seed", range(6))
def test_belady_is_optimal_and_beats_every_policy(seed):
    rng = np.random.default_rng(seed)
    rows = [[sorted(rng.choice(5, 2, replace=False)) for _ in range(2)] for _ in range(7)]  # 7 tokens, 2 layers
    tr = _trace(rows, E=5, layers=(0, 1))
    cap = 4  # 40% of 10 experts
    results = {r.policy: r for r in compare(tr, resident=0.4)}
    assert results["belady"].slots == cap
    assert results["belady"].hits == _brute_force_hits(tr, cap)
    assert all(r.hits <= results["belady"].hits for r in results.values())


def test_policies_differ_where_they_should():
    # expert 0 is used every third token, the others in a scan between: LRU lets two scan experts
    # push out the hot one, static (frequencies) and score (decayed weight) keep it
    rows = [[[0]] if t % 3 == 0 else [[1 + t % 7]] for t in range(60)]
    tr = _trace(rows, E=8)
    r = {x.policy: x for x in compare(tr, resident=0.25)}  # 2 slots
    assert r["lru"].hits == 0
    assert r["static"].hits == 19 and r["belady"].hits >= 19
    assert r["lru"].hits + 15 < r["score"].hits <= r["static"].hits


def test_bad_arguments():
    tr = _trace([[[0]]])
    assert parse_share("30%") == pytest.approx(0.3) and parse_share("0.5") == 0.5 and parse_share("100%") == 1
    for bad in ("0%", "120%", "abc", "-1"):
        with pytest.raises(HeteroError, match="--resident"):
            parse_share(bad)
    with pytest.raises(HeteroError, match="choose from"):
        replay(tr, "fifo")
    with pytest.raises(HeteroError, match="scope"):
        replay(tr, "lru", scope="tier")
    assert set(POLICIES) == {"score", "lru", "static", "belady"}


def test_hit_shares_per_expert_over_a_population():
    # layer 0: expert 0 every token, expert 1 or 2 alternating; one slot held by whichever was used last
    rows = [[[0, 1 + t % 2]] for t in range(40)]
    tr = _trace(rows, E=4)
    shares = hit_shares(tr, 2, policy="lru", warm=4)
    assert shares[(0, 0)] == 1.0  # always resident
    assert shares[(0, 1)] == shares[(0, 2)] == 0.0  # 2 slots: expert 0 and the other one, never this one
    assert hit_shares(tr, 3, policy="lru", warm=4) == {(0, 0): 1.0, (0, 1): 1.0, (0, 2): 1.0}
    # only the population goes through the cache: one slot for experts 1 and 2 alone still misses them
    only = hit_shares(tr, 1, population={(0, 1), (0, 2)}, policy="lru", warm=4)
    assert set(only) == {(0, 1), (0, 2)} and max(only.values()) == 0.0
    assert hit_shares(tr, 2, population={(0, 1), (0, 2)}, policy="lru", warm=4) == {(0, 1): 1.0, (0, 2): 1.0}
    assert hit_shares(tr, 0) == {(0, 0): 0.0, (0, 1): 0.0, (0, 2): 0.0}


def test_replay_window_is_the_middle_and_owns_its_arrays():
    from hetero.experts.replay import replay_window

    tr = _trace([[[t % 4]] for t in range(100)])
    w = replay_window(tr, 10)
    assert w.num_tokens == 10 and w.idx[0][:, 0].tolist() == [t % 4 for t in range(45, 55)]
    assert w.idx[0].base is None and w.w[0].base is None  # not views keeping the whole trace alive
    assert replay_window(tr, 500) is tr


def test_hit_shares_replays_fewer_tokens_when_misses_would_scan_a_big_cache(monkeypatch):
    from hetero.experts import replay as rp

    tr = _trace([[[t]] for t in range(100)], E=100)  # token t uses expert t: each key once
    assert len(hit_shares(tr, 50, warm=0)) == 100  # all 100 tokens (fewer than HIT_TOKENS)
    monkeypatch.setattr(rp, "REPLAY_WORK", 1)
    assert len(hit_shares(tr, 50, warm=0)) == rp.MIN_HIT_TOKENS  # the middle MIN_HIT_TOKENS only


def test_an_oracle_lookahead_protects_what_comes_next():
    # A B A C B with 2 slots: score (like LRU here) gives up B for C; told the next step needs B, it
    # gives up A instead and hits B at the end, as Belady does
    tr = _trace([[[0]], [[1]], [[0]], [[2]], [[1]]])
    plain, told = replay(tr, "score", 0.5), replay(tr, "score", 0.5, oracle_steps=1)
    assert told.hits == replay(tr, "belady", 0.5).hits == 2
    assert plain.hits == 1
    # one slot: A, needed again two steps on, is kept through B's miss (B is not cached: no slot is
    # free of what comes next, and the budget is never exceeded); without the oracle nothing ever hits
    assert replay(tr, "score", 0.25, oracle_steps=2).hits == 1 and replay(tr, "score", 0.25).hits == 0


class _Knows:
    """A routing predictor that forecasts the trace's true routing (per-token pick chance 1 or 0)."""

    def __init__(self, trace):
        self.trace = trace

    def token_scores(self, layer, depth, x):
        tr, target = self.trace, layer + depth
        out = torch.zeros(tr.num_tokens, tr.num_experts)
        out.scatter_(1, torch.from_numpy(tr.idx[target].astype(np.int64)), 1.0)
        return out


def _with_inputs(tr):
    return RoutingTrace(tr.num_experts, tr.top_k, tr.idx, tr.w, x={l: np.zeros((tr.num_tokens, 2)) for l in tr.layers},
                        meta=tr.meta)


def test_prediction_prefetch_serves_the_next_layer_from_the_cache():
    # layer 0 always expert 0; layer 1 a new expert each token (4 of them cycling): on demand, two slots
    # never hold layer 1's next expert; told layer 1's routing at layer 0, the prefetch brings it first
    tr = _with_inputs(_trace([[[0], [t % 4]] for t in range(12)], E=4, layers=(0, 1)))
    demand = replay(tr, "score", 0.25)  # 2 slots of 8 experts
    assert demand.hits == 11 and demand.moved_bytes == demand.total_bytes - demand.hit_bytes == 13
    ahead = replay(tr, "score", 0.25, predictor=_Knows(tr), lookahead=1)
    assert ahead.hits == 11 + 12  # layer 0 after its first use, and every layer-1 use
    assert ahead.moved_bytes == 1 + 12  # layer 0's compulsory miss, and every prefetch (all of them used)
    held = replay(tr, "score", 0.25, predictor=_Knows(tr), prefetch=False)  # protection alone brings nothing in
    assert held.hits == demand.hits and held.moved_bytes == demand.moved_bytes
    lru = replay(tr, "lru", 0.25, predictor=_Knows(tr))
    assert lru.hits == ahead.hits


def test_replay_with_a_predictor_needs_inputs_and_not_belady():
    tr = _trace([[[0], [1]]], layers=(0, 1))
    with pytest.raises(HeteroError, match="MoE inputs"):
        replay(tr, "score", predictor=_Knows(tr))
    with pytest.raises(HeteroError, match="Belady"):
        replay(_with_inputs(tr), "belady", predictor=_Knows(tr))
