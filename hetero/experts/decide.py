"""Where an expert that is not on the compute device runs, from the machine's measured speeds
(placement.cost.Speeds over the hardware profile), not constants. (How far ahead experts are
prefetched is the cost model's too: placement.cost.lookahead.)

A miss, computing on the gpu, has two ways out:
    "cpu"  compute the expert where its weights are: the tokens' hidden states go to the host, the
           expert runs on the CPU, the result comes back (a disk-homed expert is read into RAM first)
    "gpu"  bring the expert's weights to the gpu (read first when on disk) and compute there
For one decoded token the weights dominate, so "cpu" usually wins; a prefill with many tokens per
expert turns it around (CPU matmul time grows with the tokens, the copy does not). Computing on
the cpu there is one way only: read into RAM and compute.

Shape legend: N tokens routed to the expert, C hidden size, I expert intermediate size.
"""

from ..placement.cost import Speeds, Workload


def ffn_s(sp: Speeds, C: int, I: int, item: int, dtype: str, n: int, overhead: float) -> float:
    """Seconds of one SwiGLU expert over n tokens on `sp`'s device: the weights through the measured
    matvec (gate, up: C wide; down: I wide) or matmul, whichever bounds it."""
    mv = sp.mv(2 * I * C * item, C, dtype, calls=2) + sp.mv(I * C * item, I, dtype)  # gate and up, down
    mm = 2 * n * 3 * I * C / sp.matmul[dtype]
    return max(mv, mm) + overhead


class ExpertCosts:
    """Predicted seconds of serving one missed expert each way, for this model on this machine.

    Args:
        profile: the hardware.Profile.
        compute: "gpu" or "cpu" — the compute tier.
        gpu: what the gpu tier is ("cuda" or "fake-gpu"); None computing on the cpu.
        args: ModelArgs (hidden_size, moe_intermediate_size, model_type).
        dtype: the compute torch dtype.
        stored: bytes of one expert's extent in the pack (what a disk read moves).
        view: the pack stores experts in the compute dtype (no conversion after the read).
        decoder: what decodes them when they are not views (pack.staging_extents), else None.
    """

    def __init__(self, profile, compute: str, gpu: str | None, args, dtype, stored: int, view: bool,
                 decoder: str | None = None):
        self.compute = compute
        self.dev = Speeds(profile, compute, Workload(gpu=gpu))
        self.cpu = self.dev if compute == "cpu" else Speeds(profile, "cpu", Workload(gpu=gpu))
        self.C, self.I = args.hidden_size, args.moe_intermediate_size
        self.item = dtype.itemsize
        self.dtype = str(dtype).replace("torch.", "")
        self.nbytes = 3 * self.C * self.I * self.item
        self.stored, self.view, self.decoder = stored, view, decoder
        self.model_type = args.model_type
        self._memo: dict = {}

    def _dt(self, sp: Speeds) -> str:
        return self.dtype if self.dtype in sp._mv else "float32"

    def _ffn(self, sp: Speeds, n: int) -> float:
        return ffn_s(sp, self.C, self.I, self.item, self._dt(sp), n, sp.family(self.model_type).get("expert", 0.0))

    def read_s(self) -> float:
        """A disk-homed expert read into RAM (its extent through the reader pool, then converted when not a view)."""
        return self.cpu.pool(self.stored) + (0.0 if self.view else self.cpu.decode(self.nbytes, self._dt(self.cpu), self.decoder))

    def copy_s(self) -> float:
        """One expert's weights copied to the gpu."""
        return self.dev.h2d(self.nbytes)

    def options(self, home: str, n: int) -> dict:
        """Seconds of serving a miss each way: {"cpu": ..., "gpu": ...} ("gpu" only computing there).

        Args:
            home: where the expert's weights are now: "cpu" (RAM: its home, or the cpu cache) or "disk".
            n: tokens routed to it.
        """
        key = (home, n)
        if key not in self._memo:
            read = self.read_s() if home == "disk" else 0.0
            out = {"cpu": read + self._ffn(self.cpu, n)}
            if self.compute == "gpu":
                x = n * self.C * self.item  # the tokens' hidden states, there and back
                out["cpu"] += 2 * self.dev.h2d(x)
                out["gpu"] = read + self.copy_s() + self._ffn(self.dev, n)
            self._memo[key] = out
        return self._memo[key]

    def decide(self, home: str, n: int) -> str:
        """"cpu" or "gpu": the faster way to serve a miss of an expert whose weights are on `home`."""
        opts = self.options(home, n)
        return min(opts, key=opts.get)

    def miss_s(self, home: str, n: int = 1) -> float:
        """Predicted seconds of a miss served the faster way (the prefetch queue's order: probability x this)."""
        return min(self.options(home, n).values())
