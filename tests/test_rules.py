"""Per-tensor alpha rules: which tensors they select (Llama and GPT-2 names), the exact output with each tensor's
alpha, how they combine with sweeps, what expo.json records, --dry-run, and clear refusals of bad rules."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import LAYERS, cli_args, load_output, make_pair, refused, run_cli, unchanged, worst_steps

from expo_engine import OptionError, extrapolate, extrapolate_sweep, make_plan, open_checkpoint
from expo_engine.rules import load_rules, parse_rule, resolve

LLAMA = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"] + [
    f"model.layers.{i}.{m}" for i in range(4) for m in (
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
        "post_attention_layernorm.weight")]
GPT2 = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"] + [
    f"transformer.h.{i}.{m}" for i in range(12) for m in (
        "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
        "attn.c_proj.bias", "ln_2.weight", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
        "mlp.c_proj.bias")]


def _changed(rules, names, base=0.3) -> dict[str, float]:
    return {n: a for n, a in resolve(tuple(parse_rule(r) for r in rules), names, base).items() if a != base}


def test_embeddings_preset_on_llama_and_gpt2_names():
    assert _changed(["kind:embeddings=0"], LLAMA) == {"model.embed_tokens.weight": 0, "lm_head.weight": 0}
    assert _changed(["kind:embeddings=0"], GPT2) == {"transformer.wte.weight": 0, "transformer.wpe.weight": 0}


@pytest.mark.parametrize("names, rule, selected", [
    (LLAMA, "kind:q=0.1", {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(4)}),
    (LLAMA, "kind:mlp=0.1", {f"model.layers.{i}.mlp.{m}_proj.weight" for i in range(4)
                             for m in ("gate", "up", "down")}),
    (LLAMA, "kind:norm=0.1", {"model.norm.weight"} | {f"model.layers.{i}.{m}_layernorm.weight" for i in range(4)
                                                     for m in ("input", "post_attention")}),
    (LLAMA, "kind:head=0.1", {"lm_head.weight"}),
    (GPT2, "kind:qkv=0.1", {f"transformer.h.{i}.attn.c_attn.{p}" for i in range(12) for p in ("weight", "bias")}),
    (GPT2, "kind:o=0.1", {f"transformer.h.{i}.attn.c_proj.{p}" for i in range(12) for p in ("weight", "bias")}),
    (GPT2, "kind:mlp=0.1", {f"transformer.h.{i}.mlp.{m}.{p}" for i in range(12) for m in ("c_fc", "c_proj")
                            for p in ("weight", "bias")}),
    (GPT2, r"\.bias$=0.1", {n for n in GPT2 if n.endswith(".bias")}),
    (GPT2, r"h\.1[01]\.=0.1", {n for n in GPT2 if ".h.10." in n or ".h.11." in n}),
])
def test_kinds_and_patterns_select_the_right_tensors(names, rule, selected):
    assert set(_changed([rule], names)) == selected


def test_first_match_wins_and_multipliers_follow_the_base():
    rules = ["kind:mlp=x0.5", r"layers\.1\.=0.9", "kind:embeddings=0"]
    got = resolve(tuple(parse_rule(r) for r in rules), LLAMA, 0.4)
    assert got["model.layers.1.mlp.up_proj.weight"] == pytest.approx(0.2)  # the earlier mlp rule wins
    assert got["model.layers.1.self_attn.q_proj.weight"] == 0.9
    assert got["model.layers.0.self_attn.q_proj.weight"] == 0.4  # no rule: the base
    assert got["lm_head.weight"] == 0


def test_ramp_over_layers():
    rules = load_rules_from([{"kind": "embeddings", "alpha": 0}, {"ramp": [0.0, 1.1]}])
    got = resolve(rules, GPT2, 0.3)
    for i in range(12):
        assert got[f"transformer.h.{i}.mlp.c_fc.weight"] == pytest.approx(0.1 * i)
    assert got["transformer.ln_f.weight"] == 0.3 and got["transformer.wte.weight"] == 0  # no layer: base
    scaled = resolve(load_rules_from([{"ramp": ["x0", "x2"]}]), LLAMA, 0.3)  # relative to each sweep point
    assert [scaled[f"model.layers.{i}.mlp.up_proj.weight"] for i in range(4)] == pytest.approx([0, 0.2, 0.4, 0.6])


def load_rules_from(data, tmp=None):
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(data, f)
    try:
        return tuple(load_rules(f.name))
    finally:
        os.remove(f.name)


def test_rules_end_to_end_on_llama_exact_per_tensor(pair, tmp_path):
    """Every element within one output step of the float64 formula with its tensor's alpha; embeddings and head
    bit for bit the aligned ones; expo.json records the rules and every alpha that differs from the base."""
    out = str(tmp_path / "out")
    rules = ["kind:embeddings=0", "mlp=x0.5", r"layers\.1\.self_attn=2.5"]
    s = extrapolate(pair.sft, pair.aligned, 0.4, out, alpha_rules=rules, max_shard_size="30KB", chunk_bytes=1000)
    got = load_output(out)
    alphas = resolve(tuple(parse_rule(r) for r in rules), list(got), 0.4)
    assert len(set(alphas.values())) == 4  # 0, 0.2, 2.5 and the base 0.4
    for name, t in got.items():
        assert worst_steps({name: t}, pair.sft_state, pair.aligned_state, alphas[name]) <= 1, name
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(got[name].view(torch.int16), pair.aligned_state[name].view(torch.int16))
    # control: the base alpha is more than a step off for the tensors the rules changed
    changed = [n for n, a in alphas.items() if a != 0.4]
    assert worst_steps(got, pair.sft_state, pair.aligned_state, 0.4, changed) > 1
    with open(os.path.join(out, "expo.json")) as f:
        prov = json.load(f)
    assert prov["alpha"] == 0.4 and prov["alpha_rules"] == rules
    assert prov["alpha_by_tensor"] == {n: a for n, a in sorted(alphas.items()) if a != 0.4} == s.alpha_overrides
    with open(os.path.join(out, "README.md")) as f:
        assert "`kind:embeddings=0`" in f.read()
    # expo verify takes each tensor's alpha from expo.json
    from expo_engine.verify import verify

    report = verify(out, sft=pair.sft, aligned=pair.aligned)
    assert report.ok and report.elements_checked == sum(t.numel() for t in got.values()), report.problems


def test_rules_on_a_tiny_gpt2(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=128, n_positions=32)
    sft = GPT2LMHeadModel(config)
    aligned = GPT2LMHeadModel(config)
    aligned.load_state_dict(sft.state_dict())
    with torch.no_grad():
        for p in aligned.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    sft.save_pretrained(tmp_path / "sft")
    aligned.save_pretrained(tmp_path / "aligned")
    out = str(tmp_path / "out")
    rules = load_rules_from([{"kind": "embeddings", "alpha": 0}, {"kind": "qkv", "alpha": "x2"},
                             {"ramp": [0.1, 0.5]}])
    extrapolate(str(tmp_path / "sft"), str(tmp_path / "aligned"), 0.3, out, alpha_rules=rules)
    got = load_output(out)
    s_state, a_state = load_output(str(tmp_path / "sft")), load_output(str(tmp_path / "aligned"))
    alphas = resolve(rules, list(got), 0.3)
    assert alphas["transformer.wte.weight"] == alphas["transformer.wpe.weight"] == 0
    assert alphas["transformer.h.2.attn.c_attn.weight"] == pytest.approx(0.6)
    assert alphas["transformer.h.1.mlp.c_fc.weight"] == pytest.approx(0.3)  # the middle of the ramp
    assert alphas["transformer.h.2.ln_1.weight"] == pytest.approx(0.5) and alphas["transformer.ln_f.bias"] == 0.3
    for name, t in got.items():
        assert worst_steps({name: t}, s_state, a_state, alphas[name]) <= 1, name
    assert torch.equal(got["transformer.wte.weight"], a_state["transformer.wte.weight"])


def test_rules_in_a_sweep_numbers_override_multipliers_scale(pair, tmp_path):
    rules = ["kind:embeddings=0", "kind:mlp=x0.5", "kind:q=1.5"]
    s = extrapolate_sweep(pair.sft, pair.aligned, [0.2, 0.6], str(tmp_path / "sweep"), alpha_rules=rules,
                          chunk_bytes=3000)
    for run in s.runs:
        got = load_output(run.out)
        alphas = resolve(tuple(parse_rule(r) for r in rules), list(got), run.alpha)
        assert alphas["model.layers.0.mlp.up_proj.weight"] == pytest.approx(run.alpha / 2)
        assert alphas["model.layers.0.self_attn.q_proj.weight"] == 1.5 and alphas["lm_head.weight"] == 0
        for name, t in got.items():
            assert worst_steps({name: t}, pair.sft_state, pair.aligned_state, alphas[name]) <= 1, name
        with open(os.path.join(run.out, "expo.json")) as f:
            assert json.load(f)["alpha_by_tensor"]["model.layers.0.mlp.up_proj.weight"] == pytest.approx(
                run.alpha / 2)


def test_rules_file_json_and_yaml_equal_the_cli_rules(tmp_path, capsys):
    sft, aligned = make_pair(tmp_path)
    (tmp_path / "r.json").write_text(json.dumps({"rules": [{"kind": "embeddings", "alpha": 0},
                                                           {"pattern": "layers\\.[0-3]\\.", "alpha": "x2"}]}))
    (tmp_path / "r.yaml").write_text("- kind: embeddings\n  alpha: 0\n- pattern: 'layers\\.[0-3]\\.'\n  alpha: x2\n")
    plans = {}
    for how, extra in [("cli", ["--alpha-rule", "kind:embeddings=0", "--alpha-rule", r"layers\.[0-3]\.=x2"]),
                       ("json", ["--alpha-rules", tmp_path / "r.json"]),
                       ("yaml", ["--alpha-rules", tmp_path / "r.yaml"])]:
        rc, out, err = run_cli(capsys, *cli_args(sft, aligned, tmp_path / f"out-{how}", "--dry-run", *extra))
        assert rc == 0, err
        plans[how] = [line.split()[:2] for line in out.splitlines() if line.startswith(("model.", "lm_head"))]
    assert plans["cli"] == plans["json"] == plans["yaml"]
    assert ["lm_head.weight", "0"] in plans["cli"] and ["model.layers.2.mlp.up_proj.weight", "1"] in plans["cli"]
    assert ["model.layers.5.mlp.up_proj.weight", "0.5"] in plans["cli"]


def test_dry_run_prints_the_table_and_writes_nothing(tmp_path, capsys):
    sft, aligned = make_pair(tmp_path)
    out = tmp_path / "new" / "out"
    with unchanged(tmp_path, out):
        rc, stdout, err = run_cli(capsys, *cli_args(sft, aligned, out, "--dry-run", "--alpha-rule", "lm_head=0",
                                                    alpha="0.1,0.3"))
    assert rc == 0, err
    assert not os.path.exists(tmp_path / "new")
    lines = stdout.splitlines()
    assert lines[0].split()[:5] == ["tensor", "alpha", "0.1", "alpha", "0.3"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:] if line.startswith(("model.", "lm_head"))}
    assert len(rows) == LAYERS + 3
    assert rows["lm_head.weight"][:3] == ["0", "0", "BF16"] and rows["model.norm.weight"][:2] == ["0.1", "0.3"]
    assert "nothing was written" in lines[-1] and str(out / "alpha-0.3") in lines[-1]


def test_dry_run_still_refuses_what_a_run_would(tmp_path, capsys):
    sft, aligned = make_pair(tmp_path)
    os.makedirs(tmp_path / "out")
    (tmp_path / "out" / "x").write_text("x")
    refused(capsys, tmp_path, cli_args(sft, aligned, tmp_path / "out", "--dry-run"), "--overwrite")


@pytest.mark.parametrize("rule, needles", [
    ("kind:attention=0", ["'kind:attention=0'", "unknown module kind 'attention'", "embeddings"]),
    ("q_proj=0.2", ["'q_proj=0.2'", "selects no floating-point tensor", "model.embed_tokens.weight"]),
    ("mlp=abc", ["'mlp=abc'", "'abc' is not a number"]),
    ("mlp=nan", ["'mlp=nan'", "not a finite number"]),
    ("mlp=x", ["'mlp=x'", "not a number"]),
    ("mlp(=0.2", ["'mlp(=0.2'", "not a valid regular expression"]),
    ("mlp", ["'mlp'", "PATTERN=VALUE"]),
    ("=0.2", ["PATTERN=VALUE"]),
    ("up_proj=x1e308", ["is not finite", "up_proj"]),
])
def test_bad_rules_are_refused(tmp_path, capsys, rule, needles):
    sft, aligned = make_pair(tmp_path)
    out = tmp_path / "out"
    refused(capsys, tmp_path, cli_args(sft, aligned, out, "--alpha-rule", rule, alpha="1e10"), *needles, out=out)


@pytest.mark.parametrize("content, needles", [
    ('[{"preset": "embeddings", "alpha": 0}]', ["unknown key 'preset'"]),
    ('[{"kind": "embed", "pattern": "x", "alpha": 0}]', ["exactly one of pattern, kind or ramp"]),
    ('[{"pattern": "mlp"}]', ["has no alpha"]),
    ('[{"ramp": [0.1]}]', ["[FIRST, LAST]"]),
    ('[{"ramp": [0.1, "big"]}]', ["'big' is not a number"]),
    ('{"embeddings": 0}', ["expected a list of rules"]),
    ('[{"pattern": "zzz", "alpha": 1}]', ["selects no floating-point tensor"]),
    ("[1, 2", ["not valid JSON"]),
])
def test_bad_rules_files_are_refused(tmp_path, capsys, content, needles):
    sft, aligned = make_pair(tmp_path)
    (tmp_path / "rules.json").write_text(content)
    out = tmp_path / "out"
    refused(capsys, tmp_path, cli_args(sft, aligned, out, "--alpha-rules", tmp_path / "rules.json"), *needles,
            out=out)


def test_missing_rules_file(tmp_path, capsys):
    sft, aligned = make_pair(tmp_path)
    out = tmp_path / "out"
    refused(capsys, tmp_path, cli_args(sft, aligned, out, "--alpha-rules", tmp_path / "none.json"),
            "none.json", "cannot be read", out=out)


def test_no_rules_keeps_plans_and_provenance_as_before(pair, tmp_path):
    plan = make_plan(open_checkpoint(pair.sft), open_checkpoint(pair.aligned), 0.3)
    assert all(t.alpha == 0.3 for t in plan.tensors) and plan.alpha_rules == () and plan.alpha_overrides == {}
    out = str(tmp_path / "out")
    extrapolate(pair.sft, pair.aligned, 0.3, out)
    with open(os.path.join(out, "expo.json")) as f:
        prov = json.load(f)
    assert "alpha_rules" not in prov and "alpha_by_tensor" not in prov and "sweep" not in prov


def test_api_rejects_bad_rules(tmp_path):
    sft, aligned = make_pair(tmp_path)
    with unchanged(tmp_path, tmp_path / "out"), pytest.raises(OptionError, match="unknown module kind"):
        extrapolate(sft, aligned, 0.3, str(tmp_path / "out"), alpha_rules=[{"kind": "mlps", "alpha": 0}])


def test_ray_units_use_each_tensors_alpha(pair, tmp_path):
    """The distributed executor's unit function (run here without a cluster) writes the same bytes as the
    in-process executor under rules."""
    from expo_engine.distributed import run_unit
    from expo_engine.ownership import OutputLock
    from expo_engine.plan import make_units
    from expo_engine.writer import Staging

    rules = ["kind:embeddings=0", "mlp=x3"]
    plan = make_plan(open_checkpoint(pair.sft), open_checkpoint(pair.aligned), 0.3, max_shard_size="30KB",
                     chunk_bytes=2000, rules=rules)
    with OutputLock(str(tmp_path / "ray")) as lock, Staging(str(tmp_path / "ray"), plan, lock) as staging:
        for unit in make_units(plan, 5000):
            run_unit(plan, unit, staging.dir, stats=False)
        shards = {s.filename: open(os.path.join(staging.dir, s.filename), "rb").read() for s in plan.shards}
    local = str(tmp_path / "local")
    extrapolate(pair.sft, pair.aligned, 0.3, local, max_shard_size="30KB", chunk_bytes=2000, alpha_rules=rules)
    for name, data in shards.items():
        with open(os.path.join(local, name), "rb") as f:
            assert f.read() == data, name
