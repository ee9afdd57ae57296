"""The prefetch pipeline: its schedule, bounded staging, what it reads, and I/O errors surfacing cleanly."""

import dataclasses

import pytest
import torch

import hetero
from hetero.api import checkpoint_tensors
from hetero.checkpoint.catalogue import Catalogue
from hetero.errors import HeteroError
from hetero.flash import pack as packs
from hetero.flash.reader import PythonReader
from hetero.placement.plan import Plan, tier_usage

from helpers import generate_in_thread, model_groups, over_budget, spread_plan, tiny_checkpoint


def _with_depth(ckpt, plan: Plan, depth: int, fmt: str = "float32") -> Plan:
    """`plan` at prefetch depth `depth`, with budgets exactly what it commits (pack format `fmt`)."""
    args, groups = model_groups(ckpt)
    cat = Catalogue(ckpt)
    extents = packs.staging_extents(packs.layout(checkpoint_tensors(args, cat), groups, packs.PackFormat.parse(fmt)),
                                    torch.float32)
    plan = dataclasses.replace(plan, depth=depth)
    use = tier_usage(groups, plan, args, torch.float32, extents)
    return dataclasses.replace(plan, budgets={t: sum(use[t].values()) for t in plan.budgets})


def _record(pipe):
    """Log every schedule call of a Prefetcher, with the layers staged after it."""
    log = []
    for op in ("issue", "copy", "take", "release"):
        real = getattr(pipe, op)

        def wrapped(*a, _op=op, _real=real):
            out = _real(*a)
            log.append((_op, a, sorted(k for k in pipe.staged if isinstance(k, int))))
            return out
        setattr(pipe, op, wrapped)
    return log


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_schedule_reads_ahead_and_stays_bounded(tmp_path, depth):
    ckpt, ref = tiny_checkpoint(tmp_path, "llama", num_hidden_layers=6)
    plan = _with_depth(ckpt, spread_plan(ckpt, ("disk",)), depth)
    m = hetero.load_offloaded(ckpt, plan=plan)
    log = _record(m.executor.store.pipe)
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert (m(ids).logits - ref(ids).logits).abs().max().item() <= 1e-4
    takes = [i for i, (op, _, _) in enumerate(log) if op == "take"]
    assert [log[i][1][0] for i in takes] == list(range(6))  # layers computed in order
    for i in takes:
        j, staged = log[i][1][0], log[i][2]
        assert staged == list(range(j, min(j + depth, 5) + 1))  # j's reads and j+1..j+depth in flight
    assert max(len(s) for _, _, s in log) <= depth + 1  # bounded staging
    releases = [a[0] for op, a, _ in log if op == "release"]
    assert releases == list(range(6))
    ahead = m.executor.store.pipe.next_reads  # the next token's reads, queued while lm_head streams
    assert 1 <= ahead <= depth + 1 and sorted(m.executor.store.pipe.staged) == list(range(ahead))
    assert not over_budget(m)
    p = m.executor.store.pack
    held = sum(p.extents[f"layers.{k}.{g}"]["nbytes"] for k in range(ahead) for g in ("attn", "mlp"))
    assert m.accountant.snapshot()["cpu"]["staging_bytes"] == held


def test_reads_run_ahead_over_resident_layers(tmp_path):
    ckpt, _ = tiny_checkpoint(tmp_path, "llama", num_hidden_layers=6)
    base = spread_plan(ckpt, ("cpu",))
    tiers = {g: ("disk" if g.startswith("layers.") and int(g.split(".")[1]) >= 2 else t) for g, t in base.tiers.items()}
    plan = _with_depth(ckpt, dataclasses.replace(base, tiers=tiers), 1)  # layers 0-1 resident, 2-5 on disk
    m = hetero.load_offloaded(ckpt, plan=plan)
    log = _record(m.executor.store.pipe)
    m(torch.tensor([[3, 4, 5]]))
    first = next(s for op, a, s in log if op == "issue" and a == (0,))
    assert first == [2, 3]  # while layers 0 and 1 compute, layers 2 and 3 are already being read
    assert m.executor.store.pipe.next_reads == 2  # lm_head is resident: the next token's reads all fit
    assert not over_budget(m)


def test_resident_weights_are_never_re_read(tmp_path):
    ckpt, _ = tiny_checkpoint(tmp_path, "llama")
    plan = spread_plan(ckpt, ("disk", "cpu"))
    m = hetero.load_offloaded(ckpt, plan=plan)
    p = m.executor.store.pack
    want = 0
    for g, tier in plan.tiers.items():
        if tier != "disk":
            continue
        if g == "lm_head":
            want += p.extents[g]["data_bytes"]
        elif g == "embed":
            want += p.stored_row_bytes("model.embed_tokens.weight")  # one new token's row
        else:
            want += p.extents[g]["nbytes"]
    m.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    s = m.stats()
    assert s["decode_disk_read_bytes_per_token"] == want
    assert s["decode_io_hidden_fraction"] is not None and 0 <= s["decode_io_hidden_fraction"] <= 1
    assert s["decode_disk_read_gbps"] > 0 and s["io"]["prefetch_depth"] == plan.depth


class FailingReader(PythonReader):
    """Fails every read at file offset `bad` with EIO."""

    def __init__(self, bad: int):
        super().__init__()
        self.bad, self.offsets = bad, {}

    def submit(self, fd, buf, offset, checksum=False, urgent=False):
        h = super().submit(fd, buf, offset, checksum, urgent)
        self.offsets[h] = offset
        return h

    def wait(self, handle):
        r = super().wait(handle)
        if self.offsets.pop(handle) == self.bad:
            raise OSError(5, "Input/output error")
        return r


def test_an_io_error_surfaces_from_generate_without_hang_or_leak(tmp_path):
    ckpt, _ = tiny_checkpoint(tmp_path, "llama", num_hidden_layers=4)
    plan = _with_depth(ckpt, spread_plan(ckpt, ("disk",)), 2)
    m = hetero.load_offloaded(ckpt, plan=plan)
    store = m.executor.store
    good = store.reader
    store.reader = FailingReader(store.pack.extents["layers.2.mlp"]["offset"])
    result = generate_in_thread(m)
    assert not result["hung"], "generate hung after an I/O error"
    assert isinstance(result.get("error"), HeteroError)
    assert "layers.2.mlp" in str(result["error"]) and "Input/output error" in str(result["error"])
    assert store.pipe.staged == {} and m.accountant.snapshot()["cpu"]["staging_bytes"] == 0
    store.reader = good  # the model keeps working once reads do
    assert m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2).shape == (1, 5)


def test_python_fallback_reader_gives_identical_logits(tmp_path):
    ckpt, _ = tiny_checkpoint(tmp_path, "qwen2_moe")
    m = hetero.load_offloaded(ckpt, plan=spread_plan(ckpt, ("disk", "cpu")))
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    want = m(ids).logits
    m.executor.store.reader = PythonReader()
    assert torch.equal(m(ids).logits, want)


def test_fake_gpu_int8_pipeline_keeps_its_budgets(tmp_path):
    ckpt, ref = tiny_checkpoint(tmp_path, "mixtral")
    base = spread_plan(ckpt, ("cpu", "gpu", "disk"), compute="gpu", norms="gpu")
    plan = _with_depth(ckpt, base, 2, "int8")
    m = hetero.load_offloaded(ckpt, plan=plan, device="fake-gpu", pack="int8")
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = torch.log_softmax(ref(ids).logits, -1)
    got = torch.log_softmax(m(ids).logits, -1)
    assert (want.exp() * (want - got)).sum(-1).mean().item() < 0.02
    m.generate(ids, max_new_tokens=4, do_sample=False)
    assert not over_budget(m), over_budget(m)
    assert m.accountant.snapshot()["gpu"]["peak_bytes"] > 0
