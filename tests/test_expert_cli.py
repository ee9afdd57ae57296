"""`hetero trace`, `hetero calibrate` and `hetero replay` on tiny random MoE checkpoints, errors included."""

import json

import pytest

from hetero.cli import main
from hetero.experts.predictor import PREDICTOR_FILE, load_predictor
from hetero.experts.recording import TRACE_FILE, sample_text
from hetero.experts.trace import RoutingTrace
from helpers import VOCAB, tiny_checkpoint

LOAD = ["--device", "cpu", "--planner", "greedy", "--dtype", "float32", "-q"]


def _byte_bpe(model_dir, text):
    """A byte-level BPE tokenizer.json within the tiny models' vocabulary, trained on `text`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([text], trainer)
    tok.save(str(model_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """(a tiny Mixtral with a tokenizer, a text file) shared by the tests of this module."""
    tmp = tmp_path_factory.mktemp("expert-cli")
    model_dir, _ = tiny_checkpoint(tmp, "mixtral", num_hidden_layers=4)
    text = sample_text() or "the quick brown fox jumps over the lazy dog. " * 400
    _byte_bpe(model_dir, text[:20000])
    text_file = tmp / "text.txt"
    text_file.write_text(text[20000:60000])
    return model_dir, text_file


def _run(capsys, *args):
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(result, *words):
    code, out, err = result
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def test_trace_then_replay(moe, capsys, tmp_path):
    model_dir, text_file = moe
    code, out, err = _run(capsys, "trace", model_dir, "--text", text_file, "--max-tokens", 300, *LOAD)
    assert code == 0, err
    tr = RoutingTrace.load(model_dir / TRACE_FILE)
    assert tr.num_tokens == 300 and tr.layers == [0, 1, 2, 3] and tr.x is None
    assert tr.meta["expert_bytes"] == 3 * 64 * 96 * 4 and tr.meta["model_type"] == "mixtral"
    assert "expert use over 300 tokens" in out and f"trace written to {model_dir / TRACE_FILE}" in out

    code, out, err = _run(capsys, "replay", model_dir / TRACE_FILE, "--resident", "25%", "--json")
    assert code == 0, err
    res = {r["policy"]: r for r in json.loads(out)["results"]}
    assert list(res) == ["score", "lru", "static", "belady"] and res["belady"]["slots"] == 8
    assert all(r["hits"] <= res["belady"]["hits"] and r["accesses"] == 300 * 4 * 2 for r in res.values())
    code, out, err = _run(capsys, "replay", model_dir / TRACE_FILE, "--policies", "lru,belady", "--scope", "layer")
    assert code == 0 and "lru" in out and "belady" in out and "score" not in out, err

    # --frequencies from a trace of another model is refused
    other = RoutingTrace(3, 1, {0: tr.idx[0][:, :1] % 3}, {0: tr.w[0][:, :1]}).save(tmp_path / "other.safetensors")
    _one_line_error(_run(capsys, "replay", model_dir / TRACE_FILE, "--frequencies", other), "another model")


def test_calibrate_writes_a_predictor_the_runtime_picks_up(moe, capsys):
    model_dir, text_file = moe
    code, out, err = _run(capsys, "calibrate", model_dir, "--text", text_file, "--max-tokens", 600, "--json", *LOAD)
    assert code == 0, err
    res = json.loads(out)
    assert res["tokens"] == 600 and res["eval_tokens"] == 150 and res["path"] == str(model_dir / PREDICTOR_FILE)
    assert sorted(res["recall"]) == ["1", "2", "3"] and sorted(res["recall"]["1"]) == ["1", "2", "3"]
    assert all(0 <= v <= 1 for d in res["recall"].values() for v in d.values())
    from test_predictor import _routers

    args, routers = _routers(model_dir)
    pred = load_predictor(model_dir, routers, 2, 1)
    assert pred.kind == "calibrated"
    # each expert's held-out recall 1 ahead, for every MoE layer some layer predicts: what the cost model reads
    per_expert = pred.meta["heldout_expert_recall"]
    assert sorted(int(t) for t in per_expert) == sorted(routers)[1:]
    assert all(len(row) == args.num_experts and all(0 <= r <= 1 for r in row) for row in per_expert.values())
    code, out, err = _run(capsys, "calibrate", model_dir, "--text", text_file, "--max-tokens", 300, *LOAD)
    assert code == 0 and "average" in out and "predictor written to" in out, err


def test_errors_are_one_line(moe, capsys, tmp_path):
    model_dir, text_file = moe
    _one_line_error(_run(capsys, "trace", model_dir, "--text", tmp_path / "missing.txt", *LOAD), "missing.txt")
    _one_line_error(_run(capsys, "replay", tmp_path / "missing.safetensors"), "no such routing trace")
    _one_line_error(_run(capsys, "replay", model_dir / "config.json"), "unreadable routing trace")
    for bad in ("130%", "0", "lots"):
        _one_line_error(_run(capsys, "replay", tmp_path / "x", "--resident", bad), "--resident")
    _one_line_error(_run(capsys, "replay", tmp_path / "x", "--policies", "fifo"), "--policies")
    dense, _ = tiny_checkpoint(tmp_path, "qwen3")
    _byte_bpe(dense, "some text to learn from, " * 50)
    capsys.readouterr()  # transformers' progress bars of saving the checkpoint
    _one_line_error(_run(capsys, "calibrate", dense, "--text", text_file, *LOAD), "a dense model")
    _one_line_error(_run(capsys, "trace", dense, "--text", text_file, *LOAD), "a dense model")
    # replaying the runtime's way: the trace must keep the MoE inputs, the model must be the trace's MoE
    tr = RoutingTrace(3, 1, {0: [[0], [1]]}, {0: [[1.0], [1.0]]}).save(tmp_path / "no-x.safetensors")
    _one_line_error(_run(capsys, "replay", tr, "--model", model_dir), "--keep-x")
    with_x = RoutingTrace(3, 1, {0: [[0], [1]]}, {0: [[1.0], [1.0]]}, x={0: [[0.0], [1.0]]})
    _one_line_error(_run(capsys, "replay", with_x.save(tmp_path / "x.safetensors"), "--model", dense),
                    "not a mixture-of-experts")
    _one_line_error(_run(capsys, "replay", tmp_path / "x.safetensors", "--model", model_dir), "another model")


def test_replay_the_runtime_way_with_the_model_predictor(moe, capsys, tmp_path):
    model_dir, text_file = moe
    out_file = tmp_path / "trace.safetensors"
    code, out, err = _run(capsys, "trace", model_dir, "--text", text_file, "--max-tokens", 200, "--keep-x",
                          "--out", out_file, *LOAD)
    assert code == 0, err
    code, out, err = _run(capsys, "replay", out_file, "--resident", "25%", "--model", model_dir, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["predictor"] in ("calibrated", "speculative") and res["lookahead"] == 1
    rows = {r["policy"]: r for r in res["results"]}
    assert list(rows) == ["score", "lru", "static", "belady", "score+prefetch", "lru+prefetch", "static+prefetch"]
    for name in ("score", "lru", "static"):
        demand, ahead = rows[name], rows[name + "+prefetch"]
        assert demand["moved_bytes_per_token"] == pytest.approx(demand["miss_bytes_per_token"])
        assert ahead["accesses"] == demand["accesses"]
        assert ahead["moved_bytes_per_token"] >= ahead["miss_bytes_per_token"]  # + the prefetches
    code, out, err = _run(capsys, "replay", out_file, "--model", model_dir, "--policies", "score,belady", "--lookahead", 2)
    assert code == 0 and "score+pre" in out and "belady+pre" not in out and "2 MoE layer(s) ahead" in out, err


def test_side_files_are_not_taken_for_weights():
    from hetero.checkpoint.catalogue import SIDE_FILES

    assert PREDICTOR_FILE in SIDE_FILES and TRACE_FILE in SIDE_FILES


def test_spread_samples_the_whole_text():
    from hetero.experts.recording import spread

    ids = list(range(10_000))
    parts = spread(ids, 2048)
    assert [p[0] for p in parts] == [0, 3162, 6325, 9488] and sum(map(len, parts)) == 2048
    assert parts[-1][-1] == 9999  # the last window ends at the text's end
    assert spread(ids[:100], 2048) == [ids[:100]] and spread(ids, None) == [ids]
