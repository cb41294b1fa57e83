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
    permute_rows,
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


# ---------------------------------------------------------------------------------------------------------------
# Equal row counts: the tokenizers are consulted whenever both sides have one (issue 20, item 1)


def _save_tokenizer(tok, folder: str, vocab_edit=None, added=()) -> None:
    """Save the tiny tokenizer into `folder`, its tokenizer.json's vocabulary changed by `vocab_edit(vocab)` and
    `added` ((content, id) pairs) appended to its added tokens."""
    tok.save_pretrained(folder)
    path = os.path.join(folder, "tokenizer.json")
    with open(path) as f:
        data = json.load(f)
    if vocab_edit:
        vocab_edit(data["model"]["vocab"])
    data["added_tokens"] += [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for c, i in added]
    with open(path, "w") as f:
        json.dump(data, f)


def _permuted_pair(root, order, tokenizers=("sft", "aligned"), rename=None, sft_added=()):
    """SFT and aligned of 128 rows each; the aligned tokenizer holds SFT token i at id order[i], and its embedding
    and head rows follow (aligned row order[i] is the aligned model's own row for token i). `rename`: {id: token} of
    aligned ids whose string is replaced by one the SFT tokenizer lacks. `sft_added`: more (content, id) added tokens
    of the SFT tokenizer. Returns (sft folder, aligned folder, sft state, aligned state as saved)."""
    sft, aligned = llama_pair()
    permute_rows(aligned, ROWS, order)

    def permute(v):
        by_id = {i: t for t, i in v.items()}
        v.clear()
        v.update({by_id[i]: order[i] for i in by_id})
        for i, t in (rename or {}).items():
            del v[next(k for k, j in v.items() if j == i)]
            v[t] = i

    folders = []
    for model, side, edit, added in ((sft, "sft", None, sft_added), (aligned, "aligned", permute, ())):
        folder = save_model(model, os.path.join(str(root), side))
        if side in tokenizers:
            _save_tokenizer(tiny_tokenizer(), folder, edit, added)
        folders.append(folder)
    return folders[0], folders[1], sft.state_dict(), aligned.state_dict()


def _order(seed: int = 7) -> list[int]:
    """A permutation of the word ids 4..127 (the special tokens stay where they are)."""
    g = torch.Generator().manual_seed(seed)
    return list(range(4)) + (torch.randperm(124, generator=g) + 4).tolist()


def _reference_steps(got, sft_state, aligned_state, alpha, source) -> float:
    """Worst distance of the vocabulary tensors from the float64 formula with aligned row j against SFT row
    source[j] (the aligned value itself where source[j] is None), in output steps."""
    from expo_engine.kernels import error_steps

    worst = 0.0
    for name in ROWS:
        src = torch.tensor([0 if s is None else s for s in source])  # rows without one are masked out
        keep = torch.tensor([s is not None for s in source])
        o, a, s = got[name], aligned_state[name], sft_state[name][src]
        worst = max(worst, error_steps(o[keep], s[keep], a[keep], alpha).max().item())
        assert torch.equal(o[~keep], a[~keep]), name  # copied rows: the aligned values, bit for bit
    return worst


def test_a_reordered_vocabulary_of_the_same_size_is_matched_by_token_string(tmp_path, capsys):
    order = _order()
    sft, aligned, sft_state, aligned_state = _permuted_pair(tmp_path, order)
    out = str(tmp_path / "out")
    rc, printed, err = run_expo(capsys, "extrapolate", "--sft", sft, "--aligned", aligned, "--alpha", "0.5",
                                "--out", out, "--chunk-mb", "0.001")
    assert rc == 0, err
    moved = sum(1 for i, j in enumerate(order) if i != j)
    assert (f"vocabulary reordered (128 rows, matched by token string, {moved} row(s) at another id): "
            "lm_head.weight, model.embed_tokens.weight: 128 row(s) extrapolated, 0 copied from the aligned model"
            ) in printed + err
    source = [None] * 128
    for i, j in enumerate(order):
        source[j] = i  # aligned row j holds SFT token i
    got = load_output(out)
    assert _reference_steps(got, sft_state, aligned_state, 0.5, source) <= 1
    assert worst_steps(got, sft_state, aligned_state, 0.5, [n for n in got if n not in ROWS]) <= 1
    want = _expected(sft_state, aligned_state, 0.5, source)
    assert all(torch.equal(got[n], want[n]) for n in want)
    with open(os.path.join(out, "expo.json")) as f:
        rec = json.load(f)["vocab"]
    assert (rec["matched"], rec["sft_rows"], rec["aligned_rows"], rec["rows_moved"], rec["rows_copied"]) == (
        "by token string", 128, 128, moved, 0)
    report = verify(out, sft, aligned)
    assert report.ok, report.problems


def test_verify_fails_an_output_made_by_id_from_a_reordered_vocabulary(tmp_path):
    """The output made row k against row k (as expo did before it consulted the tokenizers at equal sizes: here made
    from copies of the pair without tokenizers) fails verify against the pair with its tokenizers: verify takes the
    row map from the sources, not from expo.json."""
    import shutil

    sft, aligned, _, _ = _permuted_pair(tmp_path, _order())
    bare = []
    for folder in (sft, aligned):
        copy = folder + "-bare"
        shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*"))
        bare.append(copy)
    out = str(tmp_path / "by-id")
    extrapolate(*bare, 0.5, out)
    assert verify(out, *bare).ok  # against the sources it was made from, by id
    report = verify(out, sft, aligned)
    assert not report.ok
    assert sorted(t for t, _, _ in report.failing_tensors) == sorted(ROWS)
    assert any("records no vocabulary row map, but the sources' tokenizers match the rows of" in p
               for p in report.problems), report.problems


def test_the_same_tokens_at_the_same_ids_change_nothing(tmp_path):
    """Equal sizes, tokenizers that agree id for id (or a tokenizer on one side only): no row map, no record."""
    from expo_engine.api import prepare

    same = list(range(128))
    sft, aligned, _, _ = _permuted_pair(tmp_path / "same", same)
    job = prepare(sft, aligned, 0.5, str(tmp_path / "out"))
    assert job.plans[0].vocab is None and all(t.rows == () for t in job.plans[0].tensors)
    path = os.path.join(aligned, "tokenizer_config.json")  # other files (a new chat template), the same tokens
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump(config | {"chat_template": "{{ messages }}"}, f)
    assert prepare(sft, aligned, 0.5, str(tmp_path / "out")).plans[0].vocab is None
    sft, aligned, _, _ = _permuted_pair(tmp_path / "one-side", _order(), tokenizers=("aligned",))
    assert prepare(sft, aligned, 0.5, str(tmp_path / "out")).plans[0].vocab is None


def test_aligned_tokens_the_sft_tokenizer_lacks_are_copied_and_reported(tmp_path, capsys):
    order = _order()
    renamed = {order[50]: "<|im_start|>", order[51]: "<|im_end|>"}  # two SFT words renamed in the aligned tokenizer
    sft, aligned, sft_state, aligned_state = _permuted_pair(tmp_path, order, rename=renamed)
    out = str(tmp_path / "out")
    rc, printed, err = run_expo(capsys, "extrapolate", "--sft", sft, "--aligned", aligned, "--alpha", "0.5",
                                "--out", out)
    assert rc == 0, err
    assert ("2 aligned token(s) the SFT tokenizer lacks, copied): lm_head.weight, model.embed_tokens.weight: 126 "
            "row(s) extrapolated, 2 copied from the aligned model") in printed + err
    source = [None] * 128
    for i, j in enumerate(order):
        source[j] = None if j in renamed else i
    assert _reference_steps(load_output(out), sft_state, aligned_state, 0.5, source) <= 1
    with open(os.path.join(out, "expo.json")) as f:
        rec = json.load(f)["vocab"]
    assert rec["rows_copied"] == 2 and rec["rows_new_tokens"] == 2
    assert verify(out, sft, aligned).ok


def test_a_token_at_two_sft_ids_is_ambiguous_and_refused(tmp_path):
    """The SFT tokenizer holds w10 at id 10 and again (an added token) at id 127; the aligned one has w10 at another
    id: which SFT row it means cannot be told."""
    order = _order()
    sft, aligned, _, _ = _permuted_pair(tmp_path, order, sft_added=[("w10", 127)])
    with pytest.raises(MismatchError, match=r"holds token 'w10' at 2 ids \(10, 127\)") as e:
        extrapolate(sft, aligned, 0.5, str(tmp_path / "out"))
    assert "--vocab aligned-extends-sft" in str(e.value)
    assert not os.path.exists(tmp_path / "out")


# ---------------------------------------------------------------------------------------------------------------
# Added tokens in tokenizer_config.json's added_tokens_decoder (slow tokenizers; issue 20, item 9)


def _slow_tokenizer_files(folder: str, added: list[str]) -> None:
    """What a slow tokenizer saves: vocab.json (the base vocabulary) and tokenizer_config.json, whose
    added_tokens_decoder lists the added tokens (no tokenizer.json, no added_tokens.json)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {f"w{i}": i for i in range(4, 128)}
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    decoder = {str(128 + k): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                              "single_word": False, "special": True} for k, t in enumerate(added)}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"added_tokens_decoder": decoder, "model_max_length": 64}, f)


def test_read_tokens_takes_added_tokens_decoder(tmp_path):
    from expo_engine.vocab import read_tokens

    _slow_tokenizer_files(str(tmp_path), ADDED)
    tokens = read_tokens(str(tmp_path))
    assert len(tokens) == 130 and tokens[127] == "w127" and tokens[128:] == ADDED


def test_added_tokens_of_a_slow_tokenizer_are_rows_both_sides_hold(tmp_path, capsys):
    """SFT: 128 + 2 added tokens (a fast tokenizer), 130 rows. Aligned: the same 2 plus a third, listed only in
    tokenizer_config.json's added_tokens_decoder, 136 rows. Rows 128 and 129 mean the same tokens on both sides:
    extrapolated, and counted so (130 extrapolated, 6 copied; not 128 and 8)."""
    sft_model, aligned_model = llama_pair()
    sft_model.resize_token_embeddings(130)
    aligned_model.resize_token_embeddings(136)
    sft = save_model(sft_model, str(tmp_path / "sft"))
    aligned = save_model(aligned_model, str(tmp_path / "aligned"))
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ADDED})
    tok.save_pretrained(sft)
    _slow_tokenizer_files(aligned, [*ADDED, "<|pad|>"])
    capsys.readouterr()
    out = str(tmp_path / "out")
    rc, printed, err = run_expo(capsys, "extrapolate", "--sft", sft, "--aligned", aligned, "--alpha", "0.5",
                                "--out", out)
    assert rc == 0, err
    assert ("vocabulary resized (130 -> 136 rows, matched by id): lm_head.weight, model.embed_tokens.weight: 130 "
            "row(s) extrapolated, 6 copied from the aligned model") in printed + err
    sft_state, aligned_state = sft_model.state_dict(), aligned_model.state_dict()
    source = list(range(130)) + [None] * 6
    assert _reference_steps(load_output(out), sft_state, aligned_state, 0.5, source) <= 1
    assert verify(out, sft, aligned).ok


def test_verify_against_sources_without_their_tokenizers_uses_the_record(tmp_path):
    """A resized output verified against copies of its sources that lost their tokenizers: the rows expo.json
    records are checked, with a note saying so (the row map cannot be recomputed)."""
    import shutil

    sft, aligned, _, _ = _resized_pair(tmp_path, swap=True)
    out = str(tmp_path / "out")
    extrapolate(sft, aligned, 0.5, out)
    bare = []
    for folder in (sft, aligned):
        shutil.copytree(folder, folder + "-bare", ignore=shutil.ignore_patterns("tokenizer*", "chat_template*"))
        bare.append(folder + "-bare")
    report = verify(out, *bare)
    assert report.ok, report.problems
    assert any("rows checked as expo.json records them" in n for n in report.notes), report.notes


# ---------------------------------------------------------------------------------------------------------------
# Heads that naming.classify does not call one (ChatGLM's output_layer): the same row map as the embedding


GLM = ("transformer.embedding.word_embeddings.weight", "transformer.output_layer.weight")


def _glm_pair(root, order, width: int = 16, tokenizers: bool = True):
    """A ChatGLM-style pair written with safetensors (transformers has no ChatGLM class): the embedding and the
    head `transformer.output_layer.weight` of 128 rows, a final norm, and an MLP `width` wide in layer 0. The
    aligned vocab.json holds SFT token i at id order[i], its embedding and head rows follow, plus a change.
    Returns (sft folder, aligned folder, sft state, aligned state)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, 128)]
    sft = {GLM[0]: torch.randn(128, 16, generator=g), GLM[1]: torch.randn(128, 16, generator=g),
           "transformer.encoder.final_layernorm.weight": torch.randn(16, generator=g),
           "transformer.encoder.layers.0.mlp.dense_h_to_4h.weight": torch.randn(width, 16, generator=g)}
    aligned = {}
    for name, t in sft.items():
        moved = t
        if name in GLM:
            moved = torch.empty_like(t)
            moved[torch.tensor(order)] = t
        aligned[name] = moved + 0.05 * torch.randn(t.shape, generator=g)
    folders, states = [], []
    for side, state, vocab in (("sft", sft, {w: i for i, w in enumerate(words)}),
                               ("aligned", aligned, {w: order[i] for i, w in enumerate(words)})):
        folder = os.path.join(str(root), side)
        os.makedirs(folder)
        state = {n: t.to(torch.bfloat16).contiguous() for n, t in state.items()}
        save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({"architectures": ["ChatGLMModel"], "model_type": "chatglm", "vocab_size": 128,
                       "ffn_hidden_size": width}, f)
        if tokenizers:
            with open(os.path.join(folder, "vocab.json"), "w") as f:
                json.dump(vocab, f)
        folders.append(folder)
        states.append(state)
    return folders[0], folders[1], states[0], states[1]


def test_a_head_by_shape_gets_the_embeddings_row_map(tmp_path, capsys):
    """ChatGLM's head, reordered at equal size: every element of the embedding AND the head is the float64 formula
    on the rows of the same token (bf16-rounded), not row k against row k; verify and norms take the same rows."""
    from expo_engine import parameter_norms

    order = _order()
    sft, aligned, sft_state, aligned_state = _glm_pair(tmp_path, order)
    out = str(tmp_path / "out")
    rc, printed, err = run_expo(capsys, "extrapolate", "--sft", sft, "--aligned", aligned, "--alpha", "0.5",
                                "--out", out, "--chunk-mb", "0.001")
    assert rc == 0, err
    assert f"matched by token string, {sum(i != j for i, j in enumerate(order))} row(s) at another id): " \
           f"{GLM[0]}, {GLM[1]}: 128 row(s) extrapolated" in printed + err
    source = [0] * 128
    for i, j in enumerate(order):
        source[j] = i  # aligned row j holds SFT token i
    got = load_output(out)
    for name, a in aligned_state.items():
        s = sft_state[name][torch.tensor(source)] if name in GLM else sft_state[name]
        want = (a.double() + 0.5 * (a.double() - s.double())).to(torch.bfloat16)
        assert torch.equal(got[name], want), name
    report = verify(out, sft, aligned)
    assert report.ok, report.problems
    (norms,) = parameter_norms([sft, aligned])
    assert sorted(norms.vocab["tensors"]) == sorted(GLM)
    assert norms.vocab["rows_moved"] == sum(i != j for i, j in enumerate(order))


def test_verify_fails_a_head_made_by_id(tmp_path):
    """The output made row k against row k (from copies of the pair without tokenizers) fails verify against the
    pair with its tokenizers in both vocabulary tensors: the head too, not the embedding only."""
    import shutil

    sft, aligned, _, _ = _glm_pair(tmp_path, _order())
    bare = []
    for folder in (sft, aligned):
        shutil.copytree(folder, folder + "-bare", ignore=shutil.ignore_patterns("vocab.json"))
        bare.append(folder + "-bare")
    out = str(tmp_path / "by-id")
    extrapolate(*bare, 0.5, out)
    assert verify(out, *bare).ok
    report = verify(out, sft, aligned)
    assert sorted(t for t, _, _ in report.failing_tensors) == sorted(GLM), report.failing_tensors


def test_an_mlp_as_wide_as_the_vocabulary_keeps_its_rows(tmp_path):
    """intermediate_size == vocab_size (a tiny-model coincidence): the MLP's [128, 32] rows are not tokens (it sits
    in a numbered layer, its name says MLP) and are extrapolated by id; only the embedding and the head are matched.
    A head known by its shape only, where the vocabulary's row count is also a layer's: refused, not guessed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from expo_engine.api import prepare

    order = _order()
    sft, aligned, _, _ = _permuted_pair(tmp_path / "llama", order)
    config = LlamaConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(5)
    models = [LlamaForCausalLM(config).to(torch.bfloat16) for _ in range(2)]
    for model, folder in zip(models, (sft, aligned), strict=True):
        model.save_pretrained(folder)  # the tokenizers stay; the weights become a model with an MLP 128 wide
    plan = prepare(sft, aligned, 0.5, str(tmp_path / "out")).plans[0]
    assert sorted(plan.vocab_tensors) == sorted(ROWS)
    mlp = [t for t in plan.tensors if t.name.endswith("mlp.up_proj.weight")]
    assert mlp and all(t.shape == (128, 32) and t.rows == () for t in mlp)
    sft, aligned, _, _ = _glm_pair(tmp_path / "glm", order, width=128)
    with pytest.raises(MismatchError, match=r"transformer\.output_layer\.weight \(\[128, 16\]\) has the vocabulary"
                       r".*--vocab aligned-extends-sft"):
        extrapolate(sft, aligned, 0.5, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_which_tensors_hold_token_rows():
    """`token_tensors`' rule on header shapes alone: by name, by shape outside the layers, and the unsure ones."""
    from expo_engine.sources import Checkpoint, TensorSlot
    from expo_engine.vocab import token_tensors

    def ck(shapes):
        return Checkpoint("x", "/nonexistent", None, "safetensors", (),
                          {n: TensorSlot(n, "BF16", s, "/f", 0, 0) for n, s in shapes.items()})

    gpt2 = {"transformer.wte.weight": (128, 32), "transformer.wpe.weight": (128, 32), "lm_head.weight": (128, 32),
            "lm_head.bias": (128,), "transformer.h.0.mlp.c_fc.weight": (32, 128), "transformer.ln_f.weight": (32,)}
    assert token_tensors(ck(gpt2), gpt2, 128) == (["transformer.wte.weight", "lm_head.weight", "lm_head.bias"], [])
    olmo = {"model.transformer.wte.weight": (160, 32), "model.transformer.ff_out.weight": (160, 32),
            "model.transformer.blocks.0.ff_out.weight": (32, 64)}
    assert token_tensors(ck(olmo), olmo, 160) == (["model.transformer.wte.weight", "model.transformer.ff_out.weight"],
                                                  [])
    bert = {"bert.embeddings.word_embeddings.weight": (128, 32), "cls.predictions.decoder.weight": (128, 32),
            "cls.predictions.bias": (128,), "cls.predictions.transform.dense.weight": (32, 32)}
    assert token_tensors(ck(bert), bert, 128) == (["bert.embeddings.word_embeddings.weight",
                                                   "cls.predictions.decoder.weight", "cls.predictions.bias"], [])
    bart = {"model.shared.weight": (128, 32), "final_logits_bias": (1, 128), "model.encoder.layers.0.fc1.weight":
            (64, 32)}  # the embeddings by name are ties of model.shared, left out of the file: no row to compare
    assert token_tensors(ck(bart), bart, 128) == ([], ["model.shared.weight", "final_logits_bias"])
    bart["model.decoder.embed_tokens.weight"] = (128, 32)
    assert token_tensors(ck(bart), bart, 128) == (["model.decoder.embed_tokens.weight", "model.shared.weight"],
                                                  ["final_logits_bias"])
    square = {"model.embed_tokens.weight": (32, 32), "pooler.dense.weight": (32, 32), "pooler.dense.bias": (32,)}
    assert token_tensors(ck(square), square, 32) == (["model.embed_tokens.weight"],
                                                     ["pooler.dense.weight", "pooler.dense.bias"])
