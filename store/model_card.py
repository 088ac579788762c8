"""The generated model card (README.md) and the tables `hlwq inspect` shows too.

Everything comes from the manifest and the metrics table: sizes are the
manifest's (hlwq.quant.sizes arithmetic, the same numbers `hlwq plan` prints),
the output gates' evidence is the manifest's ``validation`` section (one row per
rendered prompt, the thresholds and where they came from, the worst prompt's
contact sheet), and weight error is a distribution over quantized tensors, never
a single average. No local absolute path enters the card.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path, PurePosixPath, PureWindowsPath

import yaml

from hlwq.quant.errors import ArtifactError
from hlwq.quant.sizes import format_bytes

WORST_SHOWN = 10
LIBRARY_NAME = "hlwq"
LICENSE_KEYS = ("license", "license_name", "license_link")
MODEL_FAMILIES = {"ltx23": "ltx-video"}   # bit-policy name prefix -> the family's Hub tag


def quality_summary(metrics) -> dict | None:
    """Worst, worst-1 % and median of per-tensor cosine and relative MSE, plus the worst tensors.

    ``metrics``: an Arrow table or row dicts with ``cosine`` and ``rel_mse``
    (``tensor``/``component`` name them). None when there are no metrics.
    """
    if metrics is None:
        return None
    rows = metrics.to_pylist() if hasattr(metrics, "to_pylist") else list(metrics)
    rows = [r for r in rows if r.get("cosine") is not None and r.get("rel_mse") is not None]
    if not rows:
        return None
    cosines = sorted(r["cosine"] for r in rows)
    errors = sorted(r["rel_mse"] for r in rows)
    worst = sorted(rows, key=lambda r: (-r["rel_mse"], r.get("component") or "", r.get("tensor") or ""))
    return {
        "tensors": len(rows),
        "cosine": {"worst": cosines[0], "worst_1pct": _rank(cosines, 0.01), "median": _median(cosines)},
        "rel_mse": {"worst": errors[-1], "worst_1pct": _rank(errors, 0.99), "median": _median(errors)},
        "worst_tensors": [{"component": r.get("component"), "tensor": r.get("tensor"),
                           "cosine": r["cosine"], "rel_mse": r["rel_mse"]}
                          for r in worst[:WORST_SHOWN]],
    }


def _rank(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of ascending values."""
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def _median(ordered: list[float]) -> float:
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def size_rows(manifest: dict) -> list[list[str]]:
    """Rows of the per-component size table, then the total."""
    sizes = manifest["sizes"]
    rows = []
    for name, c in sorted(sizes["components"].items()):
        rows.append([name, f"{c['tensors']:,}", f"{c.get('quantized_tensors', 0):,}",
                     f"{c['params']:,}", format_bytes(c["original_bytes"]),
                     format_bytes(c["packed_bytes"]), f"{c['bits_per_weight']:.3f}"])
    params = sum(c["params"] for c in sizes["components"].values())
    packed = sizes["total_packed_bytes"]
    rows.append(["**total**", f"{sum(c['tensors'] for c in sizes['components'].values()):,}",
                 f"{sizes['quantized_tensors']:,}", f"{params:,}",
                 format_bytes(sizes["total_original_bytes"]), format_bytes(packed),
                 f"{8 * packed / params:.3f}" if params else "0"])
    return rows


SIZE_HEADER = ["component", "tensors", "quantized", "parameters", "original", "packed",
               "bits/weight"]


def quality_rows(quality: dict) -> list[list[str]]:
    return [["cosine", f"{quality['cosine']['worst']:.6f}", f"{quality['cosine']['worst_1pct']:.6f}",
             f"{quality['cosine']['median']:.6f}"],
            ["relative MSE", f"{quality['rel_mse']['worst']:.3e}",
             f"{quality['rel_mse']['worst_1pct']:.3e}", f"{quality['rel_mse']['median']:.3e}"]]


QUALITY_HEADER = ["metric", "worst", "worst 1 %", "median"]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def render_model_card(manifest: dict, quality: dict | None) -> str:
    source, settings = manifest["source"], manifest["quantization"]
    repo = source.get("repo")
    title = repo or PurePosixPath(str(source.get("source") or "checkpoint")).name
    bits = settings.get("bits")
    parts = [front_matter(manifest), f"# {title}: HLWQ Q{bits}" if bits else f"# {title}: HLWQ",
             _INTRO.format(format=manifest["format"], version=manifest["format_version"]),
             "## Sizes", markdown_table(SIZE_HEADER, size_rows(manifest)), _SIZE_NOTE]
    if settings.get("budget"):
        parts += ["## Size budget", *budget_section(settings["budget"])]
    parts += ["## Validation", *validation_blocks(manifest["validation"])]
    parts += ["## Weight error", *weight_error_blocks(quality)]
    parts += ["## Against other formats at this size",
              *format_comparison_blocks(manifest.get("format_comparison"), manifest["sizes"])]
    parts += ["## Lineage", "\n".join(_lineage_lines(source, settings)),
              "## How to use", _USAGE]
    return "\n\n".join(parts) + "\n"


def front_matter(manifest: dict) -> str:
    """The card's Hub metadata: the base model (repo and commit, from the lineage) and that
    this is its quantization, the library, tags (hlwq, the model family, the bit widths the
    tensors use) and the source's license."""
    source = manifest["source"]
    metadata: dict = {"library_name": LIBRARY_NAME}
    if source.get("repo"):
        metadata |= {"base_model": [source["repo"]], "base_model_relation": "quantized"}
        if source.get("commit_sha"):
            metadata["base_model_revision"] = source["commit_sha"]
    metadata |= source.get("license") or {}
    family = model_family(manifest)
    bits = sorted({e["bits"] for e in manifest["tensors"].values() if e.get("action") == "quantize"})
    metadata["tags"] = ["hlwq", "quantized", *([family] if family else []),
                        *(f"{b}-bit" for b in bits)]
    return "---\n" + yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True) + "---"


def model_family(manifest: dict) -> str | None:
    """The Hub tag of the quantized model's family, from the layout or the bit policy's name."""
    if manifest["source"].get("layout") == "ltx23-single":
        return MODEL_FAMILIES["ltx23"]
    policy = manifest["quantization"].get("policy")
    name = policy.get("name") if isinstance(policy, dict) else policy
    return next((tag for prefix, tag in MODEL_FAMILIES.items() if str(name).startswith(prefix)),
                None)


def card_license(card_text: str) -> dict | None:
    """The license fields of a model card's front matter (``license``, ``license_name``,
    ``license_link``); None when it declares none or its front matter does not parse."""
    match = re.match(r"---\r?\n(.*?)\r?\n---\r?\n", card_text, re.DOTALL)
    try:
        metadata = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return None
    if not isinstance(metadata, dict):
        return None
    found = {key: metadata[key] for key in LICENSE_KEYS if isinstance(metadata.get(key), str)}
    return found or None


def weight_error_blocks(quality: dict | None) -> list[str]:
    if not quality:
        return ["No per-tensor metrics were recorded."]
    return [f"Per quantized tensor ({quality['tensors']:,} tensors), error against the source:",
            markdown_table(QUALITY_HEADER, quality_rows(quality)),
            "Worst tensors by relative MSE:",
            markdown_table(["tensor", "component", "cosine", "relative MSE"],
                           [[f"`{w['tensor']}`", str(w["component"]), f"{w['cosine']:.6f}",
                             f"{w['rel_mse']:.3e}"] for w in quality["worst_tensors"]])]


# ---------------------------------------------------------------- other formats


def format_comparison_blocks(comparison: dict | None, sizes: dict | None = None) -> list[str]:
    """The artifact against the other formats on a sample of its own tensors
    (store/format_comparison.py): one row per format by bits per weight, this artifact
    among them, the formats at the nearest sizes named, and what was not measured."""
    if not comparison:
        return ["**Not measured**: this artifact was packaged before the comparison existed."]
    if "skipped" in comparison:
        return [f"**Not measured**: {comparison['skipped']}."]
    own, sample = comparison["artifact"], comparison["sample"]
    others = sorted(comparison["formats"], key=lambda e: (e["bits_per_weight"], e["name"]))
    competitors = [e for e in others if e["family"] != "hlwq"]
    below = [e for e in competitors if e["bits_per_weight"] <= own["bits_per_weight"]][-1:]
    above = [e for e in competitors if e["bits_per_weight"] > own["bits_per_weight"]][:1]
    nearest = {e["name"] for e in below + above}
    shown = sorted([*others, {"name": None, **own}], key=lambda e: e["bits_per_weight"])
    rows = []
    for e in shown:
        name = "**this artifact**" if e["name"] is None else f"`{e['name']}`"
        rows.append([name + (" (nearest size)" if e["name"] in nearest else ""),
                     f"{e['bits_per_weight']:.3f}", f"{e['rel_mse_mean']:.3e}",
                     f"{e['rel_mse_worst']:.3e}", f"{e['cosine_mean']:.6f}",
                     "1" if e["name"] is None else _error_ratio(e, own)])
    rows_each = sorted({t["rows"] for t in sample["tensors"]})
    blocks = [(f"Every format quantized the same source rows: {len(sample['tensors'])} of this "
              f"artifact's {sample['quantized_tensors']:,} quantized tensors ({sample['rule']}; "
              f"{', '.join(map(str, rows_each))} rows each; listed under `format_comparison` in "
              "`manifest.json`). **This artifact** is its own stored codes for those rows at the "
              "bits each tensor got. Bits per weight count every stored byte (scales, codebooks) "
              "on the sample; the error ratio is the format's mean relative MSE over this "
              "artifact's (above 1: more error)." + _whole_artifact_bits(sizes)),
              markdown_table(["format", "bits/weight", "mean relative MSE", "worst relative MSE",
                              "mean cosine", "error vs this artifact"], rows)]
    if below or above:
        named = [f"`{e['name']}` ({e['bits_per_weight']:.2f} bits, {_error_ratio(e, own)}x "
                 "this artifact's error)" for e in below + above]
        blocks.append(f"At {own['bits_per_weight']:.2f} bits per weight the other formats at the "
                      f"nearest sizes are {' and '.join(named)}.")
    reasons: dict[str, list[str]] = {}
    for entry in comparison.get("not_measured") or []:
        reasons.setdefault(entry["reason"], []).append(f"`{entry['name']}`")
    if reasons:
        blocks.append("\n".join(f"- not measured: {', '.join(names)}: {reason}"
                                 for reason, names in reasons.items()))
    return blocks


def _whole_artifact_bits(sizes: dict | None) -> str:
    if not sizes or not sizes.get("quantized_params"):
        return ""
    bits = 8 * sizes["quantized_packed_bytes"] / sizes["quantized_params"]
    return f" Over all its quantized tensors this artifact stores {bits:.3f} bits per weight."


def _error_ratio(entry: dict, own: dict) -> str:
    """A format's mean relative MSE over this artifact's, as the card prints it."""
    return f"{entry['rel_mse_mean'] / own['rel_mse_mean']:.2f}" if own["rel_mse_mean"] else "-"


# ---------------------------------------------------------------- validation evidence

# The per-prompt absolute output metrics (tasks/validate_output.py) as the card, `hlwq inspect`
# and the HTML report show them, packed then the control's: key, label, format.
OUTPUT_METRICS = (("psnr_mean", "PSNR mean dB", "{:.2f}"),
                  ("psnr_min", "PSNR worst frame dB", "{:.2f}"),
                  ("ssim_mean", "SSIM mean", "{:.4f}"), ("ssim_min", "SSIM worst frame", "{:.4f}"),
                  ("temporal_diff", "temporal diff", "{:.4f}"),
                  ("audio_snr_db", "audio SNR dB", "{:.2f}"),
                  ("mel_distance", "log-mel dist dB", "{:.3f}"),
                  ("first_step_latent_rel_err", "step-1 latent rel err", "{:.4f}"),
                  ("latent_rel_err", "latent rel err", "{:.4f}"),
                  ("block_rel_err", "worst block rel err", "{:.4f}"))
# The output gates' distances in the order the card shows them (tasks/validate_output.py's
# OUTPUT_DISTANCES, which tests keep equal; the manifest's JSON sorts them by name).
DISTANCE_ORDER = ("frame_mse", "worst_frame_mse", "ssim_distance", "temporal_diff",
                  "audio_noise_ratio", "mel_distance", "first_step_latent_rel_err",
                  "latent_rel_err", "block_rel_err")
NAMED_TENSOR_FAILURES = 5


def validation_blocks(validation: dict) -> list[str]:
    """The verdict, then the output gates' evidence, then the tensor gates': markdown blocks
    for the card and `hlwq inspect`. What was not measured is said, never left out."""
    tensor, output = validation.get("tensor_gates"), validation.get("output_gates")
    verdict = "**Validated**" if validation.get("validated") else "**Not validated**"
    return [f"{verdict}: tensor gates {_state(tensor)}; output gates {_state(output)}.",
            "### Output gates", *output_gate_blocks(output),
            "### Tensor gates", *tensor_gate_blocks(tensor)]


def _state(gates: dict | None) -> str:
    if not gates:
        return "not measured"
    if "skipped" in gates:
        return "skipped"
    verdict = "passed" if gates.get("passed") else "failed"
    return verdict if gates.get("enforced", True) else f"{verdict}, not enforced (--no-gates)"


def output_gate_blocks(output: dict | None) -> list[str]:
    """Per prompt every gate's distance, the control's and their ratio against the limit; the
    absolute metrics of both; where the thresholds came from, the failures and the worst
    prompt's pictures; or, plainly, that nothing was measured."""
    if not output:
        return [_NOT_RECORDED]
    if "skipped" in output:
        return [f"**Not measured**: output gates skipped: {output['skipped']}."]
    prompts, suite = output["prompts"], output["suite"]
    failed = [pid for pid, entry in prompts.items() if not entry["passed"]]
    verdict = (f"**passed** on {len(prompts)} of {len(prompts)} prompts" if not failed else
               f"**failed** on {len(failed)} of {len(prompts)} prompts")
    blocks = [_MEASURED.format(verdict=verdict, suite=suite["name"], sha=suite["sha256"][:16],
                               device=output["device"], control=_control_phrase(output)),
              output_gate_table(output), _thresholds_origin(output.get("thresholds_from"), "output"),
              "Absolute metrics per prompt, packed (8-bit control):", output_metric_table(output)]
    if output.get("failures"):
        blocks.append("\n".join(f"- {line}" for line in output["failures"]))
    if output.get("failed_blocks"):
        blocks.append(f"Blocks that drift past their `block_rel_err` limit: "
                      f"{', '.join(output['failed_blocks'])}.")
    worst = output.get("worst_prompt")
    if worst:
        entry = prompts[worst["id"]]
        prompt = " ".join(str(entry["prompt"]).split())      # one line, whatever the suite holds
        middle = "the 8-bit control in the middle, " if output.get("control") else ""
        blocks.append(f"Worst prompt, `{worst['id']}` (seed {entry['seed']}): \"{prompt}\". "
                      f"Source above, {middle}packed below:\n\n"
                      f"![{worst['id']}: source above, {middle}packed below]({worst['sheet']})")
        if worst.get("frame"):
            blocks.append(f"Its worst frame ({entry.get('worst_frame')}), source, 8-bit control "
                          "and packed side by side, then both differences x10:\n\n"
                          f"![{worst['id']}: worst frame]({worst['frame']})")
    blocks.append(f"Every prompt's sheets, worst frames and plots (the latent error after every "
                  f"denoising step among them): [{output['report']}]({output['report']}). "
                  "Not measured: image-to-video and audio-to-video conditioning (the suite is "
                  "text-to-video only).")
    return blocks


def _control_phrase(output: dict) -> str:
    control = output.get("control")
    if not control:
        return "a control"
    return (f"an {control['bits']}-bit control (the source with the same {control['tensors']:,} "
            f"tensors re-quantized at {control['bits']} bits, HLWQ, one scale per block)")


def ordered_gates(gates: dict) -> list[str]:
    """The gates' names in DISTANCE_ORDER, any others after them by name."""
    rank = {name: number for number, name in enumerate(DISTANCE_ORDER)}
    return sorted(gates, key=lambda name: (rank.get(name, len(rank)), name))


def gate_limit_label(gate: dict) -> str:
    """A gate's rule in a few characters: ``<= max(16 x ctrl, 2e-06)``."""
    return f"<= max({gate['k']:g} x ctrl, {gate['floor']:g})"


def distance_cell(judged: dict) -> str:
    """``packed / control (ratio x)``: one gate on one prompt."""
    ratio = judged.get("ratio")
    times = "-" if ratio is None else f"{ratio:.3g}x"
    return f"{judged['candidate']:.3g} / {judged['control']:.3g} ({times})"


def output_gate_table(results: dict) -> str:
    """One row per prompt with every gate's distance: packed / 8-bit control (ratio); the first
    row holds each gate's rule (k and floor); a distance past its limit is bold."""
    names = ordered_gates(results["gates"])
    rows = [["**limit**", "", "", *(gate_limit_label(results["gates"][n]) for n in names), ""]]
    for pid, entry in results["prompts"].items():
        cells = []
        for name in names:
            judged = (entry.get("distances") or {}).get(name)
            if judged is None:
                cells.append("-")
                continue
            text = distance_cell(judged)
            cells.append(text if judged["passed"] else f"**{text}**")
        verdict = "pass" if entry["passed"] else f"FAIL ({', '.join(entry['failed_gates'])})"
        rows.append([f"`{pid}`", f"{entry['width']}x{entry['height']}x{entry['frames']}",
                     str(entry["steps"]), *cells, verdict])
    return markdown_table(["prompt", "WxHxF", "steps", *names, "verdict"], rows)


def output_metric_table(results: dict) -> str:
    """One row per prompt with every absolute metric: packed (8-bit control)."""
    rows = []
    for pid, entry in results["prompts"].items():
        control = entry.get("control") or {}
        cells = [_metric_cell(entry.get(key), control.get(key), fmt)
                 for key, _, fmt in OUTPUT_METRICS]
        rows.append([f"`{pid}`", *cells])
    return markdown_table(["prompt", *(label for _, label, _ in OUTPUT_METRICS)], rows)


def _metric_cell(value, control, fmt: str) -> str:
    if value is None:
        return "-"
    text = fmt.format(value)
    return text if control is None else f"{text} ({fmt.format(control)})"


def _thresholds_origin(sources: list[dict] | None, section: str) -> str:
    """Which gates files the thresholds came from (names and hashes, never local paths)."""
    table = f"`[{section}.<distance>]`" if section == "output" else f"`[{section}.<bits>]`"
    if not sources:
        return f"Thresholds: {table} of the gates file (`tasks/gates.toml` unless `--gates`)."
    first, *overrides = sources
    measured = ("each k and floor, measured on the tiny fixture, Q5 to 2 bits against the "
                "8-bit control, with the command and the numbers" if section == "output" else
                "each gate and how its default was measured")
    text = (f"Thresholds: {table} of `{first['name']}` (sha256 `{first['sha256'][:16]}`), "
            f"which documents {measured}")
    if overrides:
        text += ", with the keys of " + ", ".join(
            f"`{s['name']}` (sha256 `{s['sha256'][:16]}`)" for s in overrides) + " merged over it"
    return text + "."


def tensor_gate_blocks(tensor: dict | None) -> list[str]:
    """Per bit width the worst and mean per-tensor errors against the thresholds."""
    if not tensor:
        return ["**Not measured**: no tensor gates were recorded for this artifact."]
    per_bits = tensor.get("per_bits") or {}
    checked = tensor.get("tensors_checked")
    counted = f" on {checked:,} quantized tensors" if checked is not None else ""
    enforced = "" if tensor.get("enforced", True) else ", not enforced (--no-gates)"
    if tensor.get("passed"):
        blocks = [f"Tensor gates **passed**{counted}{enforced}."]
    else:
        problems = len(tensor.get("failures", []))
        blocks = [f"Tensor gates **failed**{counted} ({problems} problem(s)){enforced}."]
    if per_bits:
        rows = []
        for bits, row in sorted(per_bits.items(), key=lambda item: int(item[0])):
            limit = row["thresholds"]
            rows.append([str(bits), f"{row['tensors']:,}",
                         f"{row['min_cosine']:.6f} (>= {limit['min_cosine']:g})",
                         f"{row['max_rel_mse']:.3e} (<= {limit['max_rel_mse']:g})",
                         f"{row['mean_rel_mse']:.3e} (<= {limit['max_mean_rel_mse']:g})"])
        blocks += [markdown_table(["bits", "tensors", "worst cosine", "worst relative MSE",
                                   "mean relative MSE"], rows),
                   _thresholds_origin(tensor.get("thresholds_from"), "tensor")]
    failures = tensor.get("failures") or []
    if failures:
        shown = [f"- {line}" for line in failures[:NAMED_TENSOR_FAILURES]]
        if len(failures) > NAMED_TENSOR_FAILURES:
            shown.append(f"- ... and {len(failures) - NAMED_TENSOR_FAILURES} more (manifest.json)")
        blocks.append("\n".join(shown))
    return blocks


# ---------------------------------------------------------------- lineage


def budget_section(budget: dict) -> list[str]:
    """The mix of formats a size budget chose, and what it was compared with."""
    uniform = budget.get("best_uniform")
    against = ("no single format fits" if uniform is None else
               f"the best single format that fits, {uniform['format']}, predicts "
               f"{uniform['predicted_error']:.4g}")
    intro = (f"Formats chosen per tensor to fit {format_bytes(budget['target_bytes'])} "
             f"(scope `{budget['scope']}`) with the least predicted damage: "
             f"{format_bytes(budget['total_bytes'])} in all. Sensitivity `{budget['sensitivity']}`"
             + (f" ({budget['sensitivity_source']})" if budget.get("sensitivity_source") else "")
             + "; "
             f"predicted error {budget['predicted_error']:.4g} ({budget['error_unit']}), where "
             f"{against}.")
    rows = [[f"`{label}`", f"{e['bits']}", f"{e['group_size']}", f"{e['bits_per_weight']:.3f}",
             f"{e['tensors']:,}", f"{e['params']:,}", format_bytes(e["packed_bytes"])]
            for label, e in budget.get("formats", {}).items()]
    header = ["format", "bits", "values per scale", "bits/weight", "tensors", "parameters",
              "packed"]
    return [intro, markdown_table(header, rows)]


def _lineage_lines(source: dict, settings: dict) -> list[str]:
    """Where the weights came from: the Hub repo and revision, or a local folder's or file's
    name; never a local absolute path."""
    if source.get("repo"):
        named = f"Hub repo `{source['repo']}`"
    else:
        kind = "file" if source.get("kind") == "file" else "folder"
        named = f"local {kind} `{_name_only(str(source.get('source') or ''))}`"
    lines = [f"- source: {named}, layout `{source['layout']}`"]
    if source.get("revision"):
        lines.append(f"- revision: `{source['revision']}`")
    if source.get("commit_sha"):
        lines.append(f"- {source.get('commit_sha_kind') or 'commit sha'}: `{source['commit_sha']}`")
    lines.append(f"- source files: {len(source.get('files', []))}, sha256 of each in "
                 "`manifest.json`")
    for key in sorted(set(settings) - {"budget"}):     # the budget has its own section
        value = _without_local_paths(settings[key])
        shown = value if isinstance(value, (str, int, float)) else json.dumps(value, sort_keys=True)
        lines.append(f"- {key.replace('_', ' ')}: `{shown}`")
    return lines


def _name_only(text: str) -> str:
    """An absolute path's last part (a policy file, a local source); other text unchanged."""
    for flavour in (PurePosixPath, PureWindowsPath):
        path = flavour(text)
        if path.is_absolute():
            return path.name
    return text


def _without_local_paths(value):
    if isinstance(value, str):
        return _name_only(value)
    if isinstance(value, dict):
        return {key: _without_local_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_local_paths(item) for item in value]
    return value


_NOT_RECORDED = ("**Not measured**: no output gates were recorded for this artifact "
                 "(`hlwq validate DIR --against SOURCE` renders the prompt suite with both models "
                 "and records them here).")
_MEASURED = ("Output gates {verdict}. Every prompt of the suite `{suite}` (sha256 `{sha}`) was "
             "rendered by the source, by {control} and by this artifact with the same seed and "
             "settings on `{device}`; each render was compared with the source's (video frame "
             "by frame, audio, the latents after the first and the last denoising step, each "
             "transformer block's output on the first step). A gate passes when this "
             "artifact's distance is at most max(k x the control's distance, floor): the "
             "control calibrates the bar to this model, in this run. Per prompt, packed / "
             "control (ratio):")
_INTRO = ("Hadamard-Lloyd weight quantization (HLWQ) of the source checkpoint: the selected "
          "linear weights are stored as packed codes, block scales and a per-tensor codebook; "
          "every other tensor and file is kept exactly as in the source. "
          "Format: `{format}` version {version} (docs/FORMAT.md).")
_SIZE_NOTE = ("Bytes of tensor data computed from shapes, dtypes and bit widths (the same "
              "arithmetic `hlwq plan` prints); configs and tokenizer files are not counted.")
_USAGE = """With the `hlwq-pipeline` package installed:

```bash
hlwq verify .                      # hashes, shards and tensor entries
hlwq inspect .                     # the size, validation and weight-error tables
hlwq render --artifact . --prompts prompts.jsonl --out renders/
hlwq export-dequantized . ../bf16  # a plain checkpoint for other tools
```

```python
from hlwq import load_pipeline
pipe = load_pipeline("path/to/this/artifact", device="cuda")   # packed weights stay packed
```"""


def read_metrics(path: str | Path):
    """The artifact's metrics table; a damaged file is named, not a traceback."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise ArtifactError(f"{path}: not a readable metrics table ({reason}); the artifact is "
                            "damaged (`hlwq verify` checks its hashes)") from None
