"""Tensor-level validation gates on the per-tensor metrics table.

Thresholds live in one file, ``tasks/gates.toml`` (documented there), keyed by
bit width under ``[tensor.<bits>]``; other sections (``[output]``) belong to
other gates and pass through untouched. A user file of the same shape is merged
over the defaults.
"""

from __future__ import annotations

import hashlib
import math
import os
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prefect import get_run_logger, task

from hlwq.quant.errors import GateFailedError, InvalidOptionError

DEFAULT_GATES_FILE = Path(__file__).with_name("gates.toml")
TENSOR_GATE_KEYS = ("min_cosine", "max_rel_mse", "max_mean_rel_mse")
NAMED_FAILURES = 20          # a failure message names at most this many tensors


@dataclass(frozen=True)
class TensorGate:
    bits: int
    min_cosine: float
    max_rel_mse: float
    max_mean_rel_mse: float


@dataclass
class TensorGateReport:
    passed: bool
    tensors_checked: int
    per_bits: dict[str, dict] = field(default_factory=dict)   # JSON keys: bit widths as strings
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def load_gate_config(path: str | os.PathLike | None = None) -> dict:
    """The default gates file with ``path``'s keys merged over it, tensor section validated."""
    config = _read_toml(DEFAULT_GATES_FILE)
    if path is not None:
        config = _merged(config, _read_toml(Path(path)))
    tensor_gates(config, source=path or DEFAULT_GATES_FILE)
    return config


def gate_sources(path: str | os.PathLike | None = None) -> list[dict]:
    """Where thresholds come from, in merge order: the defaults, then ``path`` if given.

    Names only (``tasks/gates.toml``, the user file's name), with each file's sha256: this goes
    into the manifest and the model card, which never hold a local absolute path.
    """
    files = [(DEFAULT_GATES_FILE, "tasks/gates.toml")]
    if path is not None:
        files.append((Path(path), Path(path).name))
    return [{"name": name, "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}
            for file, name in files]


def tensor_gates(config: dict, source: str | os.PathLike = "gates config") -> dict[int, TensorGate]:
    """The ``[tensor.<bits>]`` tables as ``{bits: TensorGate}``; raises on a malformed entry."""
    section = config.get("tensor", {})
    if not isinstance(section, dict):
        raise InvalidOptionError(f"{source}: [tensor] must be a table of [tensor.<bits>] tables")
    gates = {}
    for key, values in section.items():
        where = f"{source}: [tensor.{key}]"
        if not str(key).isdigit() or not 2 <= int(key) <= 8:
            raise InvalidOptionError(f"{where}: the key must be a bit width 2..8")
        if not isinstance(values, dict) or set(values) != set(TENSOR_GATE_KEYS):
            raise InvalidOptionError(f"{where}: needs exactly the keys {', '.join(TENSOR_GATE_KEYS)}")
        for name, value in values.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise InvalidOptionError(f"{where}: {name}={value!r} must be a non-negative number")
        gates[int(key)] = TensorGate(bits=int(key), **{k: float(values[k]) for k in TENSOR_GATE_KEYS})
    return gates


def check_tensor_gates(rows: list[dict], gates: dict[int, TensorGate]) -> TensorGateReport:
    """Apply each quantized tensor's gate (by its bit width) to its metrics row."""
    quantized = [row for row in rows if row.get("action", "quantize") == "quantize"]
    report = TensorGateReport(passed=True, tensors_checked=len(quantized))
    for bits in sorted({row["bits"] for row in quantized}):
        if bits not in gates:
            raise InvalidOptionError(f"no tensor gate for {bits}-bit tensors: add [tensor.{bits}] "
                                     "to the gates file")
        at_width = [row for row in quantized if row["bits"] == bits]
        report.per_bits[str(bits)] = _check_width(at_width, gates[bits], report.failures)
    report.passed = not report.failures
    return report


def _check_width(rows: list[dict], gate: TensorGate, failures: list[str]) -> dict:
    for row in sorted(rows, key=lambda r: r["tensor"]):
        if not row["cosine"] >= gate.min_cosine:       # written so that NaN fails
            failures.append(f"{row['tensor']} ({gate.bits}-bit): cosine {row['cosine']:.6f} "
                            f"< min_cosine {gate.min_cosine}")
        if not row["rel_mse"] <= gate.max_rel_mse:
            failures.append(f"{row['tensor']} ({gate.bits}-bit): relative MSE {row['rel_mse']:.6f} "
                            f"> max_rel_mse {gate.max_rel_mse}")
    mean_rel_mse = math.fsum(row["rel_mse"] for row in rows) / len(rows)
    if not mean_rel_mse <= gate.max_mean_rel_mse:
        worst = sorted(rows, key=lambda r: -r["rel_mse"])[:5]
        failures.append(
            f"mean relative MSE of the {len(rows)} {gate.bits}-bit tensors is {mean_rel_mse:.6f} "
            f"> max_mean_rel_mse {gate.max_mean_rel_mse} (worst: "
            + ", ".join(f"{row['tensor']} {row['rel_mse']:.6f}" for row in worst) + ")")
    return {
        "tensors": len(rows),
        "min_cosine": min(row["cosine"] for row in rows),
        "max_rel_mse": max(row["rel_mse"] for row in rows),
        "mean_rel_mse": mean_rel_mse,
        "thresholds": {key: getattr(gate, key) for key in TENSOR_GATE_KEYS},
    }


def gate_failure_message(report: TensorGateReport, consequence: str) -> str:
    named = report.failures[:NAMED_FAILURES]
    more = len(report.failures) - len(named)
    lines = [f"tensor gates failed ({len(report.failures)} problem(s)); {consequence}:"]
    lines += [f"  {line}" for line in named]
    if more:
        lines.append(f"  ... and {more} more")
    return "\n".join(lines)


@task(name="tensor-gates", persist_result=False)
def tensor_gates_task(rows: list[dict], gates_file: str | None = None, enforce: bool = True) -> dict:
    """Check the gates; fail the run (before packaging) when enforced, else record the verdict."""
    report = check_tensor_gates(rows, tensor_gates(load_gate_config(gates_file)))
    logger = get_run_logger()
    if report.passed:
        logger.info("tensor gates passed for %d tensors", report.tensors_checked)
    elif enforce:
        raise GateFailedError(gate_failure_message(
            report, "nothing was packaged (--no-gates packages an unvalidated artifact to inspect)"))
    else:
        logger.warning("%s", gate_failure_message(
            report, "packaging anyway (--no-gates): the artifact is marked unvalidated"))
    return {**report.to_dict(), "enforced": enforce, "thresholds_from": gate_sources(gates_file)}


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidOptionError(f"gates file {path}: cannot be read as TOML: {exc}") from None


def _merged(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = _merged(base[key], value)
        else:
            merged[key] = value
    return merged
