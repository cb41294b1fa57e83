"""A LoRA adapter as the aligned side (PEFT adapters made by `peft` on tiny transformers models): the merged ExPO
model, exact against float64; its logits against PEFT's own merge with the effect scaled by 1 + alpha; the scaled
adapter (`--as-adapter`) loaded by PEFT; bad adapters refused."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import assert_user_error, llama_config, load_output, run_expo, snapshot

from expo_engine import MismatchError, extrapolate, verify
from expo_engine.api import scale_adapter
from expo_engine.kernels import error_steps

peft = pytest.importorskip("peft")

ALPHA = 0.5
CASES = {
    "qv": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "mlp-rslora": dict(r=8, lora_alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"], use_rslora=True),
    "saved-head": dict(r=2, lora_alpha=3, target_modules=["q_proj", "o_proj"], modules_to_save=["lm_head"]),
}


def _base(dtype):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config()).to(dtype)


def _adapter(root, case: str, dtype=torch.bfloat16):
    """(base folder, adapter folder): a LoRA adapter on the tiny Llama, B made non-zero (as training would) and
    the saved modules changed."""
    from peft import LoraConfig, get_peft_model

    base = _base(dtype)
    base_dir = os.path.join(str(root), f"base-{case}-{dtype}")
    base.save_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(**CASES[case]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)
    ad_dir = os.path.join(str(root), f"adapter-{case}-{dtype}")
    model.save_pretrained(ad_dir)
    return base_dir, ad_dir


def _peft_scaled(base_dir, ad_dir, factor, dtype):
    """PEFT's own model with the adapter's effect scaled by `factor`: every LoRA layer's scaling times factor, and
    every module it saved whole extrapolated from the base's (saved + (factor - 1) (saved - base))."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype), ad_dir)
    done = set()  # tied saved modules (ensure_weight_tying) share one parameter: extrapolate it once
    for module in model.modules():
        if hasattr(module, "scaling") and isinstance(module.scaling, dict):
            module.scaling = {k: v * factor for k, v in module.scaling.items()}
        if hasattr(module, "original_module") and hasattr(module, "modules_to_save"):
            with torch.no_grad():
                for name, p in module.modules_to_save["default"].named_parameters():
                    if p.data_ptr() not in done:
                        done.add(p.data_ptr())
                        p.copy_(p + (factor - 1) * (p - module.original_module.get_parameter(name)))
    return model


IDS = torch.tensor([[1, 5, 9, 33, 70, 127]])


def _merged_equals_peft(base_dir, ad_dir, out):
    """Write the merged float32 output to `out`, check its logits equal PEFT's scaled merge; return it."""
    from transformers import AutoModelForCausalLM

    extrapolate(base_dir, ad_dir, ALPHA, out)
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    theirs = _peft_scaled(base_dir, ad_dir, 1 + ALPHA, torch.float32).merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, rtol=1e-5, atol=1e-5)
    return ours


@pytest.mark.parametrize("case", list(CASES))
def test_merged_output_is_exact(case, tmp_path):
    """Every element of the merged model is the float64 formula sft + (1 + alpha) s B A (saved modules:
    aligned + alpha (aligned - sft)) rounded once to bf16, within one step; verify passes."""
    from safetensors.torch import load_file

    base_dir, ad_dir = _adapter(tmp_path, case)
    out = str(tmp_path / "out")
    before = snapshot(ad_dir)
    extrapolate(base_dir, ad_dir, ALPHA, out, chunk_bytes=1000)
    assert snapshot(ad_dir) == before
    got, sft = load_output(out), load_file(os.path.join(base_dir, "model.safetensors"))
    cfg = json.load(open(os.path.join(ad_dir, "adapter_config.json")))
    lora = load_file(os.path.join(ad_dir, "adapter_model.safetensors"))
    adapted = 0
    for name, s in sft.items():
        module = "base_model.model." + name[: -len(".weight")]
        if f"{module}.lora_A.weight" in lora:
            a_, b_ = lora[f"{module}.lora_A.weight"].double(), lora[f"{module}.lora_B.weight"].double()
            r = a_.shape[0]
            scale = cfg["lora_alpha"] / (r ** 0.5 if cfg.get("use_rslora") else r)
            aligned = s.double() + scale * (b_ @ a_)
            adapted += 1
        elif "base_model.model." + name in lora:
            aligned = lora["base_model.model." + name].double()
        else:
            aligned = s.double()
        steps = error_steps(got[name].reshape(-1), s.reshape(-1), aligned.reshape(-1), ALPHA)
        assert steps.max().item() <= 1, (case, name, steps.max().item())
    assert adapted == 2 * len(CASES[case]["target_modules"])
    with open(os.path.join(out, "expo.json")) as f:
        prov = json.load(f)
    assert prov["aligned"]["format"] == "lora adapter"
    assert os.path.exists(os.path.join(out, "config.json"))  # the SFT model's config: the output loads


@pytest.mark.parametrize("case", list(CASES))
def test_merged_logits_equal_peft_scaled_merge(case, tmp_path):
    """In float32 (where PEFT's own merge rounds no more than ours), the merged output's logits equal PEFT's merge
    of the adapter with its effect scaled by 1 + alpha."""
    from transformers import AutoModelForCausalLM

    base_dir, ad_dir = _adapter(tmp_path, case, torch.float32)
    ours = _merged_equals_peft(base_dir, ad_dir, str(tmp_path / "out"))
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        assert not torch.allclose(base(IDS).logits, ours(IDS).logits, atol=1e-3)  # the adapter did change it


@pytest.mark.parametrize("case", list(CASES))
def test_scaled_adapter_loads_in_peft_with_the_scaled_effect(case, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, ad_dir = _adapter(tmp_path, case, torch.float32)
    out = str(tmp_path / "scaled")
    rc, printed, err = run_expo(capsys, "extrapolate", "--sft", base_dir, "--aligned", ad_dir, "--alpha", str(ALPHA),
                                "--out", out, "--as-adapter")
    assert rc == 0, err
    assert f"{1 + ALPHA:g} x the effect of" in printed
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert cfg["lora_alpha"] == CASES[case]["lora_alpha"] * (1 + ALPHA)
    assert os.path.getsize(os.path.join(out, "adapter_model.safetensors")) < 200_000
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), out)
    want = _peft_scaled(base_dir, ad_dir, 1 + ALPHA, torch.float32)
    ids = torch.tensor([[1, 5, 9, 33, 70, 127]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want(ids).logits, rtol=1e-5, atol=1e-5)
        merged = str(tmp_path / "merged")  # and the same model as the merged output
        extrapolate(base_dir, ad_dir, ALPHA, merged)
        torch.testing.assert_close(loaded(ids).logits, AutoModelForCausalLM.from_pretrained(
            merged, dtype=torch.float32)(ids).logits, rtol=1e-5, atol=1e-5)


def test_bad_adapters_are_refused(tmp_path, capsys):
    base_dir, ad_dir = _adapter(tmp_path, "qv")
    cfg_path = os.path.join(ad_dir, "adapter_config.json")
    cfg = json.load(open(cfg_path))
    out = str(tmp_path / "out")

    def refused(change, *needles):
        json.dump({**cfg, **change}, open(cfg_path, "w"))
        capsys.readouterr()
        rc, _, err = run_expo(capsys, "extrapolate", "--sft", base_dir, "--aligned", ad_dir, "--alpha", "0.5",
                              "--out", out)
        assert_user_error(rc, err, *needles)
        assert not os.path.exists(out)

    refused({"use_dora": True}, "DoRA", "only plain LoRA and rsLoRA")
    refused({"peft_type": "IA3"}, "a PEFT IA3 adapter", "expo takes LoRA adapters")
    refused({"bias": "all"}, "trained biases")
    refused({"base_model_name_or_path": str(tmp_path)}, "the adapter was trained on", "not on --sft")
    json.dump(cfg, open(cfg_path, "w"))
    from transformers import LlamaConfig, LlamaForCausalLM

    other = str(tmp_path / "other")  # another base: wider hidden size
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=128)).save_pretrained(other)
    with pytest.raises(MismatchError, match=r"adapter tensor\(s\) do not fit the SFT model .* is it an adapter for"):
        extrapolate(other, ad_dir, 0.5, out)
    assert not os.path.exists(out)


def test_the_merged_output_verifies_and_the_python_api(tmp_path):
    from expo_engine import OptionError, OutputError

    base_dir, ad_dir = _adapter(tmp_path, "saved-head")
    out = str(tmp_path / "out")
    extrapolate(base_dir, ad_dir, ALPHA, out)
    assert verify(out).ok  # structure and checksums (the elements need an aligned checkpoint to compare with)
    rec = scale_adapter(base_dir, ad_dir, 2.0, str(tmp_path / "scaled"))
    assert rec["adapter"]["lora_alpha_factor"] == 3.0 and sorted(os.listdir(tmp_path / "scaled")) == [
        "adapter_config.json", "adapter_model.safetensors", "expo.json"]
    with pytest.raises(OutputError, match="exists and is not empty"):
        scale_adapter(base_dir, ad_dir, 2.0, str(tmp_path / "scaled"))
    with pytest.raises(OptionError, match="needs a LoRA adapter folder"):
        scale_adapter(base_dir, base_dir, 2.0, str(tmp_path / "x"))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no staging left behind


def test_norms_with_an_adapter_as_one_side(tmp_path):
    """`expo norms BASE ADAPTER`: the change of each adapted weight is s B A (float64 sums, B @ A a row block at a
    time), of a saved module its own change, of the rest zero."""
    from safetensors.torch import load_file

    from expo_engine import OptionError, parameter_norms
    from expo_engine.norms import reference_stats

    base_dir, ad_dir = _adapter(tmp_path, "saved-head")
    (report,) = parameter_norms([base_dir, ad_dir], chunk_bytes=900)
    sft, lora = load_file(os.path.join(base_dir, "model.safetensors")), load_file(
        os.path.join(ad_dir, "adapter_model.safetensors"))
    scale = CASES["saved-head"]["lora_alpha"] / CASES["saved-head"]["r"]
    module = "model.layers.1.self_attn.q_proj"
    a_, b_ = lora[f"base_model.model.{module}.lora_A.weight"], lora[f"base_model.model.{module}.lora_B.weight"]
    want = reference_stats(sft[module + ".weight"].double(),
                           sft[module + ".weight"].double() + scale * (b_.double() @ a_.double()))
    got = report.tensors[module + ".weight"].summary()
    for key in ("fro", "relative", "max_abs", "cosine"):
        assert got[key] == pytest.approx(want[key], rel=1e-9), key
    head = reference_stats(sft["lm_head.weight"], lora["base_model.model.lm_head.weight"])
    assert report.tensors["lm_head.weight"].summary()["fro"] == pytest.approx(head["fro"], rel=1e-12)
    assert report.tensors["model.layers.0.self_attn.k_proj.weight"].summary()["fro"] == 0
    with pytest.raises(OptionError, match="compared with its base model alone"):
        parameter_norms([base_dir, ad_dir, base_dir])


def test_gpt2_conv1d_adapter_fan_in_fan_out(tmp_path):
    """GPT-2's Conv1D stores weights as [in, out] (PEFT's fan_in_fan_out): the change is (B @ A)^T. The merged
    output's float32 logits equal PEFT's scaled merge."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64))
    base_dir, ad_dir = str(tmp_path / "base"), str(tmp_path / "adapter")
    base.save_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                            fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(ad_dir)
    _merged_equals_peft(base_dir, ad_dir, str(tmp_path / "out"))


def test_a_killed_adapter_merge_resumes_byte_identical(tmp_path):
    """The merged output from an adapter journals its units like any run: killed (SIGKILL) after its 5th chunk,
    the same command resumes from the journal and the result is byte-identical to an uninterrupted run."""
    import hashlib

    from helpers import expo_process, leftovers

    from expo_engine.writer import FAULT_KILL_AT

    base_dir, ad_dir = _adapter(tmp_path, "mlp-rslora")
    args = ["extrapolate", "--sft", base_dir, "--aligned", ad_dir, "--alpha", "0.5", "--chunk-mb", "0.002",
            "--unit-mb", "0.004", "--out"]
    killed = expo_process(*args, str(tmp_path / "out"), env={FAULT_KILL_AT: "chunk:4"})
    assert killed.returncode == -9, killed.stderr
    again = expo_process(*args, str(tmp_path / "out"))
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stderr and "resumed:" in again.stdout
    whole = expo_process(*args, str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr

    def digest(folder):
        with open(os.path.join(folder, "model.safetensors"), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    assert digest(tmp_path / "out") == digest(tmp_path / "whole")
    assert not leftovers(str(tmp_path / "out"))
