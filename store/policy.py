"""Bit policies: which tensors to quantize, at how many bits, and why the rest are kept.

A policy is data (store/policies/<name>.toml, or any TOML/YAML file of the same
shape), never a code branch::

    name = "example"
    extends = "ltx23"                 # optional: a built-in policy whose rules follow these
    min_numel = 65536                 # smaller tensors are kept (0: no minimum)
    default_reason = "matched no rule"

    [[rules]]                         # ordered: the first rule that matches decides
    match = ["*.attn.*.weight", "re:^blocks\\.\\d+\\.mlp\\..*\\.weight$"]
    components = ["transformer"]      # optional: only tensors of these components
    action = "quantize"               # or "keep"
    bits = 4                          # optional: default is load_policy's bits
    reason = "attention and MLP linears"   # "{component}" is replaced by the component

A pattern is a glob (``fnmatch``) or, with a ``re:`` prefix, a regular
expression; either must match the whole tensor name. Whatever a rule says,
only 2-D floating-point tensors with at least ``min_numel`` elements are ever
quantized.

An overrides file (TOML or YAML) adjusts any policy::

    include = ["*.proj_out.weight"]   # quantize these (checked after exclude)
    exclude = ["re:.*\\.to_out\\.0\\.weight"]   # keep these, whatever the policy says
    [bits]                            # per-pattern bits for quantized tensors; first match wins
    "*.ff.*" = 4
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from hlwq.quant.codebook import MAX_BITS, MIN_BITS, check_bits
from hlwq.quant.errors import PolicyError

POLICY_DIR = Path(__file__).with_name("policies")
ACTIONS = ("quantize", "keep")
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
REGEX_PREFIX = "re:"
RULE_KEYS = {"match", "components", "action", "bits", "reason"}
POLICY_KEYS = {"name", "description", "extends", "min_numel", "default_reason", "rules"}
OVERRIDE_KEYS = {"include", "exclude", "bits"}


@dataclass(frozen=True)
class Decision:
    action: str              # "quantize" or "keep"
    bits: int | None         # None when kept
    reason: str


@dataclass(frozen=True)
class Pattern:
    text: str                # as written: a glob, or "re:<regex>"
    regex: re.Pattern

    def matches(self, name: str) -> bool:
        return self.regex.fullmatch(name) is not None


@dataclass(frozen=True)
class Rule:
    patterns: tuple[Pattern, ...]
    action: str
    reason: str
    bits: int | None = None
    components: frozenset[str] | None = None

    def matches(self, name: str, component: str) -> bool:
        if self.components is not None and component not in self.components:
            return False
        return any(pattern.matches(name) for pattern in self.patterns)


@dataclass(frozen=True)
class BitPolicy:
    name: str
    bits: int                                   # bits of quantize rules that name none
    rules: tuple[Rule, ...]
    min_numel: int = 0
    default_reason: str = "matched no rule of the policy"
    bit_overrides: tuple[tuple[Pattern, int], ...] = ()
    description: str = ""

    def decide(self, name: str, shape, dtype: str, component: str) -> Decision:
        rule = next((rule for rule in self.rules if rule.matches(name, component)), None)
        if rule is None:
            return Decision("keep", None, self.default_reason)
        reason = rule.reason.replace("{component}", component)
        if rule.action == "keep":
            return Decision("keep", None, reason)
        if len(shape) != 2 or dtype not in FLOAT_DTYPES:
            return Decision("keep", None, f"only 2-D floating-point tensors are quantized "
                                          f"(this one is {dtype} {list(shape)})")
        numel = shape[0] * shape[1]
        if numel < self.min_numel:
            return Decision("keep", None, f"{numel:,} elements, below the policy's minimum "
                                          f"of {self.min_numel:,}")
        bits = next((bits for pattern, bits in self.bit_overrides if pattern.matches(name)),
                    rule.bits or self.bits)
        return Decision("quantize", bits, reason)


def builtin_policies() -> list[str]:
    return sorted(path.stem for path in POLICY_DIR.glob("*.toml"))


def load_policy(name_or_path: str | Path, bits: int = 5, include=(), exclude=(),
                overrides_file: str | Path | None = None) -> BitPolicy:
    """A built-in policy by name, or a TOML/YAML policy file, adjusted by include/exclude
    patterns (command-line strings) and an overrides file."""
    check_bits(bits)
    policy = _load_policy_file(_policy_path(name_or_path), bits)
    if overrides_file is not None:
        policy = _apply_overrides_file(policy, Path(overrides_file))
    return with_patterns(policy, include=include, exclude=exclude, origin="command line")


def with_patterns(policy: BitPolicy, include=(), exclude=(), origin: str = "") -> BitPolicy:
    """Put exclude rules, then include rules, in front of the policy's own rules."""
    where = f" ({origin})" if origin else ""
    extra = []
    if exclude:
        patterns = tuple(_pattern(text, f"exclude{where}") for text in exclude)
        extra.append(Rule(patterns, "keep", f"excluded by pattern{where}"))
    if include:
        patterns = tuple(_pattern(text, f"include{where}") for text in include)
        extra.append(Rule(patterns, "quantize", f"included by pattern{where}"))
    return replace(policy, rules=(*extra, *policy.rules))


def _policy_path(name_or_path: str | Path) -> Path:
    if str(name_or_path) in builtin_policies():
        return POLICY_DIR / f"{name_or_path}.toml"
    path = Path(name_or_path)
    if not path.is_file():
        raise PolicyError(f"policy {str(name_or_path)!r}: not a built-in policy "
                          f"({', '.join(builtin_policies())}) and no such file")
    return path


def _load_policy_file(path: Path, bits: int, extended_by: tuple[Path, ...] = ()) -> BitPolicy:
    """A policy file; one that ``extends`` a built-in policy gets the base's rules after its own."""
    data = _read_mapping(path)
    policy = _parse_policy(path, data, bits)
    base = data.get("extends")
    if base is None:
        return policy
    if base not in builtin_policies():
        raise PolicyError(f"{path}: extends={base!r} must name a built-in policy "
                          f"({', '.join(builtin_policies())})")
    base_path = POLICY_DIR / f"{base}.toml"
    if base_path.resolve() in {p.resolve() for p in (*extended_by, path)}:
        raise PolicyError(f"{path}: extends={base!r} makes a cycle of policies")
    base_policy = _load_policy_file(base_path, bits, (*extended_by, path))
    return replace(policy, rules=(*policy.rules, *base_policy.rules))


def _read_mapping(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            raise PolicyError(f"{path}: policy files must end in .toml, .yaml or .yml")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise PolicyError(f"{path}: cannot be read as a policy file: {exc}") from None
    if not isinstance(data, dict):
        raise PolicyError(f"{path}: must hold a mapping at the top level, not {type(data).__name__}")
    return data


def _parse_policy(path: Path, data: dict, bits: int) -> BitPolicy:
    _check_keys(data, POLICY_KEYS, str(path))
    rules = data.get("rules")
    if not isinstance(rules, list) or not rules:
        raise PolicyError(f"{path}: needs a non-empty list 'rules'")
    min_numel = data.get("min_numel", 0)
    if not isinstance(min_numel, int) or isinstance(min_numel, bool) or min_numel < 0:
        raise PolicyError(f"{path}: min_numel={min_numel!r} must be a non-negative integer")
    return BitPolicy(
        name=str(data.get("name", path.stem)),
        bits=bits,
        rules=tuple(_parse_rule(rule, f"{path}: rule {number}")
                    for number, rule in enumerate(rules, start=1)),
        min_numel=min_numel,
        default_reason=str(data.get("default_reason", BitPolicy.default_reason)),
        description=str(data.get("description", "")),
    )


def _parse_rule(data, where: str) -> Rule:
    if not isinstance(data, dict):
        raise PolicyError(f"{where}: must be a table/mapping, not {type(data).__name__}")
    _check_keys(data, RULE_KEYS, where)
    action = data.get("action")
    if action not in ACTIONS:
        raise PolicyError(f"{where}: action={action!r} must be one of {', '.join(ACTIONS)}")
    reason = data.get("reason")
    if not isinstance(reason, str) or not reason:
        raise PolicyError(f"{where}: needs a 'reason' string that says why")
    bits = data.get("bits")
    if bits is not None:
        if action == "keep":
            raise PolicyError(f"{where}: a 'keep' rule cannot set bits")
        _check_rule_bits(bits, where)
    components = data.get("components")
    if components is not None:
        components = frozenset(_string_list(components, f"{where}: components"))
    patterns = tuple(_pattern(text, where) for text in _string_list(data.get("match"), f"{where}: match"))
    return Rule(patterns, action, reason, bits, components)


def _apply_overrides_file(policy: BitPolicy, path: Path) -> BitPolicy:
    data = _read_mapping(path)
    _check_keys(data, OVERRIDE_KEYS, str(path))
    bit_table = data.get("bits", {})
    if not isinstance(bit_table, dict):
        raise PolicyError(f"{path}: 'bits' must map patterns to bit widths")
    overrides = []
    for text, bits in bit_table.items():
        where = f"{path}: bits[{text!r}]"
        _check_rule_bits(bits, where)
        overrides.append((_pattern(str(text), where), bits))
    policy = replace(policy, bit_overrides=(*overrides, *policy.bit_overrides))
    include = _string_list(data.get("include", []), f"{path}: include", allow_empty=True)
    exclude = _string_list(data.get("exclude", []), f"{path}: exclude", allow_empty=True)
    return with_patterns(policy, include=include, exclude=exclude, origin=path.name)


def _pattern(text: str, where: str) -> Pattern:
    if text.startswith(REGEX_PREFIX):
        try:
            return Pattern(text, re.compile(text[len(REGEX_PREFIX):]))
        except re.error as exc:
            raise PolicyError(f"{where}: pattern {text!r} is not a valid regular expression: "
                              f"{exc}") from None
    return Pattern(text, re.compile(fnmatch.translate(text)))


def _string_list(value, where: str, allow_empty: bool = False) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if (not isinstance(value, list) or not all(isinstance(item, str) and item for item in value)
            or (not value and not allow_empty)):
        raise PolicyError(f"{where}: must be a non-empty string or list of non-empty strings, "
                          f"not {value!r}")
    return value


def _check_rule_bits(bits, where: str) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise PolicyError(f"{where}: bits={bits!r} must be an integer in {MIN_BITS}..{MAX_BITS}")


def _check_keys(data: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(map(str, data)) - allowed)
    if unknown:
        raise PolicyError(f"{where}: unknown keys {unknown} (allowed: {', '.join(sorted(allowed))})")
