"""`expo norms`: float64 statistics against direct computation, name classification, every output format."""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys

import pytest
import torch

from expo_engine import norms
from expo_engine.cli import main
from expo_engine.naming import classify
from expo_engine.norms import chunk_stats, reference_stats


@pytest.mark.parametrize("da,db", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                   (torch.float16, torch.float64)])
def test_chunk_stats_match_float64(da, db):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(norms.BLOCK + 777, generator=g)
    b = a + 1e-3 * torch.randn(a.numel(), generator=g)
    a, b = a.to(da), b.to(db)
    got, want = chunk_stats(a, b).summary(), reference_stats(a, b)
    for key, value in want.items():
        assert math.isclose(got[key], value, rel_tol=1e-9, abs_tol=1e-15), key


def test_merged_chunks_equal_whole_tensor():
    a, b = torch.randn(10_001), torch.randn(10_001)
    st = norms.Stats()
    for start in range(0, 10_001, 999):
        st.add(chunk_stats(a[start:start + 999], b[start:start + 999]))
    for key, value in reference_stats(a, b).items():
        assert math.isclose(st.summary()[key], value, rel_tol=1e-9), key


@pytest.mark.parametrize("name,layer,kind", [
    ("model.layers.3.self_attn.q_proj.weight", 3, "q"),
    ("model.layers.3.self_attn.k_proj.weight", 3, "k"),
    ("model.layers.3.self_attn.v_proj.weight", 3, "v"),
    ("model.layers.3.self_attn.o_proj.weight", 3, "o"),
    ("model.layers.12.mlp.gate_proj.weight", 12, "mlp"),
    ("model.layers.12.mlp.down_proj.weight", 12, "mlp"),
    ("model.layers.0.input_layernorm.weight", 0, "norm"),
    ("model.layers.0.post_attention_layernorm.weight", 0, "norm"),
    ("model.embed_tokens.weight", None, "embed"),
    ("model.norm.weight", None, "norm"),
    ("lm_head.weight", None, "head"),
    ("transformer.h.5.attn.c_attn.weight", 5, "qkv"),
    ("transformer.h.5.attn.c_proj.weight", 5, "o"),
    ("transformer.h.5.mlp.c_fc.weight", 5, "mlp"),
    ("transformer.h.5.mlp.c_proj.bias", 5, "mlp"),
    ("transformer.h.5.ln_1.weight", 5, "norm"),
    ("transformer.wte.weight", None, "embed"),
    ("transformer.wpe.weight", None, "embed"),
    ("transformer.ln_f.weight", None, "norm"),
    ("some.unknown.thing", None, "other"),
])
def test_classify(name, layer, kind):
    assert classify(name) == (layer, kind)


def test_norms_of_a_transformers_pair_match_direct_float64(pair):
    (report,) = norms.parameter_norms([pair.sft, pair.aligned], chunk_bytes=1000)
    names = set(report.tensors)
    assert names and names <= set(pair.aligned_state)
    total_d2 = 0.0
    for name in names:
        want = reference_stats(pair.sft_state[name], pair.aligned_state[name])
        got = report.tensors[name].summary()
        for key, value in want.items():
            assert math.isclose(got[key], value, rel_tol=1e-9, abs_tol=1e-15), (name, key)
        total_d2 += want["fro"] ** 2
    agg = report.aggregates()
    assert math.isclose(agg["total"]["fro"], math.sqrt(total_d2), rel_tol=1e-12)
    assert set(agg["by_layer"]) == {"0", "1"}
    assert {"q", "k", "v", "o", "mlp", "norm", "embed", "head"} <= set(agg["by_kind"])
    layer0 = sum(v["fro"] ** 2 for k, v in agg["by_layer_kind"].items() if k.startswith("0/"))
    assert math.isclose(layer0, agg["by_layer"]["0"]["fro"] ** 2, rel_tol=1e-12)


def test_cli_norms_writes_every_format(pair, tmp_path, capsys):
    out = str(tmp_path / "expo")
    from expo_engine import extrapolate

    extrapolate(pair.sft, pair.aligned, 0.5, out)
    files = {k: str(tmp_path / f"n.{k}") for k in ("json", "csv", "md", "png")}
    rc = main(["norms", pair.sft, pair.aligned, out, "--json", files["json"], "--csv", files["csv"],
               "--markdown", files["md"], "--plot", files["png"]])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.count("->") == 3 and "kind mlp" in printed and "layer 1" in printed
    with open(files["json"]) as f:
        data = json.load(f)
    assert len(data["pairs"]) == 3 and data["inputs"] == [pair.sft, pair.aligned, out]
    # ExPO moves further from SFT by (1 + alpha): ||expo - sft|| = 1.5 ||aligned - sft|| (up to bf16 rounding).
    ratio = data["pairs"][1]["total"]["fro"] / data["pairs"][0]["total"]["fro"]
    assert abs(ratio - 1.5) < 0.01
    with open(files["csv"]) as f:
        rows = list(csv.reader(f))
    assert rows[0][:5] == ["a", "b", "tensor", "layer", "kind"] and len(rows) == 1 + 3 * len(pair.aligned_state)
    assert open(files["md"]).read().startswith("## ")
    assert open(files["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_a_clear_error(pair, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc = main(["norms", pair.sft, pair.aligned, "--plot", str(tmp_path / "x.png")])
    assert rc == 2 and "pip install 'expo-engine[plot]'" in capsys.readouterr().err


def test_norms_needs_two_sources(pair, capsys):
    assert main(["norms", pair.sft]) == 2
    assert "at least two" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["x.txt", "x", "x.pgf"])  # .pgf: matplotlib lists it, but it needs LaTeX
def test_plot_format_matplotlib_cannot_write_is_refused_before_reading(pair, tmp_path, capsys, name):
    if name.endswith(".pgf") and shutil.which("xelatex"):
        pytest.skip("this machine has LaTeX: matplotlib can write .pgf here")
    path = tmp_path / name
    rc = main(["norms", pair.sft, pair.aligned, "--plot", str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "matplotlib cannot write" in err and ".png" in err, err
    assert not path.exists() and capsys.readouterr().out == ""


# ---------------------------------------------------------------------------------------------------------------
# A reordered vocabulary of the same size (issue 20, item 1): rows compared by token, as the plan matches them

ROWS = ("model.embed_tokens.weight", "lm_head.weight")


def permuted_pair(root, exact: bool = False):
    """SFT and aligned tiny Llamas of 128 vocabulary rows each, with tokenizers; the aligned tokenizer holds SFT
    token i at id order[i] and its embedding and head rows follow. With `exact` the aligned model is the SFT model
    itself, rows permuted: no change at all once rows are matched by token. Returns (sft folder, aligned folder,
    sft state, aligned state, source) with source[j] the SFT row of aligned row j."""
    import os

    from helpers import llama_pair, permute_rows, save_model, tiny_tokenizer

    g = torch.Generator().manual_seed(11)
    order = list(range(4)) + (torch.randperm(124, generator=g) + 4).tolist()  # the special tokens stay
    sft, aligned = llama_pair()
    if exact:
        aligned.load_state_dict(sft.state_dict())
    permute_rows(aligned, ROWS, order)
    folders = []
    for model, side in ((sft, "sft"), (aligned, "aligned")):
        folder = save_model(model, os.path.join(str(root), side))
        tiny_tokenizer().save_pretrained(folder)
        folders.append(folder)
    path = os.path.join(folders[1], "tokenizer.json")
    with open(path) as f:
        data = json.load(f)
    data["model"]["vocab"] = {t: order[i] for t, i in data["model"]["vocab"].items()}
    with open(path, "w") as f:
        json.dump(data, f)
    source = [0] * 128
    for i, j in enumerate(order):
        source[j] = i
    return folders[0], folders[1], sft.state_dict(), aligned.state_dict(), source


@pytest.mark.parametrize("exact", [False, True], ids=["changed", "aligned-is-permuted-sft"])
def test_norms_of_a_reordered_vocabulary_compare_rows_by_token(tmp_path, capsys, exact):
    sft, aligned, sft_state, aligned_state, source = permuted_pair(tmp_path, exact)
    moved = sum(1 for j, i in enumerate(source) if i != j)
    (report,) = norms.parameter_norms([sft, aligned], chunk_bytes=1000)
    for name in aligned_state:  # embed and head against the SFT row of the same token; the rest by id
        a = sft_state[name][source] if name in ROWS else sft_state[name]
        want = reference_stats(a, aligned_state[name])
        got = report.tensors[name].summary()
        for key, value in want.items():
            assert math.isclose(got[key], value, rel_tol=1e-9, abs_tol=1e-15), (name, key)
    if exact:
        for name in ROWS:  # compared by id these rows would differ by the whole weight
            assert report.tensors[name].summary()["fro"] == 0.0
            assert reference_stats(sft_state[name], aligned_state[name])["fro"] > 0.1
    rec = report.vocab
    assert rec and (rec["matched"], rec["sft_rows"], rec["aligned_rows"], rec["rows_moved"], rec["rows_copied"]) == (
        "by token string", 128, 128, moved, 0)
    assert sorted(rec["tensors"]) == sorted(ROWS)
    rc = main(["norms", sft, aligned])
    printed = capsys.readouterr().out
    assert rc == 0
    assert (f"vocabulary reordered (128 rows, matched by token string, {moved} row(s) at another id): "
            f"{', '.join(rec['tensors'])} compared row by row where the two tokenizers hold the same token, on 128 "
            "row(s)\n") in printed, printed
