"""Naming: what a tensor's name says (its layer number and module kind) and which names two checkpoints share.

Used by the plan (which tensors an output holds), the alpha rules (`kind:mlp`, layer ramps) and the norm reports
(aggregates per layer and kind), so that all three read names the same way.
"""

from __future__ import annotations

import re

from .errors import MismatchError
from .sources import Checkpoint

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)\.")
_KINDS = [  # first match wins; patterns are searched in the tensor name
    ("qkv", r"(?:c_attn|query_key_value|qkv_proj|Wqkv|in_proj)"),
    ("q", r"(?:q_proj|\.query\b|\.wq\b|q_lin)"),
    ("k", r"(?:k_proj|\.key\b|\.wk\b|k_lin)"),
    ("v", r"(?:v_proj|\.value\b|\.wv\b|v_lin)"),
    ("o", r"(?:o_proj|out_proj|\.wo\b|attn\.c_proj|attention\.dense|attention\.output\.dense|self_attn\.dense)"),
    ("mlp", r"(?:mlp|feed_forward|ffn|gate_proj|up_proj|down_proj|fc1|fc2|c_fc|dense_h_to_4h|dense_4h_to_h|\.w[123]\b"
            r"|experts)"),
    ("norm", r"(?:norm|ln_|\.ln\d*\b|layernorm)"),
    ("embed", r"(?:embed|wte|wpe|word_embeddings|tok_embeddings|position_embeddings)"),
    ("head", r"(?:lm_head|^output\.|score\.|classifier)"),
]
_KIND_RES = [(k, re.compile(p)) for k, p in _KINDS]
KINDS = [k for k, _ in _KINDS] + ["other"]


def classify(name: str) -> tuple[int | None, str]:
    """(layer index or None, module kind) from a tensor name; unknown names fall back to kind 'other'."""
    m = _LAYER.search(name)
    layer = int(m.group(1)) if m else None
    for kind, pattern in _KIND_RES:
        if pattern.search(name):
            return layer, kind
    return layer, "other"


def shared_names(sft: Checkpoint, aligned: Checkpoint) -> list[str]:
    """Names on both sides, in the aligned checkpoint's order; any other name is an error unless it is a tie.

    A tie is a name on one side only whose bytes are another tensor's (a `.bin` saved with tied embeddings holds
    `lm_head.weight` as a view of `model.embed_tokens.weight`; save_pretrained's safetensors drop it). It is left
    out of the output, as save_pretrained does.
    """
    only_sft = untied_extras(sft, aligned)
    only_aligned = untied_extras(aligned, sft)
    if only_sft or only_aligned:
        parts = []
        if only_sft:
            parts.append(f"{len(only_sft)} only in the SFT checkpoint (first: {', '.join(only_sft[:5])})")
        if only_aligned:
            parts.append(f"{len(only_aligned)} only in the aligned checkpoint (first: {', '.join(only_aligned[:5])})")
        raise MismatchError(
            "the checkpoints hold different tensors: " + "; ".join(parts)
            + ". ExPO needs an SFT checkpoint and an aligned checkpoint trained from it"
        )
    return [n for n in aligned.tensors if n in sft.tensors]


def untied_extras(ck: Checkpoint, other: Checkpoint) -> list[str]:
    """Names in `ck` but not in `other` that are not ties to a name both sides share."""
    shared = {(t.file, t.offset, t.nbytes) for n, t in ck.tensors.items() if n in other.tensors}
    return [n for n, t in ck.tensors.items() if n not in other.tensors and (t.file, t.offset, t.nbytes) not in shared]
