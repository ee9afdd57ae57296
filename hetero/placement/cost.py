"""The cost model: pure functions of (model, plan, hardware profile, workload) -> predicted times.

Each token runs the executor's loop: embed, then per layer the reads, copies and compute of that
layer's groups, then the final norm and lm_head. Every group on every tier contributes seconds to
three streams of its layer — "disk" (cold reads of its tensors at the measured bandwidth for their
size, plus dtype conversion), "copy" (host -> accelerator) and "compute" (its weights through the
measured decode matvec or prefill matmul) — and each layer adds the per-layer overhead measured for
its family plus attention over the KV cache. Today's executor runs the streams one after another
(a layer costs their sum); `Workload.overlap` models an executor that overlaps them (a layer costs
its slowest stream). Experts count by activation probability: a uniform top_k / num_experts, or a
measured per-expert frequency table.

Shape legend: n groups, 3 tiers (gpu, cpu, disk), 3 streams (disk, copy, compute), b buckets
(0: embedding, 1..L: decoder layers, L+1: final norm and lm_head).
"""

from dataclasses import dataclass, field
from math import ceil

import numpy as np

from ..errors import HeteroError
from .describe import ModelDesc
from .hardware import Profile
from .plan import LM_HEAD_CHUNK_BYTES, TIERS, Plan

STREAMS = ("disk", "copy", "compute")
FETCH_OPS = 2  # per tensor brought to the device: accountant, bind/unbind — dispatch-sized Python work


@dataclass(frozen=True)
class Workload:
    """What the model will be asked to do, and how the executor runs it.

    Attributes:
        prompt_tokens, new_tokens: one request's prompt and answer lengths.
        overlap: the executor overlaps reads and copies with compute (a layer costs its slowest
            stream); False for today's executor, which runs them one after another.
        read_mode: how disk-tier bytes are read: "buffered" (pread, today's runtime) or "direct".
        gpu: what the gpu tier is: "cuda", "fake-gpu" (host memory standing in); default cuda when profiled.
        expert_freq: layer -> per-expert probability of being picked by a token (sums to top_k),
            from routing statistics; default the uniform top_k / num_experts.
    """

    prompt_tokens: int = 128
    new_tokens: int = 128
    overlap: bool = False
    read_mode: str = "buffered"
    gpu: str | None = None
    expert_freq: dict | None = field(default=None, hash=False)


@dataclass(frozen=True)
class Prediction:
    prefill_s: float
    decode_s_per_token: float
    bottleneck: str  # the stream that takes the longest per decoded token
    streams: dict = field(hash=False)  # decode seconds per token by stream
    layers: list = field(hash=False)  # per decoder layer: (layer, {stream: s}, bottleneck)

    @property
    def decode_tokens_per_s(self) -> float:
        return 1 / self.decode_s_per_token if self.decode_s_per_token else float("inf")


class Speeds:
    """The profile's figures for one way of running: compute device, read mode, what the gpu tier is."""

    def __init__(self, profile: Profile, compute: str, workload: Workload):
        gpu = workload.gpu or ("cuda" if "cuda" in profile.compute else "fake-gpu")
        self.device = "cuda" if compute == "gpu" and gpu == "cuda" else "cpu"
        if self.device not in profile.compute:
            raise HeteroError("the hardware profile has no CUDA figures (it was measured without a GPU); "
                              "run `hetero profile --refresh` on the machine with the GPU")
        self.label = "cpu" if compute == "cpu" else ("gpu" if self.device == "cuda" else "fake gpu (host memory)")
        c = profile.compute[self.device]
        self.matmul, self.op_s, self.overheads = c["matmul_flops"], c["op_s"], c["overheads"]
        self._mv = {dt: (np.log2([r[0] for r in rows]), np.array([r[1] for r in rows], dtype=float))
                    for dt, rows in c["matvec"].items()}
        disk = profile.disk_read.get(workload.read_mode) or profile.disk_read["buffered"]
        self._disk = _table(disk)
        self._clone = _table(profile.host_clone)
        h2d = profile.host_to_device
        self._h2d = _table(h2d["pageable"]) if gpu == "cuda" and h2d else self._clone  # runtime copies are pageable
        self._memo = {}

    def _t(self, table, n: int) -> float:
        key = (id(table), n)
        if key not in self._memo:
            self._memo[key] = _interp(table, n)
        return self._memo[key]

    def mv(self, nbytes: float, cols: int, dtype: str) -> float:
        """Seconds of a decode matvec over `nbytes` of weights whose rows are `cols` wide (bandwidth interpolated in log width)."""
        logk, bps = self._mv[dtype]
        return nbytes / float(np.interp(np.log2(max(1, cols)), logk, bps))

    def read(self, n: int) -> float:
        return self._t(self._disk, n) if n else 0.0

    def clone(self, n: int) -> float:
        return self._t(self._clone, n) if n else 0.0

    def h2d(self, n: int) -> float:
        return self._t(self._h2d, n) if n else 0.0

    def family(self, model_type: str) -> dict:
        return self.overheads.get(model_type) or self.overheads.get("llama") or next(iter(self.overheads.values()))


def _table(rows) -> tuple:
    blocks = np.array([r[0] for r in rows], dtype=float)
    return blocks, blocks / np.array([r[1] for r in rows], dtype=float)


def _interp(table, n: int) -> float:
    """Seconds for one transfer of n bytes: measured time per block size, linear in between, the largest block's rate beyond."""
    blocks, times = table
    if n >= blocks[-1]:
        return n * times[-1] / blocks[-1]
    return float(np.interp(n, blocks, times))


# ---------------------------------------------------------------- per-group streams

def _expert_probs(desc: ModelDesc, workload: Workload) -> dict:
    """(layer, expert) -> probability that one token picks that expert."""
    a = desc.args
    if not a.num_experts:
        return {}
    uniform = a.num_experts_per_tok / a.num_experts
    freq = workload.expert_freq or {}
    out = {}
    for g in desc.groups:
        if g.kind == "expert":
            row = freq.get(g.layer, freq.get(str(g.layer)))
            out[(g.layer, g.expert)] = float(row[g.expert]) if row is not None else uniform
    return out


def _fetch(sp: Speeds, reads, nbytes: int, tier: str, compute: str) -> np.ndarray:
    """Streams [3] of bringing a group's tensors (stored sizes `reads`) from `tier` to the compute device."""
    if tier == compute:
        return np.zeros(3)
    ratio = sum(reads) / max(1, nbytes)  # stored / compute bytes
    disk = copy = 0.0
    for r in reads:
        n = int(r / ratio) if ratio else r  # the tensor in the compute dtype
        if tier == "disk":
            pieces = max(1, ceil(n / LM_HEAD_CHUNK_BYTES)) if compute == "gpu" else 1  # gpu-bound reads go in slices
            disk += pieces * sp.read(ceil(r / pieces)) + (sp.clone(n) if r != n else 0.0)
            if compute == "gpu":
                copy += pieces * sp.h2d(ceil(n / pieces))
        else:  # cpu tier, computing on the gpu
            copy += sp.h2d(n)
    return np.array([disk, copy, len(reads) * FETCH_OPS * sp.op_s])


def _head(sp: Speeds, desc: ModelDesc, g, tier: str, compute: str) -> np.ndarray:
    """Streams [3] of one position's logits through lm_head (or a tied embedding used as lm_head).

    Off the compute device the matrix is streamed in LM_HEAD_CHUNK_BYTES slices of the vocabulary.
    """
    V, C = desc.args.vocab_size, desc.args.hidden_size
    item = desc.dtype.itemsize
    stored = sum(desc.reads[g.name]) / max(1, g.nbytes) * item  # stored bytes per element
    compute_s = sp.mv(V * C * item, C, _dt(desc, sp))
    if tier == compute:
        return np.array([0.0, 0.0, compute_s])
    per_slice = max(1, LM_HEAD_CHUNK_BYTES // (C * item))
    n_slices = ceil(V / per_slice)
    disk = copy = 0.0
    for s in range(n_slices):
        n = min(per_slice, V - s * per_slice) * C
        if tier == "disk":
            disk += sp.read(int(n * stored)) + (sp.clone(n * item) if stored != item else 0.0)
        if compute == "gpu":
            copy += sp.h2d(n * item)
    return np.array([disk, copy, compute_s + n_slices * FETCH_OPS * sp.op_s])


def _dt(desc: ModelDesc, sp: Speeds) -> str:
    name = str(desc.dtype).replace("torch.", "")
    return name if name in sp._mv else "float32"


@dataclass(frozen=True)
class Tables:
    """Seconds per group, tier and stream (decode per token, and one prefill), plus fixed seconds per bucket.

    Attributes:
        decode, prefill: [n, 3 tiers, 3 streams] (inf where a tier cannot hold the group).
        fixed_decode, fixed_prefill: [b, 3 streams] — overheads and attention, whatever the placement.
        bucket: [n] the bucket of each group; nbytes: [n]; names: group names in order.
        label: the compute device, in words.
    """

    decode: np.ndarray
    prefill: np.ndarray
    fixed_decode: np.ndarray
    fixed_prefill: np.ndarray
    bucket: np.ndarray
    nbytes: np.ndarray
    names: tuple
    compute: str
    label: str
    overlap: bool


def tables(desc: ModelDesc, profile: Profile, workload: Workload, compute: str) -> Tables:
    """The per-group cost tables of `desc` on this machine for `workload`, computing on `compute`."""
    sp = Speeds(profile, compute, workload)
    a, dt = desc.args, _dt(desc, sp)
    L, P = a.num_hidden_layers, max(1, workload.prompt_tokens)
    probs = _expert_probs(desc, workload)
    n = len(desc.groups)
    dec, pre = np.zeros((n, 3, 3)), np.zeros((n, 3, 3))
    bucket = np.zeros(n, dtype=np.int64)
    allowed = [t for t in TIERS if compute == "gpu" or t != "gpu"]
    memo = {}
    for i, g in enumerate(desc.groups):
        bucket[i] = 0 if g.kind == "embed" and not a.tie_word_embeddings else (L + 1 if g.layer is None else g.layer + 1)
        for ti, t in enumerate(TIERS):
            if t not in allowed or (g.kind == "norms" and t != compute):
                dec[i, ti] = pre[i, ti] = np.inf
                continue
            if g.kind == "norms":
                continue
            key = (g.kind, g.nbytes, desc.reads[g.name], t, probs.get((g.layer, g.expert)))
            if key not in memo:
                memo[key] = _group(sp, desc, g, t, compute, P, probs.get((g.layer, g.expert), 1.0), dt)
            dec[i, ti], pre[i, ti] = memo[key]
    fixed_d, fixed_p = _fixed(sp, desc, workload, probs)
    return Tables(dec, pre, fixed_d, fixed_p, bucket, np.array([g.nbytes for g in desc.groups], dtype=np.int64),
                  tuple(g.name for g in desc.groups), compute, sp.label, workload.overlap)


def _group(sp: Speeds, desc, g, tier: str, compute: str, P: int, p: float, dt: str):
    """(decode streams [3], prefill streams [3]) of one group on one tier."""
    if g.kind == "lm_head":
        head = _head(sp, desc, g, tier, compute)  # prefill computes the last position's logits only
        return head, head
    if g.kind == "embed":
        rows_d, rows_p = _rows(sp, desc, tier, compute, 1), _rows(sp, desc, tier, compute, P)
        if desc.args.tie_word_embeddings:
            head = _head(sp, desc, g, tier, compute)
            return head + rows_d, head + rows_p
        return rows_d, rows_p
    fetched = _fetch(sp, desc.reads[g.name], g.nbytes, tier, compute)
    ratio = g.nbytes / max(1, sum(desc.reads[g.name]))  # compute / stored bytes
    mv = sum(sp.mv(r * ratio, k, dt) for r, k in zip(desc.reads[g.name], desc.cols[g.name]))
    mm = 2 * P * (g.nbytes / desc.dtype.itemsize) / sp.matmul[dt]
    if g.kind == "expert":
        active = 1 - (1 - p) ** P  # chance that at least one prompt token picks it
        return p * (fetched + [0, 0, mv]), active * fetched + [0, 0, max(active * mv, p * mm)]
    return fetched + [0, 0, mv], fetched + [0, 0, max(mv, mm)]


def _rows(sp: Speeds, desc, tier: str, compute: str, T: int) -> np.ndarray:
    """Streams of gathering T positions' rows of an embedding table that is not on the compute device."""
    if tier == compute:
        return np.zeros(3)
    uniq = min(T, desc.args.vocab_size)
    row = desc.args.hidden_size * desc.dtype.itemsize
    stored = int(row * sum(desc.reads["embed"]) / max(1, next(g.nbytes for g in desc.groups if g.name == "embed")))
    disk = uniq * sp.read(stored) if tier == "disk" else 0.0
    copy = sp.h2d(uniq * row) if compute == "gpu" else 0.0
    return np.array([disk, copy, FETCH_OPS * sp.op_s])


def _fixed(sp: Speeds, desc, workload: Workload, probs: dict):
    """Per-bucket compute seconds that do not depend on the placement: overheads and attention over the cache."""
    a = desc.args
    L, P, N = a.num_hidden_layers, max(1, workload.prompt_tokens), max(1, workload.new_tokens)
    o = sp.family(a.model_type)
    dt = _dt(desc, sp)
    kv_row = 2 * a.num_key_value_heads * a.head_dim * desc.dtype.itemsize  # K and V of one token, one layer
    ctx = P + (N + 1) / 2  # mean tokens attended over the answer
    window = a.sliding_window if a.model_type in ("mistral", "mixtral") and a.sliding_window else None
    if window:
        ctx = min(ctx, window)
    fd, fp = np.zeros((L + 2, 3)), np.zeros((L + 2, 3))
    moe_layers = {g.layer for g in desc.groups if g.kind == "expert"}
    for l in range(L):
        ffn_d = ffn_p = o.get("mlp", 0.0)
        if l in moe_layers:
            ps = [p for (layer, _), p in probs.items() if layer == l]
            ffn_d = o.get("moe", 0.0) + sum(ps) * o.get("expert", 0.0)
            ffn_p = o.get("moe", 0.0) + sum(1 - (1 - p) ** P for p in ps) * o.get("expert", 0.0)
        attn_d = sp.mv(kv_row * ctx, a.head_dim, dt)
        attn_p = 2 * a.num_attention_heads * a.head_dim * P * min(P, window or P) / sp.matmul[dt]
        fd[l + 1, 2] = o["attn"] + ffn_d + attn_d
        fp[l + 1, 2] = o["attn"] + ffn_p + attn_p
    fd[L + 1, 2] = fp[L + 1, 2] = o["step"]
    return fd, fp


# ---------------------------------------------------------------- a plan's times

def bucket_streams(t: Tables, tier_index: np.ndarray, which: str = "decode") -> np.ndarray:
    """[b, 3] seconds per bucket and stream for a placement given as tier indices [n]."""
    per = (t.decode if which == "decode" else t.prefill)[np.arange(len(tier_index)), tier_index]  # [n, 3]
    out = (t.fixed_decode if which == "decode" else t.fixed_prefill).copy()
    np.add.at(out, t.bucket, per)
    return out


def combine(streams: np.ndarray, overlap: bool) -> float:
    """Seconds of the buckets' streams: run one after another, or overlapped (each bucket its slowest stream)."""
    return float(streams.max(axis=1).sum() if overlap else streams.sum())


def tier_index(t: Tables, plan: Plan) -> np.ndarray:
    return np.array([TIERS.index(plan.tiers[n]) for n in t.names], dtype=np.int64)


def predict(desc: ModelDesc, plan: Plan, profile: Profile, workload: Workload = Workload(), tabs: Tables | None = None) -> Prediction:
    """Predicted prefill time, decode time per token and per-layer bottlenecks of running `plan`.

    Args:
        desc: the model (describe.describe_dir / describe).
        plan: where every group lives.
        profile: this machine's measured figures.
        workload: prompt and answer lengths, and how the executor runs.
        tabs: precomputed tables(desc, profile, workload, plan.compute), to save recomputing them.
    """
    t = tabs or tables(desc, profile, workload, plan.compute)
    idx = tier_index(t, plan)
    dec, pre = bucket_streams(t, idx, "decode"), bucket_streams(t, idx, "prefill")
    names = {"disk": "disk read", "copy": "host->gpu copy", "compute": f"compute on {t.label}"}
    L = len(dec) - 2
    layers = [(l, dict(zip(STREAMS, map(float, dec[l + 1]))), names[STREAMS[int(dec[l + 1].argmax())]]) for l in range(L)]
    totals = dec.sum(axis=0)
    return Prediction(
        prefill_s=combine(pre, t.overlap), decode_s_per_token=combine(dec, t.overlap),
        bottleneck=names[STREAMS[int(totals.argmax())]], streams=dict(zip(STREAMS, map(float, totals))), layers=layers,
    )
