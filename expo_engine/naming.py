"""Naming: what a tensor's name says (its layer number and module kind) and which names two checkpoints share.

Used by the plan (which tensors an output holds), the alpha rules (`kind:mlp`, layer ramps) and the norm reports
(aggregates per layer and kind), so that all three read names the same way.
"""

from __future__ import annotations

import re

from .errors import MismatchError, OptionError
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


# Tensors that RLHF and reward-model training add on top of a causal LM: TRL's value heads (`v_head.summary.*`),
# reward and classification heads (`score.*`, `reward_head.*`, `value_head.*`).
_HEADS = re.compile(r"^(?:v_head|value_head|reward_head|score|summary)\.")


def listing(names: list[str], first: int = 5) -> str:
    """`a, b, c, d, e and 12 more`."""
    shown = ", ".join(names[:first])
    return shown + (f" and {len(names) - first} more" if len(names) > first else "")


def drop_filter(patterns) -> re.Pattern | None:
    """One regex for `--drop` patterns (each searched in tensor names), or None for none. OptionError if one does
    not compile."""
    patterns = list(patterns or ())
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise OptionError(f"--drop {p!r} is not a regular expression ({e})") from None
    return re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None


def dropped_names(sft: Checkpoint, aligned: Checkpoint, patterns) -> list[str]:
    """The tensor names of either side that `patterns` leave out, sorted. OptionError for a pattern that matches
    no tensor (a typo would otherwise drop nothing, silently)."""
    rx = drop_filter(patterns)
    names = sorted(set(sft.tensors) | set(aligned.tensors))
    for p in patterns or ():
        if not any(re.search(p, n) for n in names):
            raise OptionError(f"--drop {p!r} matches no tensor of either checkpoint")
    return [n for n in names if rx.search(n)] if rx else []


def shared_names(sft: Checkpoint, aligned: Checkpoint, drop=()) -> list[str]:
    """Names on both sides, in the aligned checkpoint's order, less those the `drop` patterns leave out; any other
    name is an error unless it is a tie. The error lists every name on one side only (a count and the first few per
    side) and suggests `--drop` for the heads RLHF training adds.

    A tie is a name on one side only whose bytes are another tensor's (a `.bin` saved with tied embeddings holds
    `lm_head.weight` as a view of `model.embed_tokens.weight`; save_pretrained's safetensors drop it). It is left
    out of the output, as save_pretrained does.
    """
    rx = drop_filter(drop)
    kept = (lambda n: not rx.search(n)) if rx else (lambda n: True)
    only_sft = [n for n in untied_extras(sft, aligned) if kept(n)]
    only_aligned = [n for n in untied_extras(aligned, sft) if kept(n)]
    if only_sft or only_aligned:
        parts = []
        if only_sft:
            parts.append(f"{len(only_sft)} only in the SFT checkpoint ({listing(only_sft)})")
        if only_aligned:
            parts.append(f"{len(only_aligned)} only in the aligned checkpoint ({listing(only_aligned)})")
        heads = sorted({n.split(".")[0] for n in only_sft + only_aligned if _HEADS.search(n)})
        hint = (f"; {listing([n for n in only_sft + only_aligned if _HEADS.search(n)], 3)} look like a value or "
                f"reward head that RLHF training adds: {' '.join(f'--drop {chr(39)}^{h}[.]{chr(39)}' for h in heads)} "
                "leaves them out of the output" if heads else
                "; --drop PATTERN (a regex, repeatable) leaves tensors out of the output on purpose")
        raise MismatchError(
            "the checkpoints hold different tensors: " + "; ".join(parts)
            + ". ExPO needs an SFT checkpoint and an aligned checkpoint trained from it" + hint
        )
    return [n for n in aligned.tensors if n in sft.tensors and kept(n)]


def untied_extras(ck: Checkpoint, other: Checkpoint) -> list[str]:
    """Names in `ck` but not in `other` that are not ties to a name both sides share."""
    shared = {(t.file, t.offset, t.nbytes) for n, t in ck.tensors.items() if n in other.tensors}
    return [n for n, t in ck.tensors.items() if n not in other.tensors and (t.file, t.offset, t.nbytes) not in shared]
