"""Alpha rules: the alpha of every tensor, from the base alpha and an ordered list of rules (first match wins).

A rule selects tensors and says what their alpha is:

- what it selects: `pattern` (a Python regular expression, searched in the tensor name with `re.search`),
  `kind` (a module kind as `expo norms` classifies names: qkv, q, k, v, o, mlp, norm, embed, head, other; or
  `embeddings` for embed and head together), or `ramp` (every tensor with a layer index);
- its value: a number (that alpha, the same at every point of a sweep) or `xF` (F times the base alpha, so it
  follows a sweep). A ramp has two values and goes linearly from the first at layer 0 to the second at the last
  layer (the highest layer index among the tensors).

Tensors that no rule selects get the base alpha. On the command line a rule is `PATTERN=VALUE` or
`kind:KIND=VALUE` (`--alpha-rule`, repeatable); a rules file (`--alpha-rules`, JSON, or YAML when PyYAML is
installed) holds a list of objects, each with one selector and its value:

    [{"kind": "embeddings", "alpha": 0},
     {"pattern": "mlp", "alpha": "x0.5"},
     {"ramp": [0.1, 0.5]}]

Every rule must select at least one floating-point tensor, so a misspelt pattern is an error, not a no-op.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

from .errors import OptionError
from .naming import KINDS, classify

EMBEDDINGS = "embeddings"  # the kind that stands for embed + head: those tensors can stay as aligned with 0
RULE_KINDS = [*KINDS, EMBEDDINGS]


@dataclass(frozen=True)
class Value:
    number: float
    scale: bool = False  # True: number times the base alpha ("x0.5")

    def at(self, base: float) -> float:
        return self.number * base if self.scale else self.number

    def __str__(self) -> str:
        return f"x{self.number:g}" if self.scale else f"{self.number:g}"


@dataclass(frozen=True)
class Rule:
    select: str  # "pattern", "kind" or "ramp"
    arg: str  # the regular expression, the kind, or "" for a ramp
    values: tuple[Value, ...]  # one, or (first layer, last layer) for a ramp
    text: str  # as the user wrote it, for messages and expo.json

    def matches(self, name: str) -> bool:
        if self.select == "pattern":
            return re.search(self.arg, name) is not None
        layer, kind = classify(name)
        if self.select == "kind":
            return kind == self.arg or (self.arg == EMBEDDINGS and kind in ("embed", "head"))
        return layer is not None  # ramp

    def alpha(self, name: str, base: float, last_layer: int) -> float:
        if self.select != "ramp":
            return self.values[0].at(base)
        first, last = (v.at(base) for v in self.values)
        layer = classify(name)[0]
        return first if last_layer == 0 else first + (last - first) * layer / last_layer


def parse_value(value, where: str) -> Value:
    """A number, or `xF` (F times the base alpha); finite."""
    text = str(value).strip() if not isinstance(value, bool) else ""
    scale = text[:1] in ("x", "X")
    try:
        number = float(text[1:] if scale else text)
    except ValueError:
        raise OptionError(f"{where}: {value!r} is not a number or xFACTOR (like 0.3 or x0.5)") from None
    if not math.isfinite(number):
        raise OptionError(f"{where}: {value!r} is not a finite number")
    return Value(number, scale)


def parse_rule(text: str) -> Rule:
    """`PATTERN=VALUE` or `kind:KIND=VALUE`, as given to --alpha-rule."""
    where = f"--alpha-rule {text!r}"
    target, eq, value = text.rpartition("=")
    if not eq or not target:
        raise OptionError(f"{where}: write it as PATTERN=VALUE (a regular expression and an alpha, like "
                          "'mlp=0.2' or 'lm_head=x0.5') or kind:KIND=VALUE")
    if target.startswith("kind:"):
        return _make("kind", target[len("kind:"):], (parse_value(value, where),), text, where)
    return _make("pattern", target, (parse_value(value, where),), text, where)


def rule_from_dict(d, where: str) -> Rule:
    """One entry of a rules file: {"pattern"|"kind": ..., "alpha": VALUE} or {"ramp": [FIRST, LAST]}."""
    if not isinstance(d, dict):
        raise OptionError(f"{where}: each rule must be an object like {{\"pattern\": \"mlp\", \"alpha\": 0.2}}, "
                          f"got {d!r}")
    selectors = [k for k in ("pattern", "kind", "ramp") if k in d]
    unknown = sorted(set(d) - {"pattern", "kind", "ramp", "alpha"})
    if unknown:
        raise OptionError(f"{where}: unknown key {unknown[0]!r}; a rule has one of pattern, kind, ramp, and alpha")
    if len(selectors) != 1:
        raise OptionError(f"{where}: a rule needs exactly one of pattern, kind or ramp, got {d!r}")
    select = selectors[0]
    text = json.dumps(d, separators=(", ", ": "))
    if select == "ramp":
        ramp = d["ramp"]
        if "alpha" in d or not isinstance(ramp, list) or len(ramp) != 2:
            raise OptionError(f"{where}: a ramp is {{\"ramp\": [FIRST, LAST]}}: the alpha at layer 0 and at the "
                              f"last layer, got {d!r}")
        return Rule("ramp", "", (parse_value(ramp[0], where), parse_value(ramp[1], where)), text)
    if "alpha" not in d:
        raise OptionError(f"{where}: the rule {text} has no alpha")
    if not isinstance(d[select], str):
        raise OptionError(f"{where}: {select} must be a string, got {d[select]!r}")
    return _make(select, d[select], (parse_value(d["alpha"], where),), text, where)


def _make(select: str, arg: str, values: tuple[Value, ...], text: str, where: str) -> Rule:
    if select == "kind" and arg not in RULE_KINDS:
        raise OptionError(f"{where}: unknown module kind {arg!r}; known kinds: {', '.join(RULE_KINDS)}")
    if select == "pattern":
        try:
            re.compile(arg)
        except re.error as e:
            raise OptionError(f"{where}: {arg!r} is not a valid regular expression ({e})") from None
    return Rule(select, arg, values, text)


def load_rules(path: str) -> list[Rule]:
    """A rules file: a JSON list of rules (or {"rules": [...]}); YAML (.yaml/.yml) when PyYAML is installed."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise OptionError(f"--alpha-rules {path}: cannot be read ({e.strerror})") from None
    if os.path.splitext(path)[1].lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise OptionError(f"--alpha-rules {path}: YAML needs PyYAML (pip install pyyaml); or write the rules "
                              "as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise OptionError(f"--alpha-rules {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise OptionError(f"--alpha-rules {path}: not valid JSON ({e})") from None
    if isinstance(data, dict) and set(data) == {"rules"}:
        data = data["rules"]
    if not isinstance(data, list):
        raise OptionError(f"--alpha-rules {path}: expected a list of rules (or {{\"rules\": [...]}})")
    return [rule_from_dict(d, f"--alpha-rules {path}, rule {i + 1}") for i, d in enumerate(data)]


def as_rules(rules) -> tuple[Rule, ...]:
    """Rules given to the API: Rule objects, `PATTERN=VALUE` strings or rules-file dicts, in order."""
    out = []
    for r in rules or ():
        if isinstance(r, Rule):
            out.append(r)
        elif isinstance(r, str):
            out.append(parse_rule(r))
        else:
            out.append(rule_from_dict(r, "alpha rule"))
    return tuple(out)


def resolve(rules: tuple[Rule, ...], names: list[str], base: float) -> dict[str, float]:
    """{name: alpha} for every name: the first rule that selects it, else `base`. Raises OptionError for a rule
    that selects none of `names` and for an alpha that is not finite."""
    layers = [layer for n in names if (layer := classify(n)[0]) is not None]
    last_layer = max(layers, default=0)
    for rule in rules:
        if not any(rule.matches(n) for n in names):
            raise OptionError(f"alpha rule {rule.text!r} selects no floating-point tensor; tensor names look like "
                              f"{', '.join(names[:3])}")
    alphas = {}
    for n in names:
        rule = next((r for r in rules if r.matches(n)), None)
        alpha = base if rule is None else rule.alpha(n, base, last_layer)
        if not math.isfinite(alpha):
            raise OptionError(f"alpha rule {rule.text!r} gives tensor '{n}' the alpha {alpha}, which is not finite")
        alphas[n] = alpha
    return alphas
