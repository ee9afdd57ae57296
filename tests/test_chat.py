"""The chat REPL, through its Python API and in a real terminal (tmux)."""

import shutil
import subprocess
import sys
import time

import pytest

import hetero
from hetero.chat import ChatSession, repl
from hetero.errors import HeteroError
from hetero.generate import SamplingParams


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return hetero.load_offloaded(smollm2_dir, ram="1GB", context=1024)


def _params(m, n=24):
    return SamplingParams(max_new_tokens=n, eos_token_ids=frozenset(m.tokenizer.eos_token_ids))


def test_multi_turn_history_clear_and_stats(smol):
    s = ChatSession(smol, _params(smol))
    answer = "".join(s.send("What is the capital of France?"))
    assert "Paris" in answer
    assert [m["role"] for m in s.messages] == ["user", "assistant"] and s.messages[1]["content"] == answer
    "".join(s.send("And of Italy?"))
    assert len(s.messages) == 4
    # the second prompt carried the first exchange
    prompt = smol.tokenizer.apply_chat_template(s.messages[:3], add_generation_prompt=True)
    assert "capital of France" in prompt and "And of Italy?" in prompt
    assert s.command("/stats")[0].startswith("prefill:")
    assert s.command("/clear") == ("conversation cleared", False) and s.messages == []
    assert s.command("/nope")[0].startswith("unknown command")
    assert s.command("/exit") == ("", True)


def test_old_turns_are_dropped_when_the_context_is_full(smol):
    s = ChatSession(smol, _params(smol, n=8))
    long = "tell me about the sea " * 60  # ~360 tokens a turn; the context holds 1024
    for _ in range(4):
        "".join(s.send(long))
    assert s.dropped_turns > 0 and len(s.messages) < 8
    with pytest.raises(HeteroError, match="does not fit"):
        "".join(s.send("word " * 2000))
    assert s.messages[-1]["role"] == "assistant"  # the refused message left no trace


def test_a_paged_kv_cache_keeps_the_turns_past_its_device_share(smollm2_dir):
    m = hetero.load_offloaded(smollm2_dir, ram="1GB", context=2048, kv_budget="17MB")
    assert m.plan.kv_tokens < 600 and m.context_tokens == 2048
    s = ChatSession(m, _params(m, n=4))
    for _ in range(2):
        "".join(s.send("tell me about the sea " * 60))  # ~360 tokens a turn
    assert s.dropped_turns == 0 and len(s.messages) == 4
    assert len(m.encode_prompt(s.messages)) > m.plan.kv_tokens


def test_repl_loop_with_scripted_input(smol):
    lines = iter(["/help", "What is the capital of France?", "/exit"])
    out = []
    repl(ChatSession(smol, _params(smol)), read=lambda _p: next(lines), write=out.append, flush=lambda: None)
    text = "".join(out)
    assert "/clear" in text and "Paris" in text


def test_repl_ctrl_c_keeps_the_session_and_ctrl_d_leaves(smol):
    s = ChatSession(smol, _params(smol))
    events = iter(["hello", KeyboardInterrupt, "What is the capital of France?", EOFError])

    def read(_prompt):
        e = next(events)
        if isinstance(e, type):
            raise e()
        return e

    out = []
    repl(s, read=read, write=out.append, flush=lambda: None)
    assert "Paris" in "".join(out) and len(s.messages) == 4


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_chat_in_a_real_terminal(smollm2_dir, tmp_path):
    session = f"hetero-test-{time.monotonic_ns()}"
    cmd = f"{sys.executable} -m hetero chat {smollm2_dir} --ram 1GB --max-tokens 400 --quiet"

    def pane() -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", session, "-S", "-200"],
                              capture_output=True, text=True).stdout

    def wait_for(pred, timeout=120):
        end = time.time() + timeout
        while time.time() < end:
            text = pane()
            if pred(text):
                return text
            time.sleep(0.3)
        raise AssertionError("terminal never showed the expected text:\n" + pane())

    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "50", cmd], check=True)
    try:
        wait_for(lambda t: ">>>" in t)  # capture-pane drops trailing spaces
        subprocess.run(["tmux", "send-keys", "-t", session, "Write a long story about a dragon.", "Enter"], check=True)
        wait_for(lambda t: len(t.split("dragon.", 1)[-1].strip()) > 40)  # the answer is streaming
        subprocess.run(["tmux", "send-keys", "-t", session, "C-c"], check=True)
        wait_for(lambda t: "(stopped)" in t and t.rstrip().endswith(">>>"))
        subprocess.run(["tmux", "send-keys", "-t", session, "What is the capital of France?", "Enter"], check=True)
        wait_for(lambda t: "Paris" in t.split("France?", 1)[-1] and t.rstrip().endswith(">>>"))
        subprocess.run(["tmux", "send-keys", "-t", session, "C-d"], check=True)
        end = time.time() + 20
        while time.time() < end and subprocess.run(["tmux", "has-session", "-t", session]).returncode == 0:
            time.sleep(0.2)
        assert subprocess.run(["tmux", "has-session", "-t", session], capture_output=True).returncode != 0
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
