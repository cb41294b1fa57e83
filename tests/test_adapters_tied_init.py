"""Adapters whose aligned model is not plain `sft + s B A` on the SFT's own tensors (issue 20, items 2, 3, 13d), made by
`peft` on tiny transformers models and checked against PEFT's own model:

- initialisations that change the base weights (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ) are refused in one line by
  every path (merge, --as-adapter, norms); PiSSA converted to plain LoRA with PEFT's
  `path_initial_model_for_weight_conversion` is accepted and exact;
- tied embeddings (Qwen2 with tie_word_embeddings, GPT-2) where the adapter saves or targets the embedding or the
  head: the output unties them as PEFT's model has them (or stays tied where the adapter ties its own changes);
- a targeted lm_head (PEFT saves `lm_head.base_layer.weight`) on an untied model.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from helpers import assert_user_error, llama_config, run_expo
from test_adapters import _peft_scaled

from expo_engine import MismatchError, extrapolate, parameter_norms
from expo_engine.api import scale_adapter
from expo_engine.kernels import error_steps

peft = pytest.importorskip("peft")

ALPHA = 0.5
IDS = torch.tensor([[1, 5, 9, 33, 70, 127, 64, 2]])
warnings.filterwarnings("ignore", message=".*tie.*")


def _qwen_tied():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                        max_position_embeddings=64, tie_word_embeddings=True))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))


def _llama():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(llama_config())


def _make(root, name: str, model_fn, **lora):
    """(base folder, adapter folder): `lora` applied by peft to a fresh tiny model (float32, eval mode), every
    LoRA factor and saved module moved off its initial value (PEFT starts B, and an embedding's A, at zero)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = model_fn().eval()
    base_dir, ad_dir = os.path.join(str(root), f"base-{name}"), os.path.join(str(root), f"adapter-{name}")
    base.save_pretrained(base_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, LoraConfig(**lora))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_embedding" in n or "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(ad_dir)
    return base_dir, ad_dir


def _peft_model(base_dir, ad_dir, factor: float = 1.0, merge: bool = False):
    """PEFT's model with the adapter loaded (unmerged unless `merge`), its effect scaled by `factor`: every LoRA
    scaling times factor, every saved module extrapolated from the base's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _peft_scaled(base_dir, ad_dir, factor, torch.float32)
    return (model.merge_and_unload() if merge else model).eval()


def _effective(model):
    """(embedding, head) matrices of a loaded model, as its forward uses them, in float64."""
    with torch.no_grad():
        emb = model.get_input_embeddings()(torch.arange(128))
        head = model.get_output_embeddings()(torch.eye(32))
    return emb.double(), head.T.double()


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _expo(capsys, *args):
    capsys.readouterr()  # what building the models printed (progress bars) is not the command's
    return run_expo(capsys, *args)


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


# ------------------------------------------------------------------------------------------------------------------
# 2. initialisations that change the base weights

def _pissa(root):
    """PEFT's PiSSA flow: the initial adapter saved with init_lora_weights True (as PEFT's docs say), "training",
    the trained adapter saved as is and converted to plain LoRA. Returns the folders and the trained model's logits
    (on the residual base PiSSA made: the truth the converted adapter must reproduce on the original base)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = _llama().eval()
    base_dir = os.path.join(str(root), "base")
    base.save_pretrained(base_dir)
    before = _logits(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights="pissa"))
    assert torch.allclose(_logits(model), before, atol=1e-4)  # PiSSA starts at the base model ...
    assert (model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
            - _load(base_dir).model.layers[0].self_attn.q_proj.weight).abs().max() > 0.01  # ... on a changed base
    init_dir, pissa_dir, conv_dir = (os.path.join(str(root), n) for n in ("init", "pissa", "converted"))
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(init_dir)
    model.peft_config["default"].init_lora_weights = "pissa"
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        trained = _logits(model)
    model.save_pretrained(pissa_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(conv_dir, path_initial_model_for_weight_conversion=init_dir)
    return base_dir, pissa_dir, conv_dir, trained


def test_pissa_refused_everywhere_and_its_converted_form_is_exact(tmp_path, capsys):
    from safetensors.torch import load_file

    base_dir, pissa_dir, conv_dir, trained = _pissa(tmp_path)
    out = str(tmp_path / "out")
    # the unconverted adapter, merged as plain LoRA, would be far off the trained model: refused on every path
    for args in (["--out", out], ["--out", out, "--as-adapter"]):
        rc, _, err = _expo(capsys, "extrapolate", "--sft", base_dir, "--aligned", pissa_dir, "--alpha", "0", *args)
        assert_user_error(rc, err, pissa_dir, "a PiSSA adapter (init_lora_weights 'pissa')",
                          "path_initial_model_for_weight_conversion")
        assert not os.path.exists(out)
    rc, _, err = _expo(capsys, "norms", base_dir, pissa_dir)
    assert_user_error(rc, err, "PiSSA", "path_initial_model_for_weight_conversion")
    with pytest.raises(MismatchError, match="PiSSA"):
        scale_adapter(base_dir, pissa_dir, 0.5, out)
    with pytest.raises(MismatchError, match="PiSSA"):
        parameter_norms([base_dir, pissa_dir])

    # the converted adapter: plain LoRA of twice the rank (lora_alpha doubled too, so s is unchanged)
    cfg = json.load(open(os.path.join(conv_dir, "adapter_config.json")))
    assert cfg["init_lora_weights"] is True and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    lora = load_file(os.path.join(conv_dir, "adapter_model.safetensors"))
    a_name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert lora[a_name].shape == (8, 32)
    extrapolate(base_dir, conv_dir, 0.0, out)
    ours = _logits(_load(out))
    torch.testing.assert_close(ours, _logits(_peft_model(base_dir, conv_dir, merge=True)), rtol=0, atol=2e-5)
    torch.testing.assert_close(ours, trained, rtol=0, atol=5e-5)  # the model PiSSA trained, on the original base

    # alpha > 0: every element is the float64 formula, rounded once (to bf16: within one step)
    out2, out3 = str(tmp_path / "out2"), str(tmp_path / "out3")
    extrapolate(base_dir, conv_dir, ALPHA, out2, chunk_bytes=1000)
    extrapolate(base_dir, conv_dir, ALPHA, out3, chunk_bytes=1000, dtype="bf16")
    got, sft = load_file(os.path.join(out3, "model.safetensors")), load_file(os.path.join(base_dir,
                                                                                         "model.safetensors"))
    adapted = 0
    for name, s in sft.items():
        module = "base_model.model." + name[: -len(".weight")]
        aligned = s.double()
        if f"{module}.lora_A.weight" in lora:
            b_, a_ = lora[f"{module}.lora_B.weight"].double(), lora[f"{module}.lora_A.weight"].double()
            aligned = aligned + 2.0 * (b_ @ a_)  # s = 16 / 8
            adapted += 1
        assert error_steps(got[name].reshape(-1), s.reshape(-1), aligned.reshape(-1), ALPHA).max() <= 1, name
    assert adapted == 6
    torch.testing.assert_close(_logits(_load(out2)), _logits(_peft_model(base_dir, conv_dir, 1 + ALPHA, merge=True)),
                               rtol=0, atol=5e-5)
    scale_adapter(base_dir, conv_dir, ALPHA, str(tmp_path / "scaled"))  # the other paths take it too
    (report,) = parameter_norms([base_dir, conv_dir])
    assert report.tensors["model.layers.0.self_attn.q_proj.weight"].summary()["fro"] > 0


@pytest.mark.parametrize("change, kind", [
    ({"init_lora_weights": "pissa_niter_4"}, "a PiSSA adapter (init_lora_weights 'pissa_niter_4')"),
    ({"init_lora_weights": "olora"}, "an OLoRA adapter"),
    ({"init_lora_weights": "corda", "corda_config": {"corda_method": "ipm"}}, "a CorDA adapter"),
    ({"init_lora_weights": "lora_ga"}, "a LoRA-GA adapter"),
    ({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}}, "a LoftQ adapter"),
    ({"loftq_config": {"loftq_bits": 4}}, "a LoftQ adapter"),
    ({"init_lora_weights": "something_new"}, "init_lora_weights 'something_new' is an initialisation expo does not"),
])
def test_base_changing_initialisations_are_refused(change, kind, tmp_path, capsys):
    """Every initialisation that changes the base weights, by init_lora_weights or by a LoftQ config, in one line
    that names the adapter; a plain init (gaussian, eva, orthogonal) and the converted forms' leftovers (corda_config
    and lora_ga_config stay in a converted adapter's config) are accepted."""
    base_dir, ad_dir = _make(tmp_path, "qv", _llama, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    path = os.path.join(ad_dir, "adapter_config.json")
    cfg = json.load(open(path))
    json.dump({**cfg, **change}, open(path, "w"))
    out = str(tmp_path / "out")
    rc, _, err = _expo(capsys, "extrapolate", "--sft", base_dir, "--aligned", ad_dir, "--alpha", "0.5", "--out", out)
    assert_user_error(rc, err, ad_dir, kind)
    if "expo does not" not in kind and "LoftQ" not in kind:
        assert "path_initial_model_for_weight_conversion" in err
    rc, _, err = _expo(capsys, "norms", base_dir, ad_dir)
    assert_user_error(rc, err, kind)
    for plain in ({"init_lora_weights": "gaussian"}, {"init_lora_weights": "eva"},
                  {"init_lora_weights": True, "corda_config": {"corda_method": "ipm"}, "lora_ga_config": {}}):
        json.dump({**cfg, **plain}, open(path, "w"))
        parameter_norms([base_dir, ad_dir])


# ------------------------------------------------------------------------------------------------------------------
# 3 and 13d. tied embeddings, a targeted or saved head or embedding

TIED = {  # name: (model, LoraConfig, output tied?, whether PEFT's merge_and_unload equals PEFT's own loaded model)
    "qwen-save-embed": (_qwen_tied, dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]), False, True),
    "gpt2-save-wte": (_gpt2, dict(target_modules=["c_attn"], modules_to_save=["wte"], fan_in_fan_out=True), False,
                      True),
    "qwen-save-head": (_qwen_tied, dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), False, True),
    "qwen-save-embed-tied": (_qwen_tied, dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                              ensure_weight_tying=True), True, True),
    "llama-lora-head": (_llama, dict(target_modules=["q_proj", "lm_head"]), False, True),
    "llama-lora-embed": (_llama, dict(target_modules=["v_proj", "embed_tokens"]), False, True),
    # LoRA on a tied layer: PEFT's merge writes the change into the tensor both share (and twice with
    # ensure_weight_tying), so its merged model differs from the model it trained and loads; expo follows the latter
    "qwen-lora-head": (_qwen_tied, dict(target_modules=["q_proj", "lm_head"]), False, False),
    "qwen-lora-embed": (_qwen_tied, dict(target_modules=["q_proj", "embed_tokens"]), False, False),
    "qwen-lora-head-tied": (_qwen_tied, dict(target_modules=["q_proj", "lm_head"], ensure_weight_tying=True), True,
                            False),
}


@pytest.mark.parametrize("case", list(TIED))
def test_tied_and_head_adapters_equal_peft_model(case, tmp_path, capsys):
    """alpha 0: the output's logits are PEFT's model's (and its merge_and_unload's where that equals it); alpha 0.5:
    the embedding and the head are the float64 formula on PEFT's effective ones, the logits PEFT's model with the
    effect scaled by 1.5. An untied output says so: a notice, config.json, expo.json."""
    from safetensors.torch import load_file

    model_fn, lora, tied, merge_agrees = TIED[case]
    base_dir, ad_dir = _make(tmp_path, case, model_fn, r=4, lora_alpha=8, **lora)
    sft_tied = "lm_head.weight" not in load_file(os.path.join(base_dir, "model.safetensors"))
    out = str(tmp_path / "out")
    rc, _, err = _expo(capsys, "extrapolate", "--sft", base_dir, "--aligned", ad_dir, "--alpha", "0", "--out", out)
    assert rc == 0, err
    ours, theirs = _load(out), _peft_model(base_dir, ad_dir)
    diff = (_logits(ours) - _logits(theirs)).abs().max().item()
    assert diff < 2e-5, (case, diff)
    if merge_agrees:
        torch.testing.assert_close(_logits(ours), _logits(_peft_model(base_dir, ad_dir, merge=True)), rtol=0,
                                   atol=2e-5)
    assert not torch.allclose(_logits(ours), _logits(_load(base_dir)), atol=1e-3)  # the adapter did change it
    config = json.load(open(os.path.join(out, "config.json")))
    prov = json.load(open(os.path.join(out, "expo.json")))
    written = load_file(os.path.join(out, "model.safetensors"))
    if sft_tied and not tied:
        assert config["tie_word_embeddings"] is False and "lm_head.weight" in written
        assert "unties them" in err and "tie_word_embeddings false" in err
        assert prov["adapter"]["untied"]["head"] == "lm_head.weight"
    elif sft_tied:
        assert config["tie_word_embeddings"] is True and "lm_head.weight" not in written
        assert prov["adapter"]["tied"]["embedding"]

    out2 = str(tmp_path / "out2")
    extrapolate(base_dir, ad_dir, ALPHA, out2, chunk_bytes=700)
    got = _load(out2)
    torch.testing.assert_close(_logits(got), _logits(_peft_model(base_dir, ad_dir, 1 + ALPHA)), rtol=0, atol=5e-5)
    sft_emb, sft_head = _effective(_load(base_dir))
    al_emb, al_head = _effective(theirs)
    for (mine, s, a) in zip(_effective(got), (sft_emb, sft_head), (al_emb, al_head), strict=True):
        want = s + (1 + ALPHA) * (a - s)
        assert (mine - want).abs().max().item() < 1e-6, case


@pytest.mark.parametrize("case", ["qwen-save-embed", "qwen-lora-head", "qwen-lora-head-tied"])
def test_tied_adapters_as_adapter_and_norms(case, tmp_path):
    """--as-adapter on a tied model: PEFT loads the scaled adapter as the original with its effect times 1 + alpha;
    expo norms reports the head's change where the adapter unties it (zero where only the embedding changed)."""
    model_fn, lora, tied, _ = TIED[case]
    base_dir, ad_dir = _make(tmp_path, case, model_fn, r=4, lora_alpha=8, **lora)
    scaled = str(tmp_path / "scaled")
    scale_adapter(base_dir, ad_dir, ALPHA, scaled)
    torch.testing.assert_close(_logits(_peft_model(base_dir, scaled)),
                               _logits(_peft_model(base_dir, ad_dir, 1 + ALPHA)), rtol=0, atol=5e-5)
    (report,) = parameter_norms([base_dir, ad_dir])
    sft_emb, sft_head = _effective(_load(base_dir))
    al_emb, al_head = _effective(_peft_model(base_dir, ad_dir))
    embed = "model.embed_tokens.weight"
    if tied:
        assert "lm_head.weight" not in report.tensors
        assert report.tensors[embed].summary()["fro"] == pytest.approx((al_emb - sft_emb).norm().item(), rel=1e-5)
    else:
        for name, s, a in ((embed, sft_emb, al_emb), ("lm_head.weight", sft_head, al_head)):
            assert report.tensors[name].summary()["fro"] == pytest.approx((a - s).norm().item(), rel=1e-5, abs=1e-9)


def test_a_base_copy_that_is_not_the_sft_weight_is_refused(tmp_path, capsys):
    """A targeted head's saved base weight (lm_head.base_layer.weight), which PEFT loads over the model's, must be
    the SFT's: an adapter trained on another base is refused in one line."""
    from safetensors.torch import load_file, save_file

    base_dir, ad_dir = _make(tmp_path, "head", _llama, r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    path = os.path.join(ad_dir, "adapter_model.safetensors")
    tensors = load_file(path)
    tensors["base_model.model.lm_head.base_layer.weight"][3, 4] += 0.5
    save_file(tensors, path)
    rc, _, err = _expo(capsys, "extrapolate", "--sft", base_dir, "--aligned", ad_dir, "--alpha", "0.5", "--out",
                          str(tmp_path / "out"))
    assert_user_error(rc, err, "its copy of the base weight lm_head.weight", "differs from --sft's lm_head.weight")
