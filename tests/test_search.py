"""`expo search`: weights streamed into a live model (bit-identical to loading `expo extrapolate`'s output), the
alpha strategy, the record and its reports, resuming after a kill, the three reward signals, --write-best."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys

import pytest
import torch
from helpers import assert_user_error, chat_pair, expo_process, llama_config, snapshot, tiny_tokenizer

from expo_engine import extrapolate, search, verify
from expo_engine.generation import Response
from expo_engine.prompts import load_prompts
from expo_engine.search import COARSE, Evaluation, best_of, evaluate, next_alpha
from expo_engine.weights import LiveWeights

TESTS = os.path.dirname(os.path.abspath(__file__))
TIMINGS = ("weights_seconds", "generate_seconds", "tokens_per_second", "score_seconds")


def untimed(record: dict) -> list[dict]:
    """The evaluations without what the clock decides."""
    return [{k: v for k, v in e.items() if k != "seconds" and k not in TIMINGS} for e in record["evaluations"]]


FAST = dict(max_new_tokens=6, device="cpu", batch_size=3, holdout=0)  # held-out prompts: their own tests


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    sft, aligned = chat_pair(root)
    prompts = root / "prompts.txt"
    prompts.write_text("w10 w11 w12\nw20 w21\nw30\nw40 w41 w42 w43\nw50\n")
    return sft, aligned, str(prompts)


@pytest.fixture(autouse=True)
def importable_rewards(monkeypatch):
    monkeypatch.syspath_prepend(TESTS)


# --- the weights --------------------------------------------------------------------------------------------------

def _models():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    yield "llama", lambda: LlamaForCausalLM(llama_config())
    yield "llama-tied", lambda: LlamaForCausalLM(llama_config(tied=True))
    yield "qwen2", lambda: Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                        num_attention_heads=4, num_key_value_heads=2,
                                                        vocab_size=128, max_position_embeddings=64))
    yield "gpt2", lambda: GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128,
                                                     n_positions=64))
    from transformers import MixtralConfig, MixtralForCausalLM

    # an MoE model: transformers 5 loads its per-expert checkpoint tensors renamed, stacked and concatenated
    yield "mixtral", lambda: MixtralForCausalLM(MixtralConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, num_local_experts=3, num_experts_per_tok=2, max_position_embeddings=64))


@pytest.mark.parametrize("arch", [name for name, _ in _models()])
def test_live_weights_equal_loading_the_extrapolated_checkpoint(arch, tmp_path):
    """After update(alpha) every tensor of the live model is bit-identical to what transformers loads from
    `expo extrapolate`'s output for that alpha: several architectures (tied and untied embeddings, biases,
    GPT-2's Conv1D, Mixtral's experts that transformers' loader stacks and concatenates, placed where the
    library's own conversion mapping puts them), both lerp branches, alpha = 0 and a negative alpha, in bf16 and
    fp32."""
    from transformers import AutoModelForCausalLM

    from expo_engine.generation import transformers_placement
    from expo_engine.sources import open_checkpoint

    make = dict(_models())[arch]
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(7)
        sft_model = make().to(dtype)
        aligned_model = make().to(dtype)
        aligned_model.load_state_dict({k: v + 0.01 * torch.randn_like(v) for k, v in sft_model.state_dict().items()})
        sft, aligned = str(tmp_path / f"sft-{dtype}"), str(tmp_path / f"aligned-{dtype}")
        sft_model.save_pretrained(sft)
        aligned_model.save_pretrained(aligned)
        live = AutoModelForCausalLM.from_pretrained(aligned, dtype="auto")
        state = live.state_dict()
        placement = transformers_placement(live, open_checkpoint(aligned), state)
        assert bool(placement) == (arch == "mixtral")
        weights = LiveWeights(sft, aligned, state, chunk_bytes=700, placement=placement)  # many chunks per tensor
        for alpha in (0.3, 2.5, 0.0, -0.5):
            weights.update(alpha)
            out = str(tmp_path / f"out-{dtype}-{alpha}")
            extrapolate(sft, aligned, alpha, out)
            want = AutoModelForCausalLM.from_pretrained(out, dtype="auto").state_dict()
            got = live.state_dict()
            assert set(got) == set(want)
            differ = [k for k in want if not torch.equal(got[k], want[k])]
            assert not differ, (arch, dtype, alpha, differ[:5])
            if alpha:
                assert not torch.equal(got["lm_head.weight"], aligned_model.state_dict()["lm_head.weight"])


def test_live_weights_refuse_a_model_that_does_not_fit(chat):
    """A model loaded in another dtype, or missing a tensor: one MismatchError naming them, nothing updated."""
    from transformers import AutoModelForCausalLM

    from expo_engine import MismatchError

    sft, aligned, _ = chat
    fp32 = AutoModelForCausalLM.from_pretrained(aligned, dtype=torch.float32)
    misfit = r"21 tensor\(s\) of another shape or dtype.*BF16, model \[.*F32[^;]*\. Load"
    with pytest.raises(MismatchError, match=misfit):
        LiveWeights(sft, aligned, fp32.state_dict())
    state = AutoModelForCausalLM.from_pretrained(aligned, dtype="auto").state_dict()
    state.pop("model.norm.weight")
    with pytest.raises(MismatchError, match=r"1 checkpoint tensor\(s\) the model has no tensor for \(model.norm"):
        LiveWeights(sft, aligned, state)


# --- the strategy -------------------------------------------------------------------------------------------------

def _ev(alpha, reward, degenerate=False):
    return Evaluation(alpha, reward, 0.01, 0.5, 10.0, 0.0, degenerate, 0.0)


def _run_strategy(f, budget=8, grid=None):
    evals = {}
    while (a := next_alpha(evals, grid, budget)) is not None:
        reward, degenerate = f(a)
        evals[a] = _ev(a, reward, degenerate)
    return evals


@pytest.mark.parametrize("peak", [0.1, 0.5, 2.0, 8.0])
def test_auto_strategy_finds_the_peak_within_the_budget(peak):
    """On a smooth reward that rises from the aligned model's to a peak at `peak` and falls after it, the auto
    search stays within 8 evaluations and picks an alpha whose reward is within 5% of the gain the best of an
    exhaustive fine grid makes."""
    def f(a):
        return 1.0 + 0.5 * (a / peak) * math.exp(1 - a / peak), False

    evals = _run_strategy(f)
    assert 0.0 in evals and len(evals) <= 8
    grid = [0.01 * 1.05**k for k in range(200)]
    exhaustive = max(f(a)[0] for a in grid)
    assert best_of(evals).reward_mean - 1 >= 0.95 * (exhaustive - 1), (peak, sorted(evals))


def test_auto_strategy_stops_at_degeneration_and_never_picks_it():
    evals = _run_strategy(lambda a: (1 + a, a >= 3))  # better and better, but gibberish from alpha 3 on
    assert 3.0 in evals and 10.0 not in evals  # the coarse sweep stopped at the first degenerate point
    assert best_of(evals).alpha < 3 and not best_of(evals).degenerate


def test_auto_strategy_goes_on_outward_while_the_reward_rises():
    evals = _run_strategy(lambda a: (a, False))
    assert max(evals) > COARSE[-1] and len(evals) == 8


def _dip_then_rise(a):
    """Below the aligned model at small alpha (shorter responses), well above it around alpha 1."""
    return 3.6 - 1.5 * (a / 0.3) * math.exp(1 - a / 0.3) + 2 * a * math.exp(1 - a)


LANDSCAPES = {  # name: (reward(alpha), degenerate(alpha))
    "unimodal at 0.5": (lambda a: 1 + (a / 0.5) * math.exp(1 - a / 0.5), lambda a: False),
    "dip then rise": (_dip_then_rise, lambda a: False),
    "rising until it degenerates at 5": (lambda a: 1 + a, lambda a: a >= 5),
    "every alpha worse than 0": (lambda a: -a, lambda a: False),
    "optimum at 20": (lambda a: (a / 20) * math.exp(1 - a / 20), lambda a: False),
    "optimum at 0.1": (lambda a: 1 + (a / 0.1) * math.exp(1 - a / 0.1), lambda a: False),
}


@pytest.mark.parametrize("name", list(LANDSCAPES))
def test_auto_strategy_on_known_landscapes(name):
    """The default budget of 8 finds at least 90 % of the gain over alpha = 0 that the best non-degenerate alpha of
    an exhaustive fine grid makes (all of it, i.e. alpha 0, when every alpha is worse), and never picks a
    degenerate alpha. The dip: 0.3 is below alpha 0, yet the ladder goes on and finds the rise around 1."""
    reward, degenerate = LANDSCAPES[name]
    evals = _run_strategy(lambda a: (reward(a), degenerate(a)))
    assert len(evals) <= 8 and not best_of(evals).degenerate
    fine = [0.01 * 1.02**k for k in range(420)]  # 0.01 .. ~40
    exhaustive = max(reward(a) for a in fine if not degenerate(a))
    gain = max(exhaustive - reward(0), 0)
    assert best_of(evals).reward_mean - reward(0) >= 0.9 * gain - 1e-12, (name, sorted(evals), best_of(evals))
    if name == "dip then rise":
        assert all(a >= 0.3 for a in evals if a), sorted(evals)  # nothing spent below the ladder's first point


def test_auto_strategy_flat_within_noise_stays_in_budget():
    """A flat landscape with noise: the ladder is walked whole (a decline is not an end), the budget holds."""
    noise = lambda a: 1e-3 * math.sin(1e4 * a)  # noqa: E731
    evals = _run_strategy(lambda a: (1.0 + noise(a), False))
    assert len(evals) == 8 and all(a in evals for a in COARSE)


def test_grid_strategy_is_the_grid_with_the_baseline_first():
    evals = _run_strategy(lambda a: (0.0, False), grid=(0.0, 0.5, 1.0))
    assert list(evals) == [0.0, 0.5, 1.0]


def test_evaluate_pairs_with_the_baseline_and_marks_degeneration():
    base = evaluate(0.0, [1.0, 2.0, 3.0, 4.0], [Response("x", 10, False)] * 4, None, None, 1.0)
    assert base.win_rate_vs_aligned == 0.5 and base.reward_stderr == pytest.approx(math.sqrt(5 / 3 / 4))
    better = evaluate(1.0, [2.0, 2.0, 3.0, 5.0], [Response("x", 12, False)] * 4, [1.0, 2.0, 3.0, 4.0], base, 1.0)
    assert better.win_rate_vs_aligned == (1 + 0.5 + 0.5 + 1) / 4 and not better.degenerate
    cut = evaluate(2.0, [9.0] * 4, [Response("x", 10, True)] * 4, [1.0, 2.0, 3.0, 4.0], base, 1.0)
    long = evaluate(3.0, [9.0] * 4, [Response("x", 30, False)] * 4, [1.0, 2.0, 3.0, 4.0], base, 1.0)
    assert cut.degenerate and long.degenerate
    assert best_of({0.0: base, 1.0: better, 2.0: cut, 3.0: long}).alpha == 1.0


# --- prompts --------------------------------------------------------------------------------------------------

def test_prompts_jsonl_and_text(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "w10 w11"}\n\n{"messages": [{"role": "system", "content": "w4"}, '
                 '{"role": "user", "content": "w20"}]}\n')
    got = load_prompts(str(p))
    assert got[0].text == "w10 w11" and got[0].messages is None
    assert got[1].text == "w20" and got[1].messages[0]["role"] == "system"
    (tmp_path / "t.txt").write_text("w10\nw11 w12\n")
    assert [x.text for x in load_prompts(str(tmp_path / "t.txt"))] == ["w10", "w11 w12"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": 3}\nnot json\n{"prompt": "ok"}\n')
    from expo_engine import OptionError

    with pytest.raises(OptionError, match=r"line\(s\) 1, 2 are not JSON objects"):
        load_prompts(str(tmp_path / "bad.jsonl"))


# --- whole searches -------------------------------------------------------------------------------------------

def test_search_grid_writes_the_record_and_its_reports(chat, tmp_path):
    sft, aligned, prompts = chat
    report = str(tmp_path / "rep")
    before = snapshot(os.path.dirname(sft))
    rec = search(sft, aligned, prompts, report, reward_fn="search_rewards:count_w7", alpha="0.5,2", samples=2,
                 **FAST)
    assert [e["alpha"] for e in rec["evaluations"]] == [0.0, 0.5, 2.0]
    keys = {"alpha", "reward_mean", "reward_stderr", "win_rate_vs_aligned", "mean_length", "truncated_share",
            "degenerate", "seconds", "degenerate_why", *TIMINGS}
    assert all(set(e) == keys for e in rec["evaluations"]) and set(rec["best"]) == keys
    ok = [e for e in rec["evaluations"] if not e["degenerate"]]
    assert rec["best"]["reward_mean"] == max(e["reward_mean"] for e in ok)
    assert rec["evaluations"][0]["win_rate_vs_aligned"] == 0.5
    assert rec["inputs"]["n_prompts"] == 5 and rec["settings"]["sampling"]["samples"] == 2
    with open(os.path.join(report, "search.json")) as f:
        assert json.load(f) == rec
    lines = [json.loads(x) for x in open(os.path.join(report, "responses.jsonl"))]
    assert len(lines) == 3 * 5 * 2 and {x["alpha"] for x in lines} == {0.0, 0.5, 2.0}
    for e in rec["evaluations"]:  # every score is in responses.jsonl: the mean is theirs
        scores = [x["score"] for x in lines if x["alpha"] == e["alpha"]]
        assert e["reward_mean"] == pytest.approx(sum(scores) / len(scores))
    for name in ("search.csv", "search.md", "search.png"):
        assert os.path.getsize(os.path.join(report, name)) > 0
    assert snapshot(os.path.dirname(sft)) == before  # nothing written beside the report: no checkpoint per alpha
    # alpha = 0 is the aligned model itself: the same responses as sampling from it directly would give
    base = [x["response"] for x in lines if x["alpha"] == 0.0]
    again = search(sft, aligned, prompts, str(tmp_path / "rep2"), reward_fn="search_rewards:count_w7", alpha="0.5",
                   samples=2, **FAST)
    lines2 = [json.loads(x) for x in open(os.path.join(tmp_path / "rep2", "responses.jsonl"))]
    assert [x["response"] for x in lines2 if x["alpha"] == 0.0] == base
    assert untimed(again)[:2] == untimed(rec)[:2]


def test_search_responses_differ_between_alphas_but_not_their_random_numbers(chat, tmp_path):
    """The weights really change per alpha (responses differ somewhere), and a repeated alpha gives the same
    responses (common random numbers: the generator is reseeded per batch)."""
    sft, aligned, prompts = chat
    search(sft, aligned, prompts, str(tmp_path / "a"), reward_fn="search_rewards:count_w7", alpha="4", **FAST)
    search(sft, aligned, prompts, str(tmp_path / "b"), reward_fn="search_rewards:count_w7", alpha="4", seed=42,
           **FAST)
    read = lambda d: [json.loads(x) for x in open(os.path.join(tmp_path, d, "responses.jsonl"))]  # noqa: E731
    a, b = read("a"), read("b")
    assert a == [{**x, "score": x["score"]} for x in b]
    at = lambda rows, alpha: [x["response"] for x in rows if x["alpha"] == alpha]  # noqa: E731
    assert at(a, 0.0) != at(a, 4.0)


def test_search_resumes_after_a_kill(chat, tmp_path):
    """A search killed (SIGKILL) while scoring its third alpha: the same command reuses the two evaluations on
    disk, evaluates the rest, and ends with the record an uninterrupted search gives."""
    sft, aligned, prompts = chat
    args = ["search", "--sft", sft, "--aligned", aligned, "--prompts", prompts, "--alpha", "0.5,1,2",
            "--max-new-tokens", "6", "--device", "cpu", "--batch-size", "3", "--holdout", "0"]
    env = {"PYTHONPATH": TESTS, "EXPO_TEST_KILL_COUNT": str(tmp_path / "count"),
           "EXPO_TEST_KILL_AFTER": str(2 * 5 + 1)}
    rep = str(tmp_path / "rep")
    killed = expo_process(*args, "--report", rep, "--reward-fn", "search_rewards:kill_after", env=env,
                          cwd=tmp_path, timeout=300)
    assert killed.returncode == -9, killed.stderr
    with open(os.path.join(rep, "search.json")) as f:
        assert [e["alpha"] for e in json.load(f)["evaluations"]] == [0.0, 0.5]
    env["EXPO_TEST_KILL_AFTER"] = "0"
    again = expo_process(*args, "--report", rep, "--reward-fn", "search_rewards:kill_after", env=env,
                         cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming: 2 evaluation(s) already in" in again.stderr
    assert again.stderr.count("weights in place") == 2  # alpha 1 and 2 only
    whole = str(tmp_path / "whole")
    fresh = expo_process(*args, "--report", whole, "--reward-fn", "search_rewards:count_w7", env=env, cwd=tmp_path,
                         timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    got, want = (json.load(open(os.path.join(d, "search.json"))) for d in (rep, whole))
    assert untimed(got) == untimed(want)
    rows = lambda d: open(os.path.join(d, "responses.jsonl")).read()  # noqa: E731
    assert rows(rep) == rows(whole)


def test_search_cli_table_and_write_best(chat, tmp_path):
    sft, aligned, prompts = chat
    rep, out = str(tmp_path / "rep"), str(tmp_path / "best")
    r = expo_process("search", "--sft", sft, "--aligned", aligned, "--prompts", prompts, "--report", rep,
                     "--reward-cmd", f"{sys.executable} -c \"import sys, json; [print(len(json.loads(x)['response']))"
                     " for x in sys.stdin]\"", "--alpha", "1", "--max-new-tokens", "6", "--device", "cpu",
                     "--write-best", out, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "expo search: 2 evaluation(s); best alpha" in r.stdout and "<- best" in r.stdout
    assert "[2] alpha 1: weights in place" in r.stderr and "[2] alpha 1: reward " in r.stderr
    with open(os.path.join(rep, "search.json"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
        f.seek(0)
        best = json.load(f)["best"]["alpha"]
    with open(os.path.join(out, "expo.json")) as f:
        prov = json.load(f)
    assert prov["search"]["sha256"] == digest and prov["alpha"] == best
    assert verify(out, sft, aligned).ok


def test_search_with_a_reward_model(chat, tmp_path):
    """A real sequence-classification reward model (a tiny Llama with a 1-label head and its own tokenizer) scores
    every response; the same responses score the same in a second search."""
    from transformers import LlamaForSequenceClassification

    sft, aligned, prompts = chat
    cfg = llama_config()
    cfg.num_labels, cfg.pad_token_id = 1, 0
    torch.manual_seed(3)
    rm = str(tmp_path / "rm")
    LlamaForSequenceClassification(cfg).save_pretrained(rm)
    tiny_tokenizer().save_pretrained(rm)
    recs = [search(sft, aligned, prompts, str(tmp_path / f"r{k}"), reward_model=rm, alpha="1", **FAST)
            for k in range(2)]
    assert [e["reward_mean"] for e in recs[0]["evaluations"]] == [e["reward_mean"] for e in recs[1]["evaluations"]]
    assert len({e["reward_mean"] for e in recs[0]["evaluations"]}) == 2  # the two alphas score differently


@pytest.mark.parametrize("reward,needle", [
    (["--reward-fn", "search_rewards:broken"], "search_rewards:broken raised RuntimeError: the reward server is down"),
    (["--reward-fn", "search_rewards:not_a_number"],
     "returned 'high' (str) for response 1; it must return a real number"),
    (["--reward-fn", "no_such_module:f"], "cannot import it"),
    (["--reward-cmd", "echo 1"], "printed 1 number(s) for 4 response(s)"),  # 1 of the 5 prompts held out
    (["--reward-cmd", "exit 3"], "exited with status 3"),
    ([], "give exactly one reward signal"),
    (["--reward-fn", "search_rewards:count_w7", "--reward-cmd", "echo 1"], "give exactly one reward signal"),
])
def test_search_user_errors(chat, tmp_path, reward, needle):
    """A failing reward signal or a wrong option: one line naming it, exit 2, no traceback."""
    sft, aligned, prompts = chat
    r = expo_process("search", "--sft", sft, "--aligned", aligned, "--prompts", prompts, "--report",
                     str(tmp_path / "rep"), *reward, "--alpha", "1", "--max-new-tokens", "4", "--device", "cpu",
                     env={"PYTHONPATH": TESTS}, cwd=tmp_path, timeout=300)
    assert_user_error(r.returncode, r.stderr.splitlines()[-1] + "\n" if r.stderr else "", needle)
    assert "Traceback" not in r.stderr


def test_a_second_search_into_the_same_report_is_refused(chat, tmp_path):
    import fcntl

    from expo_engine import OutputError

    sft, aligned, prompts = chat
    rep = tmp_path / "rep"
    rep.mkdir()
    fd = os.open(rep / ".expo-search.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(OutputError, match="being written by another expo search"):
            search(sft, aligned, prompts, str(rep), reward_fn="search_rewards:count_w7", alpha="1", **FAST)
    finally:
        os.close(fd)



# --- issue 20: wrong choices, lost reports, one-line errors ---------------------------------------------------------

def test_nonfinite_logits_or_weights_make_an_alpha_degenerate_and_never_best():
    base = evaluate(0.0, [1.0, 1.0], [Response("x", 10, False)] * 2, None, None, 1.0)
    broken = evaluate(9.0, [9.0, 9.0], [Response("", 0, False, nonfinite=True), Response("x", 10, False)],
                      [1.0, 1.0], base, 1.0)
    assert broken.degenerate and broken.degenerate_why == "non-finite logits in 1 of 2 response(s)"
    overflow = evaluate(8.0, [9.0, 9.0], [Response("x", 10, False)] * 2, [1.0, 1.0], base, 1.0,
                        nonfinite_weights="3 NaN/Inf element(s) in 1 tensor(s): lm_head.weight (3)")
    assert overflow.degenerate and "non-finite weights (3 NaN/Inf" in overflow.degenerate_why
    assert best_of({0.0: base, 9.0: broken, 8.0: overflow}).alpha == 0.0
    assert base.degenerate_why == "" and not base.degenerate


def test_auto_after_a_negative_grid_in_the_same_report():
    """A report holding a grid's negative alphas (the best among them) and then `--alpha auto`: the strategy walks
    alpha >= 0 and ends (it used to fail with `max() arg is an empty sequence`)."""
    evals = {0.0: _ev(0.0, 1.0), -0.5: _ev(-0.5, 5.0)}
    while (a := next_alpha(evals, None, 8)) is not None:
        assert a > 0
        evals[a] = _ev(a, 1.0 - a)
    assert len([a for a in evals if a >= 0]) == 8 and best_of(evals).alpha == -0.5  # negative ones not counted


def test_prompts_with_a_byte_order_mark(tmp_path):
    (tmp_path / "p.txt").write_bytes("\ufeffw10 w11\r\nw12\n".encode())
    assert [p.text for p in load_prompts(str(tmp_path / "p.txt"))] == ["w10 w11", "w12"]
    (tmp_path / "p.jsonl").write_bytes('\ufeff{"prompt": "w10"}\n{"prompt": "w11"}\n'.encode())
    assert [p.text for p in load_prompts(str(tmp_path / "p.jsonl"))] == ["w10", "w11"]


def _fp16_overflowing_pair(root):
    """An fp16 chat pair whose lm_head has one element 60 apart: at alpha 2000 it overflows fp16 (|w| > 65504)."""
    from helpers import llama_pair, save_model

    sft, aligned = llama_pair(dtype=torch.float16, scale=0.05)
    with torch.no_grad():
        sft.lm_head.weight[5, 3] = 0.0
        aligned.lm_head.weight[5, 3] = 60.0
    folders = []
    for model, name in ((sft, "sft"), (aligned, "aligned")):
        folder = save_model(model, os.path.join(str(root), name))
        tiny_tokenizer().save_pretrained(folder)
        folders.append(folder)
    return folders


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_search_never_chooses_an_overflowing_alpha(tmp_path, temperature):
    """fp16 weights that overflow at a large alpha: no crash (sampling) and no empty 'best' (greedy): that alpha is
    degenerate with its reason recorded, and --write-best writes a finite model."""
    sft, aligned = _fp16_overflowing_pair(tmp_path)
    prompts = tmp_path / "p.txt"
    prompts.write_text("w10 w11\nw20\nw30 w31 w32\n")
    rec = search(sft, aligned, str(prompts), str(tmp_path / "rep"), reward_fn="search_rewards:shorter_is_better",
                 alpha="1,2000", temperature=temperature, write_best=str(tmp_path / "best"), **FAST)
    bad = next(e for e in rec["evaluations"] if e["alpha"] == 2000)
    assert bad["degenerate"] and "non-finite weights" in bad["degenerate_why"], bad
    assert "lm_head.weight" in bad["degenerate_why"]
    assert rec["best"]["alpha"] != 2000 and rec["written"]["alpha"] == rec["best"]["alpha"]
    assert verify(str(tmp_path / "best"), sft, aligned).ok


def _grid_search(chat, report, **kw):
    sft, aligned, prompts = chat
    return search(sft, aligned, prompts, str(report), **({"reward_fn": "search_rewards:count_w7", "alpha": "1"}
                                                         | FAST | kw))


def test_a_search_with_other_settings_keeps_the_old_report(chat, tmp_path):
    """Other settings into an existing report: refused without --overwrite (the report untouched); with it, a run
    killed part-way leaves the old report as it was; the same command then finishes and replaces it whole."""
    from expo_engine import OutputError

    sft, aligned, prompts = chat
    rep = tmp_path / "rep"
    _grid_search(chat, rep, seed=1)
    before = snapshot(rep)
    with pytest.raises(OutputError, match="holds a search with other inputs or settings.*pass --overwrite"):
        _grid_search(chat, rep, seed=2)
    assert snapshot(rep) == before
    args = ["search", "--sft", sft, "--aligned", aligned, "--prompts", prompts, "--report", rep, "--alpha", "0.5,1",
            "--max-new-tokens", "6", "--device", "cpu", "--batch-size", "3", "--seed", "2", "--overwrite",
            "--holdout", "0",
            "--reward-fn", "search_rewards:kill_after"]
    env = {"PYTHONPATH": TESTS, "EXPO_TEST_KILL_COUNT": str(tmp_path / "count"), "EXPO_TEST_KILL_AFTER": "7"}
    killed = expo_process(*args, env=env, cwd=tmp_path, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert {k: v for k, v in snapshot(rep).items() if not k.startswith(".expo-search-new")} == before
    env["EXPO_TEST_KILL_AFTER"] = "0"
    done = expo_process(*args, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not os.path.exists(rep / ".expo-search-new")
    fresh = tmp_path / "fresh"
    want = _grid_search(chat, fresh, seed=2, alpha="0.5,1")  # count_w7: kill_after's scores, without the kill
    got = json.load(open(rep / "search.json"))
    assert untimed(got) == untimed(want) and got["settings"]["sampling"]["seed"] == 2 and got["complete"]
    assert open(rep / "responses.jsonl").read() == open(fresh / "responses.jsonl").read()


@pytest.mark.parametrize("edit", ["chat_template", "generation_config", "reward_source"])
def test_the_resume_key_covers_what_changes_the_results(chat, tmp_path, edit):
    """Editing the chat template, generation_config.json or the reward function's source is another search: it is
    not resumed with the stale evaluations (it is refused without --overwrite)."""
    from expo_engine import OutputError

    sft, aligned, prompts = chat
    work = tmp_path / "inputs"
    shutil.copytree(os.path.dirname(aligned), work)
    sft, aligned = str(work / "sft"), str(work / "aligned")
    module = tmp_path / "mod"
    module.mkdir()
    (module / "myreward.py").write_text("def score(prompt, response):\n    return float(len(response))\n")
    sys.path.insert(0, str(module))
    try:
        kw = dict(reward_fn="myreward:score", alpha="1", **FAST)
        rep = str(tmp_path / "rep")
        first = search(sft, aligned, prompts, rep, **kw)
        assert search(sft, aligned, prompts, rep, **kw)["key"] == first["key"]  # unchanged: resumed
        if edit == "chat_template":
            cfg = json.load(open(os.path.join(aligned, "tokenizer_config.json")))
            cfg["chat_template"] = "{% for m in messages %}w9 {{ m['content'] }} {% endfor %}w8"
            json.dump(cfg, open(os.path.join(aligned, "tokenizer_config.json"), "w"))
            for name in ("chat_template.jinja",):
                if os.path.exists(os.path.join(aligned, name)):
                    open(os.path.join(aligned, name), "w").write(cfg["chat_template"])
        elif edit == "generation_config":
            json.dump({"do_sample": True, "repetition_penalty": 3.0},
                      open(os.path.join(aligned, "generation_config.json"), "w"))
        else:
            (module / "myreward.py").write_text("def score(prompt, response):\n    return -float(len(response))\n")
        with pytest.raises(OutputError, match="holds a search with other inputs or settings"):
            search(sft, aligned, prompts, rep, **kw)
    finally:
        sys.path.remove(str(module))
        sys.modules.pop("myreward", None)


@pytest.mark.parametrize("extra,needle", [
    (["--temperature", "0", "--samples", "3"], "--temperature 0 is greedy decoding"),
    (["--temperature", "-1"], "--temperature must be 0 (greedy decoding) or a positive number, not -1"),
    (["--report", "FILE"], "is a file; give a folder"),
    (["--report", "FILE/inside"], "lies inside the file"),
    (["--write-best", "FULL"], "exists and is not empty; pass --overwrite"),
])
def test_search_option_errors_are_one_line_before_any_evaluation(chat, tmp_path, capsys, extra, needle):
    from helpers import run_expo

    sft, aligned, prompts = chat
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "FULL").mkdir()
    (tmp_path / "FULL" / "keep.txt").write_text("x")
    extra = [str(tmp_path / x) if x.startswith(("FILE", "FULL")) else x for x in extra]
    args = ["search", "--sft", sft, "--aligned", aligned, "--prompts", prompts, "--report", str(tmp_path / "rep"),
            "--reward-fn", "search_rewards:count_w7", "--alpha", "1", "--max-new-tokens", "4", "--device", "cpu"]
    if "--report" in extra:
        args = args[:args.index("--report")] + args[args.index("--report") + 2:]
    rc, out, err = run_expo(capsys, *args, *extra)
    assert_user_error(rc, err, needle)
    assert "weights in place" not in err
    assert (tmp_path / "FULL" / "keep.txt").read_text() == "x"


def test_search_drops_a_value_head(tmp_path):
    """A PPO checkpoint with a value head: expo search refuses it with a --drop suggestion, and with --drop it
    searches (and --write-best leaves the head out, as expo extrapolate --drop does)."""
    from safetensors.torch import load_file, save_file

    from expo_engine import MismatchError

    sft, aligned = chat_pair(tmp_path)
    path = os.path.join(aligned, "model.safetensors")
    state = load_file(path)
    state["v_head.summary.weight"] = torch.randn(1, 32, dtype=torch.bfloat16)
    save_file(state, path, metadata={"format": "pt"})
    prompts = tmp_path / "p.txt"
    prompts.write_text("w10 w11\nw20\n")
    with pytest.raises(MismatchError, match=r"--drop '\^v_head\[\.\]'"):
        search(sft, aligned, str(prompts), str(tmp_path / "r0"), reward_fn="search_rewards:count_w7", alpha="1",
               **FAST)
    rec = search(sft, aligned, str(prompts), str(tmp_path / "rep"), reward_fn="search_rewards:count_w7", alpha="1",
                 drop=["^v_head[.]"], write_best=str(tmp_path / "best"), **FAST)
    assert rec["settings"]["drop"] == ["^v_head[.]"] and len(rec["evaluations"]) == 2
    from helpers import load_output

    assert "v_head.summary.weight" not in load_output(str(tmp_path / "best"))


# --- issue 21: the held-out estimate --------------------------------------------------------------------------------

def test_held_out_prompts_never_choose_and_estimate_the_gain(chat, tmp_path):
    """--holdout 0.4 of 5 prompts: 2 seeded prompts are never used to choose alpha; at the end alpha 0 and the
    chosen alpha are evaluated on them, and the record's paired numbers are those of their responses."""
    sft, aligned, prompts = chat
    rep = tmp_path / "rep"
    rec = search(sft, aligned, prompts, str(rep), reward_fn="search_rewards:count_w7", alpha="1,4",
                 **(FAST | {"holdout": 0.4}))
    h = rec["holdout"]
    assert h["n_prompts"] == 2 and h["fraction"] == 0.4 and h["alpha"] == rec["best"]["alpha"]
    rows = [json.loads(x) for x in open(rep / "responses.jsonl")]
    chose = {x["prompt_index"] for x in rows if x["split"] == "select"}
    assert chose.isdisjoint(h["prompt_indices"]) and len(chose) == 3
    held = {a: [x for x in rows if x["split"] == "holdout" and x["alpha"] == a] for a in h["evaluated_alphas"]}
    assert sorted(held) == sorted({0.0, h["alpha"]}) and all(len(v) == 2 for v in held.values())
    assert {x["prompt_index"] for v in held.values() for x in v} == set(h["prompt_indices"])
    diffs = [c["score"] - b["score"] for c, b in zip(held[h["alpha"]], held[0.0], strict=True)]
    assert h["improvement"] == pytest.approx(sum(diffs) / 2)
    assert h["improvement_stderr"] == pytest.approx(math.sqrt(sum((d - sum(diffs) / 2) ** 2 for d in diffs) / 2))
    assert h["win_rate_vs_aligned"] == sum(1 if d > 0 else 0.5 if d == 0 else 0 for d in diffs) / 2
    assert h["baseline_mean_length"] == sum(x["tokens"] for x in held[0.0]) / 2
    assert "Held out: 2 prompt(s) never used to choose alpha" in open(rep / "search.md").read()
    # the same prompts split the same way again (seeded), another seed another way
    assert search(sft, aligned, prompts, str(tmp_path / "again"), reward_fn="search_rewards:count_w7", alpha="1,4",
                  **(FAST | {"holdout": 0.4}))["holdout"]["prompt_indices"] == h["prompt_indices"]


def test_held_out_evaluations_resume_after_a_kill(chat, tmp_path):
    """Killed while the held-out prompts are scored: the same command keeps every evaluation on disk, evaluates
    only what is missing, and ends with the record of an uninterrupted search."""
    sft, aligned, prompts = chat
    args = ["search", "--sft", sft, "--aligned", aligned, "--prompts", prompts, "--alpha", "1,4",
            "--max-new-tokens", "6", "--device", "cpu", "--batch-size", "3", "--holdout", "0.4"]
    # killed at the first score of the best alpha on the held-out prompts: after 3 alphas x 3 prompts that choose
    # and alpha 0 on the 2 held out
    env = {"PYTHONPATH": TESTS, "EXPO_TEST_KILL_COUNT": str(tmp_path / "count"),
           "EXPO_TEST_KILL_AFTER": str(3 * 3 + 2 + 1), "EXPO_TEST_REWARD": "word_sum"}
    rep = str(tmp_path / "rep")
    killed = expo_process(*args, "--report", rep, "--reward-fn", "search_rewards:kill_after", env=env,
                          cwd=tmp_path, timeout=300)
    assert killed.returncode == -9, killed.stderr
    done_before = json.load(open(os.path.join(rep, "search.json")))["holdout"]["evaluated_alphas"]
    assert done_before == [0.0]
    env["EXPO_TEST_KILL_AFTER"] = "0"
    again = expo_process(*args, "--report", rep, "--reward-fn", "search_rewards:kill_after", env=env,
                         cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming: 3 evaluation(s)" in again.stderr and "held out: 2 prompt(s)" in again.stdout
    best = json.load(open(os.path.join(rep, "search.json")))["best"]["alpha"]
    assert best and again.stderr.count("weights in place") == 1  # the best alpha on the held-out prompts
    whole = str(tmp_path / "whole")
    fresh = expo_process(*args, "--report", whole, "--reward-fn", "search_rewards:kill_after", env=env,
                         cwd=tmp_path, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    got, want = (json.load(open(os.path.join(d, "search.json"))) for d in (rep, whole))
    assert got["holdout"] == want["holdout"]
    rows = lambda d: sorted(open(os.path.join(d, "responses.jsonl")).readlines())  # noqa: E731
    assert rows(rep) == rows(whole)


@pytest.mark.parametrize("fraction,needle", [(1.0, "below 1"), (-0.1, "at least 0"), (0.95, "leaves none")])
def test_holdout_option_errors(chat, tmp_path, fraction, needle):
    from expo_engine import OptionError

    sft, aligned, prompts = chat
    with pytest.raises(OptionError, match=needle):
        search(sft, aligned, prompts, str(tmp_path / "rep"), reward_fn="search_rewards:count_w7", alpha="1",
               **(FAST | {"holdout": fraction}))


# --- a demanding user's findings ------------------------------------------------------------------------------------

def test_report_write_best_and_prompts_kept_apart(chat, tmp_path):
    """--write-best into the report folder (or around it) and prompts inside the report folder: refused before
    anything is evaluated, nothing removed."""
    from expo_engine import OptionError

    sft, aligned, prompts = chat
    rep = tmp_path / "rep"
    for best in (rep, tmp_path, rep / "best"):
        with pytest.raises(OptionError, match="--write-best .* and --report .* overlap"):
            search(sft, aligned, prompts, str(rep), reward_fn="search_rewards:count_w7", alpha="1",
                   write_best=str(best), overwrite=True, **FAST)
    inside = tmp_path / "rep2"
    inside.mkdir()
    (inside / "responses.jsonl").write_text(open(prompts).read())
    with pytest.raises(OptionError, match="lies inside the --report folder"):
        search(sft, aligned, str(inside / "responses.jsonl"), str(inside), reward_fn="search_rewards:count_w7",
               alpha="1", **FAST)
    assert (inside / "responses.jsonl").read_text() == open(prompts).read()


def test_a_responses_file_that_is_not_ours_is_kept(chat, tmp_path):
    from expo_engine import OutputError

    sft, aligned, prompts = chat
    rep = tmp_path / "rep"
    rep.mkdir()
    (rep / "responses.jsonl").write_text('{"id": 1, "text": "my own data"}\n')
    with pytest.raises(OutputError, match="holds a responses.jsonl that expo search did not write"):
        search(sft, aligned, prompts, str(rep), reward_fn="search_rewards:count_w7", alpha="1", **FAST)
    assert (rep / "responses.jsonl").read_text() == '{"id": 1, "text": "my own data"}\n'


def test_a_replacement_stopped_while_publishing_is_finished_first(chat, tmp_path):
    """A kill between moving responses.jsonl and search.json of an --overwrite replacement: whatever command comes
    next first finishes that publish, so search.json and responses.jsonl never describe two searches."""
    from expo_engine import OutputError

    rep, new = tmp_path / "rep", tmp_path / "new"
    _grid_search(chat, rep, seed=1)
    _grid_search(chat, new, seed=2, alpha="0.5")
    staged = rep / ".expo-search-new"
    shutil.copytree(new, staged)
    os.replace(staged / "responses.jsonl", rep / "responses.jsonl")  # the state a kill in _publish leaves
    with pytest.raises(OutputError, match="holds a search with other inputs or settings"):
        _grid_search(chat, rep, seed=1)  # the old command: the replacement is finished, then this one refused
    assert not staged.exists()
    assert json.load(open(rep / "search.json")) == json.load(open(new / "search.json"))
    assert open(rep / "responses.jsonl").read() == open(new / "responses.jsonl").read()


def test_a_second_grid_says_it_uses_the_first(chat, tmp_path, capsys):
    lines = []
    rec = _grid_search(chat, tmp_path / "rep", alpha="1,3")
    rec = _grid_search(chat, tmp_path / "rep", alpha="0.5", on_progress=lines.append)
    assert rec["alphas_from_earlier_searches"] == [1.0, 3.0] and rec["settings"]["alpha"] == [0.0, 0.5]
    assert any("also using the evaluation(s) of alpha 1, 3 from an earlier search" in x for x in lines)


def test_search_drop_of_a_shared_tensor_is_refused_before_loading(chat, tmp_path):
    from expo_engine import MismatchError, OptionError

    sft, aligned, prompts = chat
    lines = []
    with pytest.raises((MismatchError, OptionError), match="--drop-shared"):
        search(sft, aligned, prompts, str(tmp_path / "rep"), reward_fn="search_rewards:count_w7", alpha="1",
               drop=["norm"], on_progress=lines.append, **FAST)
    assert not any("loaded" in x for x in lines)


def test_the_same_prompts_from_another_file_resume_and_a_refusal_names_what_differs(chat, tmp_path):
    from expo_engine import OutputError

    sft, aligned, prompts = chat
    copy = tmp_path / "copy.txt"
    shutil.copy(prompts, copy)
    rep = tmp_path / "rep"
    first = _grid_search(chat, rep)
    lines = []
    again = search(sft, aligned, str(copy), str(rep), reward_fn="search_rewards:count_w7", alpha="1",
                   on_progress=lines.append, **FAST)
    assert again["key"] == first["key"] and any("resuming: 2 evaluation(s)" in x for x in lines)
    with pytest.raises(OutputError, match=r"differing: settings\.sampling\)"):
        _grid_search(chat, rep, seed=5)


def test_held_out_rows_are_file_rows_under_limit(chat, tmp_path):
    sft, aligned, _ = chat
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"w{10 + k} w{20 + k}\n\n" for k in range(12)))  # blank lines: rows are 1, 3, 5, ..
    rec = search(sft, aligned, str(prompts), str(tmp_path / "rep"), reward_fn="search_rewards:count_w7", alpha="1",
                 limit=8, **(FAST | {"holdout": 0.25}))
    h = rec["holdout"]
    rows = [json.loads(x) for x in open(tmp_path / "rep" / "responses.jsonl")]
    text = open(prompts).read().splitlines()
    assert len(h["rows"]) == 2 and all(text[r - 1] == x["prompt"] for x in rows for r in [x["row"]])
    assert {x["row"] for x in rows if x["split"] == "holdout"} == set(h["rows"])


def test_auto_after_a_grid_says_the_grid_counts(chat, tmp_path):
    """The key leaves alpha and budget out: an auto search into a grid's report reuses its evaluations, and says
    they count toward --budget (negative alphas do not)."""
    lines = []
    _grid_search(chat, tmp_path / "rep", alpha="-0.5,1,3")
    rec = _grid_search(chat, tmp_path / "rep", alpha="auto", budget=4, on_progress=lines.append)
    assert rec["alphas_from_earlier_searches"] == [-0.5, 1.0, 3.0]
    assert any("grid, which count toward --budget" in x for x in lines)
    assert len([e for e in rec["evaluations"] if e["alpha"] >= 0]) == 4  # 0, 1, 3 and one more


def test_a_hub_dataset_name_is_not_a_path_inside_the_report(chat, tmp_path, monkeypatch):
    from expo_engine import OptionError

    sft, aligned, _ = chat
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OptionError) as e:
        search(sft, aligned, "someorg/somedata", ".", reward_fn="search_rewards:count_w7", alpha="1", **FAST)
    assert "inside the --report folder" not in str(e.value)
