"""The executor's schedule, replayed on per-layer costs: when each read lands and how long the loop waits for it.

runtime/executor.py and runtime/pipeline.py run, per token:

    issue(0); embed
    for each layer j:  issue(j)        queue the pool reads of the first depth + 1 reading layers from j
                                       (layers that read nothing are skipped over)
                       copy(j + 1)     gpu compute: wait for j+1's reads, copy it to the device
                       take(j)         cpu compute: wait for j's reads
                       compute j       (router: its misses fetched through the same pool on demand,
                                       and the experts predicted for the next layers queued behind
                                       the pool's reads; then its experts, waiting for theirs)
    issue_next()                       the next token's first reads, queued while lm_head streams
    norm, lm_head                      off-device: slice by slice, read on the compute thread

The disk is one server. Reads queued on the reader pool are served in order (an expert fetch waits
for the reads queued before it); a read made on the compute thread itself (an lm_head slice, an
embedding row) shares the disk with the pool's queue, each getting half, so it ends after its own
time plus as much again of the queue's work as overlaps it. A layer costs what the compute thread
spends on it plus whatever it waits for its reads. The second of two tokens gives the steady state:
all that carries from one token to the next is the next token's first reads, queued before lm_head.

The routing predictor's reads are queued by the MoE layer that predicts them, `lookahead` MoE layers
earlier (`issuers`), not with the pipeline's reads depth layers ahead: at a layer's start they join
the end of the queue, and the layer they are for waits for them before it computes. The first MoE
layer of a token is predicted by none (cost.py counts its experts as fetched on demand).

Columns of a cost row (seconds; see cost.Tables): PRE reads the pipeline issues ahead, COPY host ->
device copies, COMP work on the compute thread, FIFO expected seconds of expert fetches through the
pool, SYNC reads on the compute thread, EPRE expected seconds of the expert reads the routing
predictor queues ahead, HAZ -log(chance that no expert of the layer is fetched).
"""

from math import exp

PRE, COPY, COMP, FIFO, SYNC, EPRE, HAZ = range(7)
COLS = 7
TIME = slice(0, 6)  # the columns that are seconds


def _sync(now: float, seconds: float, ready: list, free: float) -> tuple:
    """A read on the compute thread at `now`, sharing the disk with the pool's queue: (its end, the queue's new end).

    Queued reads (ready times in `ready`, changed in place) lose the share the compute thread's read takes.
    """
    backlog = free - now if free > now else 0.0
    for k, t in enumerate(ready):
        if t is not None and t > now:
            ready[k] = t + min(t - now, seconds)
    return now + seconds + min(backlog, seconds), max(free, now) + seconds


def _token(rows: list, reads: list, ahead: list, nxt: int, gpu: bool, ready: list, free: float,
           predicts: dict, stalls: list | None = None) -> tuple:
    """One forward. `ahead` [L]: the reading layers issue(j) queues; `ready` [L]: when each layer's
    queued reads land (None: not queued), changed in place; `free`: when the disk's queue ends;
    `predicts`: layer -> the layers whose predicted expert reads it queues. Returns (seconds, the queue's end)."""
    L = len(rows) - 2
    now = 0.0
    done = [False] * L  # layers whose reads this token has consumed
    expert_ready = [None] * L  # when each layer's predicted expert reads land (None: not queued)
    for k in ahead[0] if L else ():  # issue(0)
        if ready[k] is None:
            free = (free if free > now else now) + rows[k + 1][PRE]
            ready[k] = free
    e = rows[0]
    if e[SYNC] > 0:
        now, free = _sync(now, e[SYNC], ready, free)
    now += e[COMP] + e[COPY]
    for j in range(L):
        for k in ahead[j]:  # issue(j)
            if ready[k] is None and not done[k]:
                free = (free if free > now else now) + rows[k + 1][PRE]
                ready[k] = free
        r = rows[j + 1]
        for k in ((0, 1) if j == 0 else (j + 1,)) if gpu else (j,):  # gpu: copy(j + 1) lands j+1's reads first
            if k >= L:
                continue
            done[k] = True
            t = ready[k]
            ready[k] = None
            if t is not None and t > now:
                if stalls is not None:
                    stalls[k] += t - now
                now = t
            if gpu:
                now += rows[k + 1][COPY]
        for k in predicts.get(j, ()):  # its router's predictions for later layers join the queue's end
            if rows[k + 1][EPRE] > 0:
                free = (free if free > now else now) + rows[k + 1][EPRE]
                expert_ready[k] = free
        if r[EPRE] > 0:
            t = expert_ready[j]
            if t is None:  # predicted by no earlier layer: read now, behind the queue
                free = (free if free > now else now) + r[EPRE]
                t = free
            if t > now:
                if stalls is not None:
                    stalls[j] += t - now
                now = t
        now += r[COMP]
        if r[FIFO] > 0:  # expert fetches, behind the pool's queue when any is made: waits for reads too
            backlog = free - now if free > now else 0.0
            free = (free if free > now else now) + r[FIFO]
            wait = (1 - exp(-r[HAZ])) * backlog + r[FIFO]
            now += wait
            if stalls is not None:
                stalls[j] += wait
        if r[SYNC] > 0:
            now, free = _sync(now, r[SYNC], ready, free)
    for k in reads[:nxt]:  # issue_next: the next token's first reads
        if ready[k] is None:
            free = (free if free > now else now) + rows[k + 1][PRE]
            ready[k] = free
    h = rows[L + 1]
    if h[SYNC] > 0:
        now, free = _sync(now, h[SYNC], ready, free)
    return now + h[COMP] + h[COPY], free


def replay(rows, depth: int, next_reads: int | None, gpu: bool, steady: bool = True, stalls: list | None = None,
           issuers: list | None = None) -> float:
    """Seconds per forward of the executor's loop over cost rows [b = layers + 2][COLS].

    Args:
        rows: per bucket (0 embedding, 1..L layers, L+1 final norm and lm_head) the columns above.
        depth: the plan's prefetch depth (reads in flight for depth + 1 reading layers).
        next_reads: reading layers queued for the next token during lm_head (plan.next_token_reads);
            None: depth + 1.
        gpu: computing on the gpu (copy(j+1) waits for j+1's reads before j computes).
        steady: a token in the steady state of decoding (after one whose lm_head queued its first
            reads); False: a cold forward (prefill).
        stalls: if given, a list of L zeros that receives the seconds the loop waits for each layer's reads
            (those issued ahead, and its expert fetches).
        issuers: per layer, the layer whose start queues its predicted expert reads (EPRE), -1 for none;
            None: the layer before.
    Returns:
        seconds.
    """
    rows = rows.tolist() if hasattr(rows, "tolist") else [list(r) for r in rows]
    L = len(rows) - 2
    reads = [j for j in range(L) if rows[j + 1][PRE] > 0]
    window = depth + 1
    nxt = window if next_reads is None else next_reads
    ahead, i = [], 0
    for j in range(L):
        while i < len(reads) and reads[i] < j:
            i += 1
        ahead.append(reads[i:i + window])
    predicts = {}
    for j, i in enumerate(range(-1, L - 1) if issuers is None else issuers):
        if 0 <= i < j:
            predicts.setdefault(i, []).append(j)
    ready, free = [None] * L, 0.0
    if steady:
        first, free = _token(rows, reads, ahead, nxt, gpu, ready, free, predicts)
        ready = [None if t is None else t - first for t in ready]
        free -= first
    return _token(rows, reads, ahead, nxt, gpu, ready, free, predicts, stalls)[0]


def serial(rows) -> float:
    """Seconds per forward of a loop that waits for every read (no read-ahead)."""
    return float(sum(sum(r[TIME]) for r in rows))
