"""Checkpoint pairs as users bring them: extra tensors on one side (RLHF value heads) left out with --drop, and every
mismatch listed in one message."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import (
    HIDDEN,
    LAYERS,
    VOCAB,
    assert_user_error,
    llama_pair,
    load_output,
    make_pair,
    run_expo,
    save_model,
    unchanged,
    worst_steps,
)
from safetensors.torch import load_file, save_file

from expo_engine import MismatchError, OptionError, extrapolate, verify

UP = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(LAYERS)]


@pytest.fixture(scope="module")
def rlhf(tmp_path_factory):
    """A real Llama pair whose aligned side carries TRL's value head (v_head.summary.weight/bias), as PPO leaves it."""
    root = tmp_path_factory.mktemp("rlhf")
    sft, aligned = llama_pair()
    sft_dir, aligned_dir = save_model(sft, str(root / "sft")), save_model(aligned, str(root / "aligned"))
    path = os.path.join(aligned_dir, "model.safetensors")
    state = load_file(path)
    state["v_head.summary.weight"] = torch.randn(1, 32).to(torch.bfloat16)
    state["v_head.summary.bias"] = torch.zeros(1).to(torch.bfloat16)
    save_file(state, path, metadata={"format": "pt"})
    return sft_dir, aligned_dir, sft.state_dict(), aligned.state_dict()


def test_a_value_head_is_named_and_a_drop_suggested(rlhf, tmp_path, capsys):
    sft, aligned, _, _ = rlhf
    out = str(tmp_path / "out")
    with unchanged(tmp_path, out):
        rc, _, err = run_expo(capsys, "extrapolate", "--sft", sft, "--aligned", aligned, "--alpha", "0.5",
                              "--out", out)
    line = assert_user_error(rc, err, "2 only in the aligned checkpoint", "v_head.summary.bias",
                             "v_head.summary.weight", "value or reward head", "--drop '^v_head[.]'")
    assert "SFT checkpoint (" not in line


def test_drop_leaves_the_value_head_out_and_records_it(rlhf, tmp_path, capsys):
    """--drop: the output is the language model alone, exact, recorded in expo.json; verify (which reads the
    patterns from expo.json) passes; transformers loads it."""
    from transformers import AutoModelForCausalLM

    sft, aligned, sft_state, aligned_state = rlhf
    out = str(tmp_path / "out")
    rc, printed, err = run_expo(capsys, "extrapolate", "--sft", sft, "--aligned", aligned, "--alpha", "0.5", "--out",
                                out, "--drop", "^v_head[.]")
    assert rc == 0, err
    got = load_output(out)
    assert not any(n.startswith("v_head") for n in got) and set(got) == set(aligned_state)
    assert worst_steps(got, sft_state, aligned_state, 0.5) <= 1
    with open(os.path.join(out, "expo.json")) as f:
        dropped = json.load(f)["dropped"]
    assert dropped["patterns"] == ["^v_head[.]"]
    assert dropped["tensors"] == ["v_head.summary.bias", "v_head.summary.weight"]
    assert verify(out, sft, aligned).ok
    AutoModelForCausalLM.from_pretrained(out)
    rc, printed, _ = run_expo(capsys, "extrapolate", "--sft", sft, "--aligned", aligned, "--alpha", "0.5", "--out",
                              str(tmp_path / "dry"), "--drop", "^v_head[.]", "--dry-run")
    assert rc == 0 and "dropped on purpose (--drop ^v_head[.]): 2 tensor(s): v_head.summary.bias" in printed


def test_drop_from_python_and_a_pattern_of_a_shared_tensor(rlhf, tmp_path):
    """A pattern may leave out a tensor both sides hold (here the final norm) only with drop_shared: the output lacks
    it, expo.json records it, and verify names it as a tensor the model's own config needs."""
    sft, aligned, _, _ = rlhf
    out = str(tmp_path / "out")
    summary = extrapolate(sft, aligned, 0.5, out, drop=["^v_head[.]", r"^model\.norm\."], drop_shared=True)
    assert summary.tensors == len(load_output(out)) and "model.norm.weight" not in load_output(out)
    with open(os.path.join(out, "expo.json")) as f:
        dropped = json.load(f)["dropped"]
    assert dropped["drop_shared"] is True and "model.norm.weight" in dropped["tensors"]
    report = verify(out, sft, aligned)
    assert not report.ok
    assert report.problems == ["tensor 'model.norm.weight': LlamaForCausalLM (the model of its config.json) needs it, "
                               "but no shard holds it (left out with --drop); a loader would fill it with random "
                               "values"]
    assert verify(out).problems == report.problems  # structure only: the same completeness check


@pytest.mark.parametrize("patterns,needles", [
    (["embed_tokens"], ["--drop 'embed_tokens' matches 1 tensor(s) that both checkpoints hold",
                        "model.embed_tokens.weight", "--drop-shared"]),
    (["^v_head[.]", "layers[.]0[.]"], ["--drop 'layers[.]0[.]' matches 9 tensor(s)", "--drop-shared"]),
    ([".*"], ["--drop '.*' matches 21 tensor(s) that both checkpoints hold", "lm_head.weight"]),
])
def test_a_drop_of_shared_tensors_is_refused(rlhf, tmp_path, capsys, patterns, needles):
    """`--drop` is for tensors one side has: one that matches tensors both checkpoints hold (the embedding, every
    tensor) is refused in one line, exit 2, nothing written, unless --drop-shared."""
    sft, aligned, _, _ = rlhf
    out = str(tmp_path / "out")
    drops = [arg for p in patterns for arg in ("--drop", p)]
    with unchanged(tmp_path, out):
        rc, _, err = run_expo(capsys, "extrapolate", "--sft", sft, "--aligned", aligned, "--alpha", "0.5",
                              "--out", out, *drops)
    assert_user_error(rc, err, *needles)
    with pytest.raises(OptionError, match="both checkpoints hold"):
        extrapolate(sft, aligned, 0.5, out, drop=patterns)
    assert not os.path.exists(out)


def test_a_drop_of_everything_is_refused_even_with_drop_shared(rlhf, tmp_path, capsys):
    sft, aligned, _, _ = rlhf
    out = str(tmp_path / "out")
    with unchanged(tmp_path, out):
        rc, _, err = run_expo(capsys, "extrapolate", "--sft", sft, "--aligned", aligned, "--alpha", "0.5",
                              "--out", out, "--drop", ".*", "--drop-shared")
    assert_user_error(rc, err, "--drop '.*' leaves no tensor to write")


def test_drop_shared_embedding_is_written_and_verify_names_it(rlhf, tmp_path, capsys):
    sft, aligned, sft_state, aligned_state = rlhf
    out = str(tmp_path / "out")
    rc, _, err = run_expo(capsys, "extrapolate", "--sft", sft, "--aligned", aligned, "--alpha", "0.5", "--out", out,
                          "--drop", "^v_head[.]", "--drop", "embed_tokens", "--drop-shared")
    assert rc == 0, err
    got = load_output(out)
    assert "model.embed_tokens.weight" not in got
    assert worst_steps(got, sft_state, aligned_state, 0.5) <= 1  # the rest is exact
    rc, printed, _ = run_expo(capsys, "verify", out, "--sft", sft, "--aligned", aligned)
    assert rc == 1
    assert ("problem: tensor 'model.embed_tokens.weight': LlamaForCausalLM (the model of its config.json) needs it, "
            "but no shard holds it (left out with --drop)") in printed


def test_verify_skips_the_completeness_check_with_a_note(rlhf, tmp_path, monkeypatch):
    """Without transformers, or with a config.json it cannot build a model from, verify says it did not check."""
    import sys

    sft, aligned, _, _ = rlhf
    out = str(tmp_path / "out")
    extrapolate(sft, aligned, 0.5, out, drop=["^v_head[.]"])
    report = verify(out, sft, aligned)
    assert report.ok and report.notes == []
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    report = verify(out)
    assert report.ok and report.notes == ["whether the folder holds every tensor its config.json requires: not "
                                          "checked (transformers is not installed)"]
    monkeypatch.undo()
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"model_type": "no-such-model-type"}, f)
    report = verify(out)
    assert len(report.notes) == 1 and "not checked (transformers cannot build a model" in report.notes[0]
    assert [p.split(":")[0] for p in report.problems] == ["config.json"]  # the edit: its checksum, nothing else


@pytest.mark.parametrize("pattern,needle", [("^nothing_like_this", "matches no tensor"),
                                            ("v_head[", "is not a regular expression")])
def test_bad_drop_patterns(rlhf, tmp_path, pattern, needle):
    sft, aligned, _, _ = rlhf
    with pytest.raises(OptionError, match=needle.replace("[", r"\[")):
        extrapolate(sft, aligned, 0.5, str(tmp_path / "out"), drop=["^v_head[.]", pattern])
    assert not os.path.exists(tmp_path / "out")


def test_every_name_on_one_side_only_is_counted_with_the_first_few(tmp_path):
    def extra(state):
        for k in range(7):
            state[f"extra.{k}.weight"] = torch.zeros(4).to(torch.bfloat16)

    sft, aligned = make_pair(tmp_path, aligned_edit=extra)
    with pytest.raises(MismatchError) as e:
        extrapolate(sft, aligned, 0.5, str(tmp_path / "out"))
    msg = str(e.value)
    assert "7 only in the aligned checkpoint (extra.0.weight, extra.1.weight, extra.2.weight, extra.3.weight, " \
           "extra.4.weight and 2 more)" in msg and "--drop PATTERN" in msg


def test_every_shape_and_dtype_mismatch_in_one_message(tmp_path):
    def shrink(state):
        for name in UP[:3]:
            state[name] = state[name][:-1]
        state["model.norm.weight"] = state["model.norm.weight"].to(torch.int32)

    sft, aligned = make_pair(tmp_path, sft_edit=shrink)
    with pytest.raises(MismatchError) as e:
        extrapolate(sft, aligned, 0.5, str(tmp_path / "out"))
    msg = str(e.value)
    assert f"3 tensor(s) differ in shape between the SFT and the aligned checkpoint ({UP[0]} [{HIDDEN - 1}, " \
           f"{HIDDEN}] vs [{HIDDEN}, {HIDDEN}], {UP[1]}" in msg
    assert "1 tensor(s) differ in kind (model.norm.weight I32 vs BF16)" in msg
    assert not os.path.exists(tmp_path / "out")
    assert VOCAB  # the vocabulary rows are not among them
