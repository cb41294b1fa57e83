"""Resized vocabularies: the aligned model has more rows in its embeddings and head (added chat tokens, padding to a
multiple of 8). Shared rows are extrapolated, the aligned model's own rows copied; matched by the two tokenizers."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import (
    assert_user_error,
    llama_pair,
    load_output,
    nudge_element,
    run_expo,
    save_model,
    tiny_tokenizer,
    worst_steps,
)

from expo_engine import MismatchError, extrapolate, extrapolate_sweep, verify
from expo_engine.kernels import extrapolate_chunk_torch

ROWS = ("model.embed_tokens.weight", "lm_head.weight")
ADDED = ["<|im_start|>", "<|im_end|>"]


def _resized_pair(root, swap: bool = False, tokenizers: bool = True):
    """SFT: vocab 128. Aligned: 128 + 2 added tokens, padded to 136 rows; with `swap`, its tokenizer has w10 and
    w11 at each other's ids (and its rows follow: the same token's row moved)."""
    sft, aligned = llama_pair()
    aligned.resize_token_embeddings(136)
    tok_s, tok_a = tiny_tokenizer(), tiny_tokenizer()
    tok_a.add_special_tokens({"additional_special_tokens": ADDED})
    if swap:
        data = json.loads(tok_a.backend_tokenizer.to_str())
        v = data["model"]["vocab"]
        v["w10"], v["w11"] = v["w11"], v["w10"]
        from tokenizers import Tokenizer

        tok_a._tokenizer = Tokenizer.from_str(json.dumps(data))
        with torch.no_grad():
            for name in ROWS:
                w = aligned.get_parameter(name)
                w[[10, 11]] = w[[11, 10]].clone()
    folders = []
    for model, tok, name in ((sft, tok_s, "sft"), (aligned, tok_a, "aligned")):
        folder = save_model(model, os.path.join(str(root), name))
        if tokenizers:
            tok.save_pretrained(folder)
        folders.append(folder)
    return folders[0], folders[1], sft.state_dict(), aligned.state_dict()


def _expected(sft_state, aligned_state, alpha, source_rows):
    """The output state as the engine must build it: row j of a resized tensor from SFT row source_rows[j] with
    torch's own lerp arithmetic (the float32 form every backend shares), or aligned's row where there is none."""
    want = {}
    for name, a in aligned_state.items():
        s = sft_state[name]
        out = torch.empty_like(a)
        if name in ROWS:
            for j in range(a.shape[0]):
                src = source_rows[j]
                if src is None:
                    out[j] = a[j]
                else:
                    extrapolate_chunk_torch(out[j], s[src].contiguous(), a[j].contiguous(), alpha)
        else:
            extrapolate_chunk_torch(out.view(-1), s.reshape(-1), a.reshape(-1), alpha)
        want[name] = out
    return want


@pytest.mark.parametrize("swap", [False, True], ids=["extends", "moved-tokens"])
def test_resized_vocabulary_rows_extrapolated_and_copied(tmp_path, capsys, swap):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sft, aligned, sft_state, aligned_state = _resized_pair(tmp_path, swap)
    out = str(tmp_path / "out")
    rc, printed, err = run_expo(capsys, "extrapolate", "--sft", sft, "--aligned", aligned, "--alpha", "0.5",
                                "--out", out, "--chunk-mb", "0.001")
    assert rc == 0, err
    how = "by token string, 2 row(s) at another id" if swap else "by id"
    assert (f"vocabulary resized (128 -> 136 rows, matched {how}): lm_head.weight, model.embed_tokens.weight: 128 "
            "row(s) extrapolated, 8 copied from the aligned model") in printed + err
    source = list(range(128)) + [None] * 8
    if swap:
        source[10], source[11] = 11, 10
    got = load_output(out)
    want = _expected(sft_state, aligned_state, 0.5, source)
    differ = [n for n in want if not torch.equal(got[n], want[n])]
    assert not differ, differ
    for name in ROWS:  # the aligned model's own rows: its values, bit for bit; the shared rows: extrapolated
        assert torch.equal(got[name][128:], aligned_state[name][128:])
        assert not torch.equal(got[name][:128], aligned_state[name][:128])
    shared = {n: t for n, t in got.items() if n not in ROWS}
    assert worst_steps(shared, sft_state, aligned_state, 0.5) <= 1
    with open(os.path.join(out, "expo.json")) as f:
        prov = json.load(f)
    rec = prov["vocab"]
    for name in ROWS:  # the change aligned - sft is counted on the shared rows only, the update on all of them
        assert prov["stats"]["delta"]["tensors"][name]["n"] == 128 * 32
        assert prov["stats"]["update"]["tensors"][name]["n"] == 136 * 32
    assert rec["sft_rows"] == 128 and rec["aligned_rows"] == 136 and rec["rows_copied"] == 8
    assert rec["rows_moved"] == (2 if swap else 0) and sorted(rec["tensors"]) == sorted(ROWS)
    # the output loads with the aligned tokenizer, and its logits are the exact model's
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids(ADDED[1]) == 129
    model, exact = AutoModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(aligned)
    exact.load_state_dict(want)
    ids = torch.tensor([[1, 10, 11, 128, 129, 40]])
    assert torch.equal(model(ids).logits, exact(ids).logits)
    # verify checks both kinds of rows
    assert verify(out, sft, aligned).ok
    nudge_element(out, index=130 * 32 + 3)  # an element of lm_head's row 130 (a copied row)
    report = verify(out, sft, aligned)
    assert [t for t, _, _ in report.failing_tensors] == ["lm_head.weight"]


def test_resized_vocabulary_in_a_sweep(tmp_path):
    sft, aligned, sft_state, aligned_state = _resized_pair(tmp_path)
    summary = extrapolate_sweep(sft, aligned, [0.3, 2.0], str(tmp_path / "sweep"), chunk_bytes=700)
    for run in summary.runs:
        want = _expected(sft_state, aligned_state, run.alpha, list(range(128)) + [None] * 8)
        got = load_output(run.out)
        assert all(torch.equal(got[n], want[n]) for n in want)
        assert verify(run.out, sft, aligned).ok


def test_without_tokenizers_a_flag_accepts_it(tmp_path, capsys):
    sft, aligned, sft_state, aligned_state = _resized_pair(tmp_path, tokenizers=False)
    capsys.readouterr()  # save_pretrained's own progress lines
    out = str(tmp_path / "out")
    rc, _, err = run_expo(capsys, "extrapolate", "--sft", sft, "--aligned", aligned, "--alpha", "0.5", "--out", out)
    assert_user_error(rc, err, "lm_head.weight", "128 rows in the SFT checkpoint, 136 in the aligned one",
                      "no tokenizer", "--vocab aligned-extends-sft")
    assert not os.path.exists(out)
    summary = extrapolate(sft, aligned, 0.5, out, vocab="aligned-extends-sft")
    got = load_output(summary.out)
    want = _expected(sft_state, aligned_state, 0.5, list(range(128)) + [None] * 8)
    assert all(torch.equal(got[n], want[n]) for n in want)
    with open(os.path.join(out, "expo.json")) as f:
        assert json.load(f)["vocab"]["matched"] == "as told"


def test_a_smaller_aligned_vocabulary_is_refused(tmp_path):
    sft, aligned = _resized_pair(tmp_path)[:2]
    with pytest.raises(MismatchError, match="the vocabulary shrank"):
        extrapolate(aligned, sft, 0.5, str(tmp_path / "out"))  # the sides swapped: 136 rows -> 128


def test_resized_vocabulary_on_the_cuda_path(tmp_path):
    """The CUDA pipeline (here on CPU tensors, with its torch-ops kernel) takes the same rows as the CPU path: the
    same bytes. (On a GPU: untested, as all of the CUDA path.)"""
    from test_gpu import run_collect

    from expo_engine import gpu
    from expo_engine.executor import run_chunks

    sft, aligned, _, _ = _resized_pair(tmp_path, swap=True)
    cpu, _, _ = run_collect(sft, aligned, 0.5, 3000, run_chunks)
    dev, _, _ = run_collect(sft, aligned, 0.5, 3000, gpu.run_chunks_cuda, device="cpu", kernel="torch")
    assert all(torch.equal(cpu[n], dev[n]) for n in cpu)


def test_norms_of_a_resized_pair_compare_the_shared_rows(tmp_path):
    """`expo norms SFT ALIGNED` on a resized pair: the vocabulary tensors are compared on the rows that mean the
    same token (here with two tokens at each other's ids), the aligned model's own rows left out, and it says so."""
    from expo_engine import parameter_norms
    from expo_engine.norms import reference_stats, table

    sft, aligned, sft_state, aligned_state = _resized_pair(tmp_path, swap=True)
    (report,) = parameter_norms([sft, aligned])
    assert report.vocab["rows_extrapolated"] == 128 and report.vocab["rows_moved"] == 2
    order = list(range(128))
    order[10], order[11] = 11, 10
    for name in ROWS:
        got = report.tensors[name].summary()
        want = reference_stats(sft_state[name][order], aligned_state[name][:128])
        assert got["n"] == 128 * 32
        for key in ("fro", "relative", "max_abs"):
            assert got[key] == pytest.approx(want[key], rel=1e-12), (name, key)
    assert "compared on the 128 shared row(s); 8 row(s) only in the second are left out" in table(report)
