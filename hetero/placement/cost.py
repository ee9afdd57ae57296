"""The cost model: pure functions of (model, plan, hardware profile, workload) -> predicted times.

Every group on every tier costs seconds in the columns of schedule.py: reads the prefetch pipeline
issues ahead (a disk-tier layer's extents through the reader pool), host -> device copies, work on
the compute thread (its weights through the measured decode matvec or prefill matmul, dtype
conversion of what it read, dispatch), on-demand expert fetches through the pool, and reads made on
the compute thread (lm_head slices, embedding rows). Each layer adds the per-layer overhead
measured for its family plus attention over the KV cache. Read sizes are those of the pack's
extents, as the runtime reads them. schedule.replay then runs the executor's loop over the layers'
sums: reads ahead of compute by the plan's depth, and the next token's first reads during lm_head.
Experts count by activation probability: a uniform top_k / num_experts, or per-expert frequencies
from a routing trace (Workload.expert_freq). An expert cache holds the most used of the experts homed
below its tier; with the trace itself (Workload.routing_trace) the cache's policy is replayed on it
instead, and each expert costs as the cache's tier for the share of its uses the replay served.

Shape legend: n groups, 3 tiers (gpu, cpu, disk), c = schedule.COLS cost columns, b buckets
(0: embedding, 1..L: decoder layers, L+1: final norm and lm_head).
"""

from dataclasses import dataclass, field
from math import ceil, log

import numpy as np

from ..errors import HeteroError
from .describe import ModelDesc
from .hardware import Profile
from .plan import EXTENT_ALIGN, HEAD_READ_SLACK, LM_HEAD_CHUNK_BYTES, MAX_LOOKAHEAD, TIERS, Plan, next_token_reads
from .schedule import COLS, COMP, COPY, EPRE, FIFO, HAZ, PRE, SYNC, replay, serial

STREAMS = ("disk", "copy", "compute")
FETCH_OPS = 2  # per tensor brought to the device: accountant, bind/unbind — dispatch-sized Python work


@dataclass(frozen=True)
class Workload:
    """What the model will be asked to do, and how the executor runs it.

    Attributes:
        prompt_tokens, new_tokens: one request's prompt and answer lengths.
        overlap: the executor's prefetch pipeline reads ahead of compute (True, the runtime's loop);
            False predicts a loop that waits for every read.
        gpu: what the gpu tier is: "cuda", "fake-gpu" (host memory standing in); default cuda when profiled.
        expert_freq: per-expert probability that a token picks the expert (rows sum to top_k), from a
            routing trace: an array [n_moe_layers, num_experts] (rows in layer order, as
            experts.trace.RoutingTrace.frequencies() gives) or {layer: row}; default uniform top_k / num_experts.
        extents: the pack's layout, group -> (extent bytes, data bytes, tensors are views in the compute
            dtype), as flash.pack.staging_extents gives; default a pack in the compute dtype.
        expert_recall: share of the experts a token uses that the routing predictor read ahead (its
            measured recall at the lookahead; experts/manager.py): those reads are queued by the MoE
            layer that predicts them (schedule.py), the rest are fetched on demand, and so are all
            of the first MoE layer's, which no layer predicts; 0 with prediction off. One number, or
            per expert {layer: [E]} (the experts a cache misses are predicted worse than the average).
        routing_trace: the RoutingTrace itself (experts/trace.py): the plan's expert caches are
            replayed on it (experts/replay.hit_shares, policy `expert_policy`) for their hit shares,
            which then reflect the routing's locality, not only its frequencies.
    """

    prompt_tokens: int = 128
    new_tokens: int = 128
    overlap: bool = True
    gpu: str | None = None
    expert_freq: object = field(default=None, hash=False, compare=False)
    extents: dict | None = field(default=None, hash=False, compare=False)
    expert_recall: object = field(default=0.0, hash=False)
    routing_trace: object = field(default=None, hash=False, compare=False)
    expert_policy: str = "score"


@dataclass(frozen=True)
class Prediction:
    prefill_s: float
    decode_s_per_token: float
    bottleneck: str  # the stream that takes the longest per decoded token
    streams: dict = field(hash=False)  # decode seconds per token by stream (work, overlapped or not)
    # per decoder layer: (layer, {stream: s, "stall": wait for its reads, "loop": s the loop spends on it}, bottleneck)
    layers: list = field(hash=False)
    stall_s: float = 0.0  # decode seconds per token the loop waits for reads (prefetched layers, expert fetches)
    expert_lookahead: int = 1  # MoE layers the runtime predicts and prefetches ahead (lookahead())

    @property
    def decode_tokens_per_s(self) -> float:
        return 1 / self.decode_s_per_token if self.decode_s_per_token else float("inf")


class Speeds:
    """The profile's figures for one way of running: compute device, what the gpu tier is."""

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
        self._call = c.get("matvec_call_s") or {}  # (a profile without it: the table's rates alone)
        self._decode = c.get("dequant_bps") or {}  # (a profile without it: decoding costs a clone)
        self._lossless = c.get("lossless_bps") or {}  # {codec: {dtype: bytes/s}}
        self._contention = c.get("contention") or {}  # {dtype: {"disk": x, "compute": x}} (cpu compute only)
        self._table_bytes = float(c.get("matvec_bytes", 4 * 2**20))  # the matrix size the table was measured at
        d = profile.disk_read
        # a profile from before the pool probe: its O_DIRECT (else buffered) figures stand in
        self._direct = _table(d.get("direct") or d["buffered"])
        self._pool = _table(d["pool"]) if d.get("pool") else self._direct
        self._clone = _table(profile.host_clone)
        h2d = profile.host_to_device
        self._h2d = _table(h2d["pageable"]) if gpu == "cuda" and h2d else self._clone  # runtime copies are pageable
        self._memo = {}

    def _t(self, table, n: int) -> float:
        key = (id(table), n)
        if key not in self._memo:
            self._memo[key] = _interp(table, n)
        return self._memo[key]

    def mv(self, nbytes: float, cols: int, dtype: str, calls: int = 1) -> float:
        """Seconds of `calls` decode matvecs over `nbytes` of weights in all, rows `cols` wide: the bytes at the
        streaming rate (the table's rate, interpolated in log width, less its one call per matrix) plus each
        call's fixed cost (calls=0: a kernel whose fixed cost is counted elsewhere, e.g. attention's)."""
        logk, bps = self._mv[dtype]
        rate = float(np.interp(np.log2(max(1, cols)), logk, bps))
        call = float(self._call.get(dtype, 0.0))
        per_byte = max(0.5 / rate, 1 / rate - call / self._table_bytes)
        return nbytes * per_byte + calls * call

    def pool(self, n: int) -> float:
        """Seconds of reading one n-byte extent through the reader pool, in a stream of such reads."""
        return self._t(self._pool, n) if n else 0.0

    def direct(self, n: int) -> float:
        """Seconds of one O_DIRECT read of n bytes on the compute thread."""
        return self._t(self._direct, n) if n else 0.0

    def clone(self, n: int) -> float:
        return self._t(self._clone, n) if n else 0.0

    def decode(self, n: int, dtype: str, decoder: str | None = None) -> float:
        """Seconds of decoding a non-view pack extent into n bytes of `dtype` buffers: decompressing with a
        lossless codec (decoder "exp4") at its probed rate, else dequantizing ("int8" / "int4") or
        converting (None) at the int8 probe's."""
        bps = (self._lossless.get(decoder) or self._decode).get(dtype)
        return n / bps if bps else self.clone(n)

    def h2d(self, n: int) -> float:
        return self._t(self._h2d, n) if n else 0.0

    def contention(self, dtype: str) -> tuple:
        """(disk, compute): how much slower the pool's reads and this dtype's compute run while both run;
        (1, 1) where the profile has no such figure (a gpu computing, a profile from before the probe)."""
        c = self._contention.get(dtype)
        return (float(c["disk"]), float(c["compute"])) if c else (1.0, 1.0)

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


# ---------------------------------------------------------------- per-group costs

def expert_probs(desc: ModelDesc, workload: Workload) -> dict:
    """(layer, expert) -> probability that one token picks that expert (Workload.expert_freq, else uniform)."""
    return group_expert_probs(desc.groups, desc.args, workload.expert_freq)


def group_expert_probs(groups, args, freq) -> dict:
    """expert_probs for the expert groups of `groups`, from frequencies `freq` ([MoE layers, E] or a dict
    layer -> [E]; None: the uniform prior top_k / E)."""
    if not args.num_experts:
        return {}
    moe = sorted({g.layer for g in groups if g.kind == "expert"})
    rows = {}
    if freq is not None:
        if isinstance(freq, dict):
            rows = {int(k): v for k, v in freq.items()}
        else:
            arr = np.asarray(freq, dtype=float)
            if arr.ndim != 2 or arr.shape != (len(moe), args.num_experts):
                raise HeteroError(f"expert frequencies of shape {list(arr.shape)} do not fit this model's "
                                  f"{len(moe)} MoE layers of {args.num_experts} experts")
            rows = dict(zip(moe, arr))
    uniform = args.num_experts_per_tok / args.num_experts
    out = {}
    for g in groups:
        if g.kind == "expert":
            row = rows.get(g.layer)
            out[(g.layer, g.expert)] = min(1.0, max(0.0, float(row[g.expert]))) if row is not None else uniform
    return out


def _extent(workload: Workload, g) -> tuple:
    """(extent bytes, data bytes, is a view, decoder) of a group in the pack (default: the compute dtype)."""
    if workload.extents and g.name in workload.extents:
        return tuple(workload.extents[g.name])
    return -(-max(g.nbytes, 1) // EXTENT_ALIGN) * EXTENT_ALIGN, g.nbytes, True, None


def _fetch(sp: Speeds, desc, g, tier: str, compute: str, ext: tuple) -> np.ndarray:
    """Costs [c] of bringing one group from `tier` to the compute device (its read in the PRE column)."""
    out = np.zeros(COLS)
    if tier == compute:
        return out
    out[COMP] = len(desc.reads[g.name]) * FETCH_OPS * sp.op_s
    if tier == "disk":
        extent, data, view, decoder = ext
        out[PRE] = sp.pool(extent)
        if compute == "gpu":
            out[COPY] = sp.h2d(data)  # the raw bytes go to the device, decoded there
        elif not view:  # decoded into compute-dtype buffers on the compute thread
            out[COMP] += sp.decode(g.nbytes, _dt(desc, sp), decoder)
    else:  # a cpu-tier group, computing on the gpu: one copy per tensor
        ratio = g.nbytes / max(1, sum(desc.reads[g.name]))
        out[COPY] = sum(sp.h2d(int(r * ratio)) for r in desc.reads[g.name])
    return out


def _head(sp: Speeds, desc: ModelDesc, g, tier: str, compute: str, ext: tuple) -> np.ndarray:
    """Costs [c] of one position's logits through lm_head (or a tied embedding used as lm_head).

    Off the compute device the matrix is streamed in LM_HEAD_CHUNK_BYTES slices of the vocabulary,
    each read (from disk, on the compute thread) and, computing on the gpu, copied before it computes.
    """
    V, C = desc.args.vocab_size, desc.args.hidden_size
    item = desc.dtype.itemsize
    out = np.zeros(COLS)
    out[COMP] = sp.mv(V * C * item, C, _dt(desc, sp))
    if tier == compute:
        return out
    _, data, view, decoder = ext
    stored = data / max(1, g.nbytes) * item  # stored bytes per element
    per_slice = max(1, LM_HEAD_CHUNK_BYTES // (C * item))
    n_slices = ceil(V / per_slice)
    for s in range(n_slices):
        n = min(per_slice, V - s * per_slice) * C
        if tier == "disk":
            out[SYNC] += sp.direct(-(-int(n * stored) // EXTENT_ALIGN) * EXTENT_ALIGN + EXTENT_ALIGN)
            out[COMP] += 0.0 if view else sp.decode(n * item, _dt(desc, sp), decoder)
        if compute == "gpu":
            out[COPY] += sp.h2d(n * item)
    out[COMP] += n_slices * FETCH_OPS * sp.op_s
    return out


def _rows(sp: Speeds, desc, g, tier: str, compute: str, T: int, ext: tuple) -> np.ndarray:
    """Costs [c] of gathering T positions' rows of an embedding table that is not on the compute device."""
    out = np.zeros(COLS)
    if tier == compute:
        return out
    uniq = min(T, desc.args.vocab_size)
    row = desc.args.hidden_size * desc.dtype.itemsize
    stored = int(row * ext[1] / max(1, g.nbytes))
    if tier == "disk":  # one direct read per row, widened to alignment
        out[SYNC] = uniq * sp.direct(min(-(-stored // EXTENT_ALIGN) * EXTENT_ALIGN + EXTENT_ALIGN, stored + HEAD_READ_SLACK))
    out[COPY] = sp.h2d(uniq * row) if compute == "gpu" else 0.0
    out[COMP] = FETCH_OPS * sp.op_s
    return out


def _dt(desc: ModelDesc, sp: Speeds) -> str:
    name = str(desc.dtype).replace("torch.", "")
    return name if name in sp._mv else "float32"


@dataclass(frozen=True)
class Tables:
    """Seconds per group, tier and cost column (decode per token, and one prefill), plus fixed seconds per bucket.

    Attributes:
        decode, prefill: [n, 3 tiers, c] (inf where a tier cannot hold the group); columns as in schedule.py.
        fixed_decode, fixed_prefill: [b, c] — overheads and attention, whatever the placement.
        bucket: [n] the bucket of each group; nbytes: [n]; names: group names in order.
        label: the compute device, in words.
        gpu: the compute device is the gpu tier (copies of layer j+1 wait for its reads before j computes).
        cached_moe: seconds each MoE layer adds when the plan has an expert cache (overheads.py).
        moe_layers: the MoE layers in order; top_k: experts per token.
        expert_move_s: tier -> seconds of bringing one expert from there to the compute device (the
            slowest expert; what prefetching has to hide).
        contention: (disk, compute) slowdowns of reads and compute while they overlap (see contend()).
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
    cached_moe: float = 0.0
    moe_layers: tuple = ()
    top_k: int = 0
    expert_move_s: dict = field(default_factory=dict)
    contention: tuple = (1.0, 1.0)


def tables(desc: ModelDesc, profile: Profile, workload: Workload, compute: str) -> Tables:
    """The per-group cost tables of `desc` on this machine for `workload`, computing on `compute`."""
    sp = Speeds(profile, compute, workload)
    a, dt = desc.args, _dt(desc, sp)
    L, P = a.num_hidden_layers, max(1, workload.prompt_tokens)
    probs = expert_probs(desc, workload)
    n = len(desc.groups)
    dec, pre = np.zeros((n, 3, COLS)), np.zeros((n, 3, COLS))
    bucket = np.zeros(n, dtype=np.int64)
    allowed = [t for t in TIERS if compute == "gpu" or t != "gpu"]
    memo = {}
    moe = tuple(sorted({g.layer for g in desc.groups if g.kind == "expert"}))
    move = {}
    for i, g in enumerate(desc.groups):
        bucket[i] = 0 if g.kind == "embed" and not a.tie_word_embeddings else (L + 1 if g.layer is None else g.layer + 1)
        ext = _extent(workload, g)
        for ti, t in enumerate(TIERS):
            if t not in allowed or (g.kind == "norms" and t != compute):
                dec[i, ti] = pre[i, ti] = np.inf
                continue
            if g.kind == "norms":
                continue
            p = probs.get((g.layer, g.expert), 1.0)
            recall = _recall(workload.expert_recall, g, moe)
            key = (g.kind, g.nbytes, desc.reads[g.name], ext, t, p, recall)
            if key not in memo:
                memo[key] = _group(sp, desc, g, t, compute, P, p, dt, ext, recall)
                if g.kind == "expert" and t != compute:  # (groups of one key move alike: counted once)
                    f = _fetch(sp, desc, g, t, compute, ext)
                    move[t] = max(move.get(t, 0.0), float(f[PRE] + f[COPY] + f[COMP]))
            dec[i, ti], pre[i, ti] = memo[key]
    fixed_d, fixed_p = _fixed(sp, desc, workload, probs)
    return Tables(dec, pre, fixed_d, fixed_p, bucket, np.array([g.nbytes for g in desc.groups], dtype=np.int64),
                  tuple(g.name for g in desc.groups), compute, sp.label, workload.overlap,
                  sp.family(a.model_type).get("cached_moe", 0.0), moe, a.num_experts_per_tok or 0, move,
                  sp.contention(dt))


def _recall(recall, g, moe: tuple) -> float:
    """The share of an expert's uses read ahead (Workload.expert_recall); 0 for the first MoE layer's,
    which no layer predicts (and for groups that are not experts, where it is unused)."""
    if g.kind != "expert" or g.layer == moe[0]:
        return 0.0
    if isinstance(recall, dict):
        row = recall.get(g.layer)
        return float(row[g.expert]) if row is not None and g.expert < len(row) else 0.0
    return float(recall)


def _group(sp: Speeds, desc, g, tier: str, compute: str, P: int, p: float, dt: str, ext: tuple, recall: float = 0.0):
    """(decode costs [c], prefill costs [c]) of one group on one tier (recall: Workload.expert_recall)."""
    if g.kind == "lm_head":
        head = _head(sp, desc, g, tier, compute, ext)  # prefill computes the last position's logits only
        return head, head
    if g.kind == "embed":
        rows_d, rows_p = _rows(sp, desc, g, tier, compute, 1, ext), _rows(sp, desc, g, tier, compute, P, ext)
        if desc.args.tie_word_embeddings:
            head = _head(sp, desc, g, tier, compute, ext)
            return head + rows_d, head + rows_p
        return rows_d, rows_p
    fetched = _fetch(sp, desc, g, tier, compute, ext)
    ratio = g.nbytes / max(1, sum(desc.reads[g.name]))  # compute / stored bytes
    mv = sum(sp.mv(r * ratio, k, dt) for r, k in zip(desc.reads[g.name], desc.cols[g.name]))
    mm = 2 * P * (g.nbytes / desc.dtype.itemsize) / sp.matmul[dt]
    dec, pre = fetched.copy(), fetched.copy()
    dec[COMP] += mv
    pre[COMP] += max(mv, mm)
    if g.kind != "expert":
        return dec, pre
    # fetched when picked: read ahead when the predictor saw it coming (EPRE, queued by the layer that
    # predicted it), else on demand, waiting in the pool's queue behind what is queued (FIFO). A
    # prediction that misses reads an expert that is not used: for each use the predictor read ahead
    # (recall) it read (1 - recall) / recall others, so the read-ahead stream carries a whole read per
    # use while the demand stream carries the misses (on the widened MoE fixture, mostly on disk: 358
    # MB/token predicted without these reads, 403 measured; benchmarks/plan_accuracy.py)
    active = 1 - (1 - p) ** P  # chance that at least one prompt token picks it
    recall = min(1.0, max(0.0, recall))
    ahead = 1.0 if recall > 0 else 0.0  # recall x (1 + (1 - recall) / recall)
    out = []
    for share, work in ((p, p * mv), (active, max(active * mv, p * mm))):
        c = share * fetched
        c[FIFO], c[EPRE], c[PRE] = share * (1 - recall) * fetched[PRE], share * ahead * fetched[PRE], 0.0
        c[HAZ] = -log(max(1e-12, 1 - share * (1 - recall))) if fetched[PRE] > 0 else 0.0
        c[COMP] = share * fetched[COMP] + work
        out.append(c)
    return out[0], out[1]


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
    fd, fp = np.zeros((L + 2, COLS)), np.zeros((L + 2, COLS))
    moe_layers = {g.layer for g in desc.groups if g.kind == "expert"}
    for l in range(L):
        ffn_d = ffn_p = o.get("mlp", 0.0)
        if l in moe_layers:
            ps = [p for (layer, _), p in probs.items() if layer == l]
            ffn_d = o.get("moe", 0.0) + sum(ps) * o.get("expert", 0.0)
            ffn_p = o.get("moe", 0.0) + sum(1 - (1 - p) ** P for p in ps) * o.get("expert", 0.0)
        attn_d = sp.mv(kv_row * ctx, a.head_dim, dt, calls=0)  # SDPA's own fixed cost is in o["attn"]
        attn_p = 2 * a.num_attention_heads * a.head_dim * P * min(P, window or P) / sp.matmul[dt]
        fd[l + 1, COMP] = o["attn"] + ffn_d + attn_d
        fp[l + 1, COMP] = o["attn"] + ffn_p + attn_p
    fd[L + 1, COMP] = fp[L + 1, COMP] = o["step"]
    return fd, fp


# ---------------------------------------------------------------- a plan's times

def bucket_streams(t: Tables, tier_index: np.ndarray, which: str = "decode") -> np.ndarray:
    """[b, c] costs per bucket for a placement given as tier indices [n]."""
    per = (t.decode if which == "decode" else t.prefill)[np.arange(len(tier_index)), tier_index]  # [n, c]
    out = (t.fixed_decode if which == "decode" else t.fixed_prefill).copy()
    np.add.at(out, t.bucket, per)
    return out


def combine(rows: np.ndarray, overlap: bool, depth: int = 1, next_reads: int | None = None, gpu: bool = False,
            steady: bool = True, stalls: list | None = None, issuers: list | None = None) -> float:
    """Seconds of one forward over per-bucket costs [b, c] (contend()ed when overlapped): the executor's
    schedule (schedule.replay), or serial."""
    if not overlap:
        return serial(rows)
    return replay(rows, depth, next_reads, gpu, steady, stalls, issuers)


READS = [PRE, FIFO, EPRE]  # the columns of reads the pool makes while the compute thread may be computing


def contend(rows: np.ndarray, overlap: bool, disk: float, compute: float) -> np.ndarray:
    """Costs [b, c] with the pool's reads and the compute thread's work stretched by their overlap.

    While both run, reads take `disk` times and compute `compute` times as long as alone (the profile's
    contention probe). Over a forward, with C seconds of compute and D of pool reads, alone: if the
    stretched reads fit within the compute (disk * D / compute <= C), all of D overlaps: reads take
    disk * D, and compute loses the share of its speed it gave them over that time; otherwise all of C
    overlaps: compute takes compute * C, and the reads left after it run alone. Each column is scaled by
    its total's stretch, so the schedule's replay keeps each layer's share. (Reads on the compute thread,
    SYNC, never overlap its compute.)
    """
    C, D = float(rows[:, COMP].sum()), float(rows[:, READS].sum())
    if not overlap or C <= 0 or D <= 0 or (disk == 1 and compute == 1):  # (a serial loop overlaps nothing)
        return rows
    if disk * D / compute <= C:
        c2, d2 = C + disk * D * (1 - 1 / compute), disk * D
    else:
        c2, d2 = compute * C, D + compute * C * (1 - 1 / disk)
    out = np.array(rows, dtype=float)
    out[:, COMP] *= c2 / C
    out[:, READS] *= d2 / D
    return out


def lookahead(miss_s: float, layer_s: float, most: int = MAX_LOOKAHEAD, transfer_bound: bool = False) -> int:
    """MoE layers to predict and prefetch ahead: enough that a miss's transfer, started that many
    layers early, is done when its layer computes (ceil(miss / layer)), clamped to 1..most — or 1 when
    transfers are the plan's bottleneck: the disk (or the copy engine) then has no idle time for reads
    started earlier to fill, and every layer further ahead adds its wrong guesses' reads to the
    bottleneck. (Measured with the lookahead forced, on the two plans of benchmarks/moe_offload.py, both
    disk-bound: 3 ahead read 15-17% more bytes per token than 1 ahead, and decoded 4-11% slower in
    the median of 5 interleaved runs each.)

    Args:
        miss_s: seconds to bring one layer's worth of missed experts to the compute tier.
        layer_s: seconds one layer computes.
        transfer_bound: the cost model predicts reads or copies, not compute, bound the decode step.
    """
    if transfer_bound:
        return 1
    if layer_s <= 0:
        return most
    return max(1, min(most, ceil(miss_s / layer_s)))


def expert_schedule(t: Tables, rows: np.ndarray) -> tuple[int, list]:
    """(the lookahead the runtime takes for a placement with per-bucket costs rows [b, c] (lookahead(): a
    layer's top_k experts from the slowest tier they are homed on, over an MoE layer's compute), the
    issuers replay() takes: per layer, the MoE layer that predicts it, that many MoE layers earlier)."""
    L = len(rows) - 2
    if not t.moe_layers:
        return 1, [-1] * L
    s = _streams(rows.sum(axis=0))
    disk = rows[:, [FIFO, EPRE]].sum() > 0
    move = t.expert_move_s.get("disk" if disk else "cpu", 0.0) if t.compute == "gpu" or disk else 0.0
    layer_s = float(np.mean([rows[m + 1, COMP] for m in t.moe_layers]))
    ahead = lookahead(t.top_k * move, layer_s, transfer_bound=max(s["disk"], s["copy"]) > s["compute"])
    issuers = [-1] * L
    for i, m in enumerate(t.moe_layers):
        if i:  # the first is predicted by none
            issuers[m] = t.moe_layers[max(0, i - ahead)]
    return ahead, issuers


def tier_index(t: Tables, plan: Plan) -> np.ndarray:
    return np.array([TIERS.index(plan.tiers[n]) for n in t.names], dtype=np.int64)


def cached_index(t: Tables, plan: Plan, probs: dict) -> np.ndarray:
    """Tier indices [n] as the plan's expert caches make them cost: each cache (plan.expert_cache, slots
    per tier) is taken to hold the most used of the experts homed below its tier, which then cost as
    if they lived on it. Under the uniform prior that is the cache's hit rate, slots / experts below."""
    idx = tier_index(t, plan)
    cache = getattr(plan, "expert_cache", None) or {}
    for tier in ("gpu", "cpu"):
        slots, ti = int(cache.get(tier, 0)), TIERS.index(tier)
        if slots <= 0:
            continue
        below = [i for i, name in enumerate(t.names) if idx[i] > ti and name in probs]
        below.sort(key=lambda i: -probs[t.names[i]])
        for i in below[:slots]:
            idx[i] = ti
    return idx


_HITS: dict = {}  # (trace, policy, slots, population) -> hit shares: replays are seconds of Python


def replayed_weights(t: Tables, plan: Plan, trace, policy: str = "score") -> np.ndarray:
    """[n, 3] share of each group's uses served from each tier, the plan's expert caches replayed on a
    routing trace (experts.replay.hit_shares): an expert homed below a cache's tier is served by the
    cache for its replayed hit share, else from below (by the next cache down, else its home)."""
    from ..experts.replay import hit_shares

    idx = tier_index(t, plan)
    w = np.zeros((len(idx), len(TIERS)))
    w[np.arange(len(idx)), idx] = 1.0
    cache = getattr(plan, "expert_cache", None) or {}
    keys = {i: _expert_key(name) for i, name in enumerate(t.names)}
    keys = {i: k for i, k in keys.items() if k is not None}
    for tier in ("gpu", "cpu"):
        slots, ti = int(cache.get(tier, 0)), TIERS.index(tier)
        if slots <= 0:
            continue
        below = {i: k for i, k in keys.items() if idx[i] > ti}
        pop = frozenset(below.values())
        memo = (id(trace), policy, slots, pop)
        if memo not in _HITS or _HITS[memo][0] is not trace:  # (the trace is kept, so its id stays its own)
            if len(_HITS) >= 8:  # a few plans of a few models: each entry keeps its trace window alive
                _HITS.clear()
            _HITS[memo] = (trace, hit_shares(trace, slots, pop, policy))
        shares = _HITS[memo][1]
        for i, k in below.items():
            h = shares.get(k, 0.0)
            rest = w[i, ti + 1:].sum()  # what the caches above left to be served from below this tier
            w[i, ti + 1:] *= 1 - h
            w[i, ti] += h * rest
    return w


def _expert_key(name: str):
    """'layers.3.experts.7' -> (3, 7); None for other groups."""
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "layers" and parts[2] == "experts":
        return int(parts[1]), int(parts[3])
    return None


def weighted_streams(t: Tables, weights: np.ndarray, which: str = "decode") -> np.ndarray:
    """[b, c] costs per bucket when each group is served from several tiers with shares weights [n, 3]."""
    table = t.decode if which == "decode" else t.prefill  # [n, 3, c]
    per = np.einsum("nk,nkc->nc", weights, np.where(weights[..., None] > 0, table, 0.0))
    out = (t.fixed_decode if which == "decode" else t.fixed_prefill).copy()
    np.add.at(out, t.bucket, per)
    return out


def _streams(row) -> dict:
    return {"disk": float(row[PRE] + row[FIFO] + row[SYNC] + row[EPRE]), "copy": float(row[COPY]),
            "compute": float(row[COMP])}


def predict(desc: ModelDesc, plan: Plan, profile: Profile, workload: Workload = Workload(), tabs: Tables | None = None) -> Prediction:
    """Predicted prefill time, decode time per token and per-layer bottlenecks of running `plan`.

    Args:
        desc: the model (describe.describe_dir / describe).
        plan: where every group lives (and its prefetch depth).
        profile: this machine's measured figures.
        workload: prompt and answer lengths, routing statistics, the pack's layout.
        tabs: precomputed tables(desc, profile, workload, plan.compute), to save recomputing them.
    """
    t = tabs or tables(desc, profile, workload, plan.compute)
    probs = {f"layers.{l}.experts.{e}": p for (l, e), p in expert_probs(desc, workload).items()}
    if workload.routing_trace is not None and any((getattr(plan, "expert_cache", None) or {}).values()):
        w = replayed_weights(t, plan, workload.routing_trace, workload.expert_policy)
        dec, pre = weighted_streams(t, w, "decode"), weighted_streams(t, w, "prefill")
    else:
        idx = cached_index(t, plan, probs)
        dec, pre = bucket_streams(t, idx, "decode"), bucket_streams(t, idx, "prefill")
    if any((getattr(plan, "expert_cache", None) or {}).values()):
        # behind a cache, each MoE layer also runs the expert manager's bookkeeping and prediction
        for layer in {g.layer for g in desc.groups if g.kind == "expert"}:
            dec[layer + 1, COMP] += t.cached_moe
            pre[layer + 1, COMP] += t.cached_moe
    # (the expert schedule, the streams and the bottleneck are of the costs as the overlap stretches them)
    dec, pre = contend(dec, t.overlap, *t.contention), contend(pre, t.overlap, *t.contention)
    extents = {k: tuple(v) for k, v in workload.extents.items()} if workload.extents else None
    nxt = next_token_reads(list(desc.groups), plan.tiers, plan.compute, plan.depth, extents)
    L = len(dec) - 2
    stalls = [0.0] * L
    ahead, issuers = expert_schedule(t, dec)
    kw = dict(depth=plan.depth, next_reads=nxt, gpu=plan.compute == "gpu", issuers=issuers)
    decode = combine(dec, t.overlap, stalls=stalls, **kw)
    prefill = combine(pre, t.overlap, steady=False, **kw)
    names = {"disk": "disk read", "copy": "host->gpu copy", "compute": f"compute on {t.label}"}
    layers = []
    for l in range(L):
        r = dec[l + 1]
        s = _streams(r)
        # what the loop spends in the layer: its own work and reads, and its waits for reads (stalls)
        loop = float(r[COMP] + r[COPY] + r[SYNC]) + stalls[l]
        layers.append((l, {**s, "stall": stalls[l], "loop": loop}, names[max(s, key=s.get)]))
    totals = _streams(dec.sum(axis=0))
    return Prediction(prefill_s=prefill, decode_s_per_token=decode, bottleneck=names[max(totals, key=totals.get)],
                      streams=totals, layers=layers, stall_s=float(sum(stalls)), expert_lookahead=ahead)
