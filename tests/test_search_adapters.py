"""`expo search` with a LoRA adapter as --aligned: theta(alpha) is PEFT's own model with every LoRA scaling times
(1 + alpha) and the saved modules extrapolated, no weight streamed; checked against the merged model that `expo
extrapolate` writes for the same alpha, and end to end."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import tiny_tokenizer
from test_adapters import _adapter

from expo_engine import extrapolate, search
from expo_engine.adapters import open_adapter
from expo_engine.backends import open_backend
from expo_engine.sources import open_checkpoint

pytest.importorskip("peft")
TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def importable_rewards(monkeypatch):
    monkeypatch.syspath_prepend(TESTS)


def _pair(root, case):
    base_dir, ad_dir = _adapter(root, case, dtype=torch.float32)
    tiny_tokenizer().save_pretrained(base_dir)
    return base_dir, ad_dir


def _tied_pair(root, modules):
    """A tied-embedding Llama (no lm_head.weight in its checkpoint) and a q/v adapter that saves `modules` whole:
    expo's merged output unties them (the head stays the SFT's embedding, as in PEFT's model)."""
    from helpers import llama_config
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config(tied=True))
    base_dir, ad_dir = os.path.join(str(root), "tied-base"), os.path.join(str(root), "tied-adapter")
    base.save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            modules_to_save=modules))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(ad_dir)
    return base_dir, ad_dir


@pytest.mark.parametrize("case", ["qv", "mlp-rslora", "saved-head", "tied-saved-embed", "tied-saved-head"])
def test_scaled_adapter_equals_the_merged_model(case, tmp_path):
    """After load_weights(alpha) the live PEFT model's logits equal those of transformers loading `expo
    extrapolate`'s merged output for that alpha (float32: to 1e-5 of the logits' scale), for alphas set in an order
    that would show a scaling compounded from the previous one (2.5 after 0.5, then 0)."""
    from transformers import AutoModelForCausalLM

    if case.startswith("tied"):
        base_dir, ad_dir = _tied_pair(tmp_path, ["embed_tokens" if case.endswith("embed") else "lm_head"])
    else:
        base_dir, ad_dir = _pair(tmp_path, case)
    sft = open_checkpoint(base_dir)
    adapter = open_adapter(ad_dir, sft)
    backend = open_backend("transformers", adapter.sft, adapter.aligned, "cpu", 1 << 20, adapter=adapter)
    ids = torch.tensor([[1, 10, 20, 30, 40, 50, 60, 70]])
    for alpha in (0.5, 2.5, 0.0):
        assert backend.load_weights(alpha) == {}
        with torch.no_grad():
            live = backend.model(input_ids=ids).logits
        out = str(tmp_path / f"merged-{alpha}")
        extrapolate(base_dir, ad_dir, alpha, out)
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        with torch.no_grad():
            want = merged(input_ids=ids).logits
        assert (live - want).abs().max() <= 1e-5 * want.abs().max(), (case, alpha)


@pytest.mark.parametrize("tied", [False, True])
def test_search_with_an_adapter_end_to_end(tmp_path, tied):
    """A whole search on an adapter (greedy, a grid), the report's key covering the adapter's files, and
    --write-best writing the merged model of the best alpha; also for a tied model whose adapter saves the
    embedding (the output is untied)."""
    base_dir, ad_dir = _tied_pair(tmp_path, ["embed_tokens"]) if tied else _pair(tmp_path, "saved-head")
    prompts = tmp_path / "p.txt"
    prompts.write_text("w10 w11\nw20\nw30 w31\nw40\n")
    rep, best = str(tmp_path / "rep"), str(tmp_path / "best")
    rec = search(base_dir, ad_dir, str(prompts), rep, reward_fn="search_rewards:word_sum", alpha="1,3",
                 temperature=0, max_new_tokens=5, device="cpu", holdout=0, write_best=best)
    assert [e["alpha"] for e in rec["evaluations"]] == [0.0, 1.0, 3.0]
    names = [n for n, _ in rec["inputs"]["aligned"]["adapter_files"]]
    assert "adapter_config.json" in names and "adapter_model.safetensors" in names
    rows = [json.loads(x) for x in open(os.path.join(rep, "responses.jsonl"))]
    at = lambda a: [x["response"] for x in rows if x["alpha"] == a]  # noqa: E731
    assert at(0.0) != at(3.0)  # the scaling changes what the model says
    with open(os.path.join(best, "expo.json")) as f:
        assert json.load(f)["alpha"] == rec["best"]["alpha"]


def test_drop_with_an_adapter_is_refused(tmp_path):
    from expo_engine import OptionError

    base_dir, ad_dir = _pair(tmp_path, "qv")
    prompts = tmp_path / "p.txt"
    prompts.write_text("w10\nw20\n")
    with pytest.raises(OptionError, match="--drop with a LoRA adapter as --aligned"):
        search(base_dir, ad_dir, str(prompts), str(tmp_path / "rep"), reward_fn="search_rewards:word_sum",
               alpha="1", drop=["lm_head"], device="cpu", holdout=0)
