"""`expo search`'s generation and rewards on tiny real models and real processes: non-finite logits end a response
and flag it (fp16 overflow, sampled and greedy), the checkpoint's generation_config extras are not applied (and
the record says so), prompts that do not fit the model's positions or render empty are refused before generating,
a causal LM without a score head is refused as a reward model, a reward command that never answers is killed with
its whole process group (on timeout and on interrupt), a reward function must return a real number, and every
scorer's identity changes when its scores could."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time

import pytest
import torch
from helpers import llama_config, save_model, tiny_tokenizer

from expo_engine import rewards
from expo_engine.backends import open_backend
from expo_engine.errors import OptionError, RewardError
from expo_engine.generation import Response, Sampling, render
from expo_engine.rewards import Item, RewardCommand, RewardFunction, RewardModel, open_reward
from expo_engine.sources import open_checkpoint

PROMPTS = ["w10 w11 w12", "w20 w21", "w30", "w40 w41 w42 w43", "w50"]
SAMPLED = Sampling(max_new_tokens=6, samples=2, batch_size=3)
GREEDY = Sampling(max_new_tokens=6, samples=1, batch_size=3, temperature=0.0)
OVERFLOW_ALPHA = 298.0  # the pair's projections are 2x the SFT's; at this alpha 300x, and fp16 activations overflow


def _save_pair(root, sft_model, aligned_model) -> tuple[str, str]:
    folders = []
    for model, name in ((sft_model, "sft"), (aligned_model, "aligned")):
        folder = save_model(model, os.path.join(str(root), name))
        tiny_tokenizer().save_pretrained(folder)
        folders.append(folder)
    return folders[0], folders[1]


@pytest.fixture(scope="module")
def fp16_pair(tmp_path_factory):
    """A tiny fp16 Llama whose aligned side has every projection twice the SFT's: theta(alpha) = (2 + alpha) x SFT
    there, finite weights at any alpha used here, activations that overflow fp16 (NaN logits) at 298."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(7)
    sft = LlamaForCausalLM(llama_config()).to(torch.float16)
    aligned = LlamaForCausalLM(llama_config()).to(torch.float16)
    aligned.load_state_dict(sft.state_dict())
    with torch.no_grad():
        for name, p in aligned.named_parameters():
            if "proj" in name:
                p.mul_(2)
    return _save_pair(tmp_path_factory.mktemp("fp16"), sft, aligned)


def _backend(sft: str, aligned: str):
    return open_backend("transformers", open_checkpoint(sft), open_checkpoint(aligned), "cpu", 1 << 20)


@pytest.fixture(scope="module")
def fp16_backend(fp16_pair):
    return _backend(*fp16_pair)


def test_response_keeps_its_fields_and_defaults_to_finite():
    r = Response("w7", 2, False)
    assert (r.text, r.tokens, r.truncated, r.nonfinite) == ("w7", 2, False, False)


@pytest.mark.parametrize("sampling", [SAMPLED, GREEDY], ids=["sampled", "greedy"])
def test_nonfinite_logits_end_every_response_and_flag_it(fp16_backend, sampling):
    """Before: sampling crashed in torch.multinomial ("probability tensor contains either inf, nan or element <
    0"); greedy decoding gave empty, truncated responses that looked like a model that says nothing."""
    model = fp16_backend
    assert model.load_weights(0.0) == {}
    fine = [r for rs in model.generate(PROMPTS, sampling) for r in rs]
    assert not any(r.nonfinite for r in fine) and all(r.tokens > 0 for r in fine)
    assert model.load_weights(OVERFLOW_ALPHA) == {}  # the weights are finite: only the logits tell
    broken = [r for rs in model.generate(PROMPTS, sampling) for r in rs]
    assert len(broken) == len(PROMPTS) * sampling.samples
    assert all(r.nonfinite and r.tokens == 1 and not r.truncated and r.text == "" for r in broken)
    model.load_weights(0.0)
    assert [r for rs in model.generate(PROMPTS, sampling) for r in rs] == fine  # nothing left behind


@pytest.mark.parametrize("sampling", [SAMPLED, GREEDY], ids=["sampled", "greedy"])
def test_only_the_rows_with_nonfinite_logits_are_flagged(fp16_backend, sampling):
    """An Inf in the embedding row of w30 breaks the prompts that hold w30 at their first step, a response that
    generates w30 at the step after it (it ends there, flagged), and nothing else: the other responses are those of
    the intact model, the same random numbers included."""
    model = fp16_backend
    model.load_weights(0.0)
    prompts = PROMPTS + ["w30 w31 w32", "w60 w61"]
    fine = model.generate(prompts, sampling)
    embed = model.model.get_input_embeddings().weight
    with torch.no_grad():
        embed[30, 3] = float("inf")
    try:
        mixed = model.generate(prompts, sampling)
    finally:
        model.load_weights(0.0)
    broken_mid = 0
    for p, before, after in zip(prompts, fine, mixed, strict=True):
        if "w30" in p.split():
            assert all(r.nonfinite and r.tokens == 1 and r.text == "" for r in after), p
            continue
        for b, a in zip(before, after, strict=True):
            words = b.text.split()
            i = words.index("w30") if "w30" in words else None
            if i is None or (i == len(words) - 1 and b.truncated):  # w30 never fed back into the model
                assert a == b, p
            else:
                assert a.nonfinite and not a.truncated and a.text.split() == words[:i + 1], (p, b, a)
                broken_mid += 1
    assert broken_mid or sampling is GREEDY


@pytest.fixture(scope="module")
def llama_pair_folders(tmp_path_factory):
    from helpers import chat_pair

    return chat_pair(tmp_path_factory.mktemp("chat"))


def test_generation_config_extras_are_not_applied_and_are_recorded(llama_pair_folders, tmp_path):
    """A checkpoint whose generation_config.json sets no_repeat_ngram_size, min_new_tokens, suppress_tokens and
    repetition_penalty generates exactly what the same checkpoint without them does; the record lists them as
    ignored and names what was applied. Before, they changed the responses without a word."""
    sft, aligned = llama_pair_folders
    extras = shutil.copytree(aligned, tmp_path / "aligned-extras")
    with open(extras / "generation_config.json") as f:
        config = json.load(f)
    config |= {"no_repeat_ngram_size": 1, "min_new_tokens": 6, "suppress_tokens": list(range(4, 70)),
               "repetition_penalty": 1.8, "temperature": 1.3, "top_k": 5}
    with open(extras / "generation_config.json", "w") as f:
        json.dump(config, f)
    plain, other = _backend(sft, aligned), _backend(sft, str(extras))
    for model in (plain, other):
        model.load_weights(0.5)
    for sampling in (SAMPLED, GREEDY):
        assert other.generate(PROMPTS, sampling) == plain.generate(PROMPTS, sampling)
    record = other.generation_record(SAMPLED)
    json.dumps(record)
    assert record["ignored_generation_config"] == sorted(["no_repeat_ngram_size", "min_new_tokens",
                                                          "suppress_tokens", "repetition_penalty", "temperature",
                                                          "top_k"])
    assert plain.generation_record()["ignored_generation_config"] == []
    assert record["eos_token_id"] == [2] and record["pad_token_id"] == 0
    assert record["generate"] == {"eos_token_id": [2], "pad_token_id": 0, "max_new_tokens": 6,
                                  "num_return_sequences": 2, "do_sample": True, "temperature": 0.7, "top_p": 1.0,
                                  "top_k": 0}
    assert plain.generation_record(GREEDY)["generate"]["do_sample"] is False
    assert "temperature" not in plain.generation_record(GREEDY)["generate"]


@pytest.fixture(scope="module")
def gpt2_backend(tmp_path_factory):
    """A tiny GPT-2 with 16 positions (n_positions): past them its position embedding raises IndexError."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(11)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=16, bos_token_id=1,
                     eos_token_id=2, pad_token_id=0)
    sft, aligned = GPT2LMHeadModel(cfg), GPT2LMHeadModel(cfg)
    return _backend(*_save_pair(tmp_path_factory.mktemp("gpt2"), sft, aligned))


def test_prompt_plus_max_new_tokens_beyond_the_positions_is_refused_before_generating(gpt2_backend):
    model = gpt2_backend
    texts = ["w10 w11", " ".join(f"w{i}" for i in range(20, 30)), "w40"]  # the second: 10 tokens
    model.check_lengths(texts, 6)  # 16 positions: fits exactly
    for call in (lambda: model.check_lengths(texts, 8), lambda: model.generate(texts, Sampling(max_new_tokens=8))):
        with pytest.raises(OptionError) as e:
            call()
        msg = str(e.value)
        assert "prompt 2 is 10 tokens" in msg and "16" in msg and "n_positions" in msg, msg
        assert "--max-new-tokens 6 or less" in msg and "\n" not in msg, msg
    with pytest.raises(OptionError, match="prompt 1 is 17 tokens.*shorten it"):
        model.check_lengths([" ".join(f"w{i}" for i in range(20, 37))], 1)


def test_an_empty_rendered_prompt_is_refused_with_its_number(gpt2_backend):
    model = gpt2_backend
    texts = [render(model.tokenizer, p, m, False) for p, m in
             (("w10", None), (None, [{"role": "user", "content": ""}]), ("", None))]
    for call in (lambda: model.check_lengths(texts, 4), lambda: model.generate(texts, Sampling(max_new_tokens=4))):
        with pytest.raises(OptionError, match="prompt 2 is empty once rendered"):
            call()
    with pytest.raises(OptionError, match="prompt 3 is empty"):
        model.check_lengths([texts[0], "w11", texts[2]], 4)


# --- rewards ------------------------------------------------------------------------------------------------------

def test_a_causal_lm_without_a_score_head_is_refused_as_a_reward_model(tmp_path):
    """Before: transformers started its score head at random, and alpha was chosen on noise."""
    from transformers import AutoModelForCausalLM, LlamaForSequenceClassification

    lm = str(tmp_path / "lm")
    AutoModelForCausalLM.from_config(llama_config()).save_pretrained(lm)
    tiny_tokenizer().save_pretrained(lm)
    with pytest.raises(OptionError) as e:
        open_reward(model=lm)
    msg = str(e.value)
    assert lm in msg and "no score head" in msg and "score.weight" in msg and "AutoModelForSequenceClassification" \
        in msg and "\n" not in msg, msg

    cfg = llama_config()
    cfg.num_labels, cfg.pad_token_id = 1, 0
    rm = str(tmp_path / "rm")
    LlamaForSequenceClassification(cfg).save_pretrained(rm)
    tiny_tokenizer().save_pretrained(rm)
    model = RewardModel(rm, "cpu", batch_size=2)
    lines = []
    rewards_items = [Item(p, None, "w7 w8") for p in PROMPTS]
    scores = model.score(rewards_items, on_progress=lines.append)
    assert len(scores) == len(PROMPTS) and lines == []  # throttled: under 10 s, no line
    first = model.identity()
    json.dumps(first)
    assert model.identity() == first
    with open(os.path.join(rm, "tokenizer_config.json")) as f:
        tok = json.load(f)
    tok["chat_template"] = "{% for m in messages %}{{ m['content'] }} w9 {% endfor %}"
    with open(os.path.join(rm, "tokenizer_config.json"), "w") as f:
        json.dump(tok, f)
    assert RewardModel(rm, "cpu").identity() != first


def _group_alive(pgid: int) -> list[int]:
    """The processes of group `pgid` that still run (zombies, dead but not yet reaped by init, do not count)."""
    alive = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(pid))
    return alive


def _pgid_from(path, wait: float = 10.0) -> int:
    deadline = time.monotonic() + wait
    while not (os.path.exists(path) and open(path).read().strip()):
        assert time.monotonic() < deadline, "the command never started"
        time.sleep(0.05)
    return int(open(path).read())


@pytest.mark.parametrize("body", ["sleep 1000",
                                  # a child that ignores SIGTERM, in the background, and the shell waiting on it
                                  "(trap '' TERM; sleep 1000) & sleep 1000; wait"], ids=["sleep", "child"])
def test_a_reward_command_that_never_answers_is_killed_with_its_group(tmp_path, body):
    pidfile = tmp_path / "pgid"
    cmd = RewardCommand(f"echo $$ > {pidfile}; {body}", timeout=1.0)
    started = time.monotonic()
    with pytest.raises(RewardError) as e:
        cmd.score([Item("p", None, "r")] * 3)
    took = time.monotonic() - started
    msg = str(e.value)
    assert "waited 1 s for its first score" in msg and "--reward-timeout" in msg and "\n" not in msg, msg
    assert took < 1.0 + rewards.KILL_GRACE_SECONDS + 3, took
    pgid = _pgid_from(pidfile)
    deadline = time.monotonic() + 5
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _group_alive(pgid) == []


def test_what_an_answered_command_left_running_is_stopped(tmp_path):
    """A command that answers but leaves a child running (a server it started, stderr still open): the score
    comes back at once, and the child is gone after it: one would pile up per alpha."""
    pidfile = tmp_path / "pgid"
    cmd = RewardCommand(f"echo $$ > {pidfile}; sleep 1000 > /dev/null & cat > /dev/null; echo 0.5; echo 1.5",
                        timeout=30)
    started = time.monotonic()
    assert cmd.score([Item("p", None, "r")] * 2) == [0.5, 1.5]
    assert time.monotonic() - started < rewards.KILL_GRACE_SECONDS + 3
    assert _group_alive(_pgid_from(pidfile)) == []


def test_an_interrupted_search_kills_the_reward_commands_group(tmp_path):
    """KeyboardInterrupt (the CLI's SIGTERM) while the command runs: its whole group is killed before the
    interrupt goes on. Before, the command's child was left running."""
    pidfile = tmp_path / "pgid"
    cmd = RewardCommand(f"echo $$ > {pidfile}; (trap '' TERM; sleep 1000) & sleep 1000", timeout=None)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        with pytest.raises(KeyboardInterrupt):
            cmd.score([Item("p", None, "r")])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    pgid = _pgid_from(pidfile)
    deadline = time.monotonic() + 5
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _group_alive(pgid) == []


def test_the_timeout_is_per_line_and_progress_is_reported(tmp_path, monkeypatch):
    """A command that prints a score every 0.4 s runs 2 s in all under a 1.5 s timeout: the clock restarts with
    each line. While it runs, progress lines come (here every 0.2 s, PROGRESS_SECONDS patched)."""
    monkeypatch.setattr(rewards, "PROGRESS_SECONDS", 0.2)
    script = tmp_path / "slow.py"
    script.write_text("import sys, time\nfor line in sys.stdin:\n    time.sleep(0.4)\n    print(0.5, flush=True)\n")
    cmd = RewardCommand(f"{sys.executable} {script}", timeout=1.5)
    lines = []
    assert cmd.score([Item("p", None, "r")] * 5, on_progress=lines.append) == [0.5] * 5
    assert lines and all(line.startswith("reward command: ") and "/5 score(s) after" in line for line in lines)
    first = cmd.identity()
    assert first == {"kind": "command", "cmd": cmd.cmd, "files": [[sys.executable, first["files"][0][1]],
                                                                   [str(script), first["files"][1][1]]]}
    script.write_text(script.read_text() + "# edited\n")
    assert cmd.identity() != first


def _reward_module(tmp_path, monkeypatch, body: str, name: str):
    path = tmp_path / f"{name}.py"
    path.write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)
    return path


@pytest.mark.parametrize("value,ok", [("'0.5'", False), ("True", False), ("numpy.True_", False), ("None", False),
                                      ("[0.5]", False), ("1", True), ("0.25", True), ("numpy.float32(0.25)", True),
                                      ("numpy.int64(2)", True), ("torch.tensor(0.25)", True),
                                      ("torch.tensor([0.25])", False), ("torch.tensor(True)", False)])
def test_a_reward_function_must_return_a_real_number(tmp_path, monkeypatch, value, ok):
    name = f"gen_rewards_{abs(hash(value))}"  # a module of its own per value: no stale bytecode
    _reward_module(tmp_path, monkeypatch, f"import numpy, torch\n\ndef f(prompt, response):\n    return {value}\n",
                   name)
    fn = RewardFunction(f"{name}:f")
    items = [Item("p", None, "r")] * 2
    if ok:
        assert fn.score(items) == [float(eval(value, {"numpy": __import__("numpy"), "torch": torch}))] * 2
        return
    with pytest.raises(RewardError) as e:
        fn.score(items)
    msg = str(e.value)
    assert f"function {name}:f returned" in msg and "for response 1" in msg and "real number" in msg, msg
    assert "\n" not in msg, msg


def test_a_reward_functions_identity_follows_its_source(tmp_path, monkeypatch):
    path = _reward_module(tmp_path, monkeypatch, "def f(prompt, response):\n    return 1.0\n", "gen_rewards_id")
    first = RewardFunction("gen_rewards_id:f").identity()
    json.dumps(first)
    assert first["kind"] == "function" and first["spec"] == "gen_rewards_id:f"
    assert [p for p, _ in first["files"]] == [str(path)]
    path.write_text("def f(prompt, response):\n    return 2.0\n")
    assert RewardFunction("gen_rewards_id:f").identity() != first


def test_open_reward_passes_the_timeout(tmp_path):
    assert open_reward(cmd="cat", timeout=5).timeout == 5
    assert open_reward(cmd="cat").timeout == rewards.DEFAULT_REWARD_TIMEOUT
    assert open_reward(cmd="cat", timeout=None).timeout is None
    with pytest.raises(OptionError, match="--reward-timeout must be a positive"):
        open_reward(cmd="cat", timeout=0)


def test_a_commands_identity_names_its_script_through_shell_syntax(tmp_path, monkeypatch):
    """A script behind a pipe, a `cd` or a `bash -c`, or a $VARIABLE: still hashed, so an edit changes the resume
    key. A command naming no file has no files (search then says so)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    script = tmp_path / "sub" / "judge.py"
    script.write_text("print(1)\n")
    monkeypatch.setenv("JUDGE_DIR", str(tmp_path / "sub"))
    for cmd in ("python3 sub/judge.py|cat", "cd sub && python3 judge.py", "bash -c 'python3 sub/judge.py'",
                "python3 $JUDGE_DIR/judge.py"):
        before = RewardCommand(cmd).identity()
        assert before["files"], cmd
        script.write_text("print(2)\n")
        assert RewardCommand(cmd).identity() != before, cmd
        script.write_text("print(1)\n")
    assert RewardCommand("echo 1").identity()["files"] == []


def test_a_command_whose_background_child_holds_stdout_is_done_once_it_has_answered(tmp_path, monkeypatch):
    """The shell prints every score and exits, leaving a child that keeps stdout open (a server started with &):
    the scores are taken at once, not after --reward-timeout, and the child is stopped."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bg.sh").write_text("while read -r line; do echo 1; done\nsleep 300 &\n")
    cmd = RewardCommand("sh bg.sh", timeout=30)
    started = time.monotonic()
    assert cmd.score([Item("p", None, "r")] * 3) == [1.0, 1.0, 1.0]
    assert time.monotonic() - started < 10
