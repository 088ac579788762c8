"""The validation report: one HTML page with PNGs beside it, and the same pictures on the Prefect run.

``<report_dir>/``
    ``report.html``           gate verdicts; per prompt the distances of the candidate and of
                              the 8-bit control and their ratio, the absolute metrics of both;
                              worst frames, contact sheets, plots
    ``frames/<prompt>.png``   the candidate's worst frame: source | control | packed, and both
                              amplified differences
    ``sheets/<prompt>.png``   source | packed | amplified difference, frames spread over the clip
    ``plots/*.png``           per-prompt distances against their limits, the latent error after
                              every denoising step (candidate and control), error per block and
                              per module type, distribution of per-tensor errors (metrics.parquet),
                              error per bit against other formats (the manifest's sample)

The page marks ``<body data-images>`` as ``loaded`` once every image decoded (``broken``
otherwise), so a headless browser can check it without a screenshot.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import re
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")   # no display: files only

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
from PIL import Image, ImageDraw

from hlwq.quant.names import block_and_module, block_index
from hlwq.runtime.video import contact_sheet, thumbnail_jpeg, to_uint8_frames
from hlwq.store.atomic import atomic_write_bytes, atomic_write_text
from hlwq.store.model_card import (
    OUTPUT_METRICS,
    distance_cell,
    gate_limit_label,
    output_gate_table,
)

SHEET_DIR, PLOT_DIR, FRAME_DIR = "sheets", "plots", "frames"
REPORT_NAME = "report.html"
DIFF_GAIN = 10          # the difference panel shows |packed - source| x this
SHEET_FRAME_SIDE = 192  # frames in a sheet are shrunk to this longer side (real renders are large)
FRAME_SIDE = (256, 512)  # a worst-frame panel's longer side: small frames grow, large ones shrink
LABEL_HEIGHT = 14
THUMBNAIL_WIDTH = 960   # contact sheets attached to the Prefect run are JPEGs this wide at most


# --------------------------------------------------------------------------- contact sheets


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _labelled(image: Image.Image, label: str) -> Image.Image:
    canvas = Image.new("RGB", (image.width, image.height + LABEL_HEIGHT), (16, 16, 16))
    canvas.paste(image, (0, LABEL_HEIGHT))
    ImageDraw.Draw(canvas).text((3, 1), label, fill=(235, 235, 235))
    return canvas


def _shrunk(frames: np.ndarray, side: int = SHEET_FRAME_SIDE) -> np.ndarray:
    """uint8 frames with their longer side at most ``side`` (area-averaged)."""
    height, width = frames.shape[1:3]
    scale = side / max(height, width)
    if scale >= 1:
        return frames
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BOX))
                     for f in frames])


def comparison_sheet(source_frames, candidate_frames, gain: int = DIFF_GAIN) -> Image.Image:
    """Three contact sheets side by side: source, packed, and |packed - source| x gain."""
    source = to_uint8_frames(np.asarray(source_frames))
    packed = to_uint8_frames(np.asarray(candidate_frames))
    difference = np.abs(packed.astype(np.int16) - source.astype(np.int16)) * gain
    difference = np.clip(difference, 0, 255).astype(np.uint8)
    panels = [_labelled(contact_sheet(_shrunk(frames)), label) for frames, label in
              ((source, "source"), (packed, "packed"), (difference, f"|difference| x{gain}"))]
    sheet = Image.new("RGB", (sum(p.width for p in panels) + 4 * (len(panels) - 1),
                              max(p.height for p in panels)), (255, 255, 255))
    x = 0
    for panel in panels:
        sheet.paste(panel, (x, 0))
        x += panel.width + 4
    return sheet


def write_comparison_sheet(path: str | os.PathLike, source_frames, candidate_frames) -> Path:
    atomic_write_bytes(path, _png_bytes(comparison_sheet(source_frames, candidate_frames)))
    return Path(path)


def stacked_sheet(source_frames, candidate_frames, control_frames=None) -> Image.Image:
    """The source's contact sheet above the packed one (with ``control_frames``, the 8-bit
    control's between them): the model card's picture of a prompt."""
    rows = [(source_frames, "source")]
    if control_frames is not None:
        rows.append((control_frames, "8-bit control"))
    rows.append((candidate_frames, "packed"))
    panels = [_labelled(contact_sheet(_shrunk(to_uint8_frames(np.asarray(frames)))), label)
              for frames, label in rows]
    sheet = Image.new("RGB", (max(p.width for p in panels),
                              sum(p.height for p in panels) + 4 * (len(panels) - 1)),
                      (255, 255, 255))
    y = 0
    for panel in panels:
        sheet.paste(panel, (0, y))
        y += panel.height + 4
    return sheet


def write_stacked_sheet(path: str | os.PathLike, source_frames, candidate_frames,
                        control_frames=None) -> Path:
    atomic_write_bytes(path, _png_bytes(stacked_sheet(source_frames, candidate_frames,
                                                      control_frames)))
    return Path(path)


def _resized(image: np.ndarray, sides: tuple[int, int] = FRAME_SIDE) -> Image.Image:
    """A frame with its longer side in ``sides``: grown by a whole factor (nearest, pixels stay
    visible) or shrunk (area-averaged)."""
    picture = Image.fromarray(image)
    longer = max(picture.size)
    if longer < sides[0]:
        factor = -(-sides[0] // longer)
        return picture.resize((picture.width * factor, picture.height * factor),
                              Image.Resampling.NEAREST)
    if longer > sides[1]:
        scale = sides[1] / longer
        return picture.resize((max(1, round(picture.width * scale)),
                               max(1, round(picture.height * scale))), Image.Resampling.BOX)
    return picture


def frame_comparison(source_frames, control_frames, candidate_frames, index: int,
                     gain: int = DIFF_GAIN) -> Image.Image:
    """Frame ``index`` side by side: source, 8-bit control, packed, then |control - source|
    and |packed - source|, both x gain."""
    frames = [to_uint8_frames(np.asarray(f))[index] for f in
              (source_frames, control_frames, candidate_frames)]
    source = frames[0].astype(np.int16)
    differences = [np.clip(np.abs(f.astype(np.int16) - source) * gain, 0, 255).astype(np.uint8)
                   for f in frames[1:]]
    labels = (f"source, frame {index}", "8-bit control", "packed",
              f"|control - source| x{gain}", f"|packed - source| x{gain}")
    panels = [_labelled(_resized(image), label)
              for image, label in zip([*frames, *differences], labels, strict=True)]
    sheet = Image.new("RGB", (sum(p.width for p in panels) + 4 * (len(panels) - 1),
                              max(p.height for p in panels)), (255, 255, 255))
    x = 0
    for panel in panels:
        sheet.paste(panel, (x, 0))
        x += panel.width + 4
    return sheet


def write_frame_comparison(path: str | os.PathLike, source_frames, control_frames,
                           candidate_frames, index: int) -> Path:
    atomic_write_bytes(path, _png_bytes(frame_comparison(source_frames, control_frames,
                                                         candidate_frames, index)))
    return Path(path)


# --------------------------------------------------------------------------- plots


def module_type(tensor: str) -> str:
    """``transformer_blocks.7.attn1.to_q.weight`` -> ``attn1.to_q``; others: the name sans .weight."""
    return block_and_module(tensor)[1]


def _save(figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _positive(values) -> list[float]:
    """Log axes take positive values only: zeros (exact tensors) sit at a small floor."""
    return [max(float(v), 1e-12) for v in values if v is not None and math.isfinite(v)]


def _log_safe(values) -> list[float]:
    """One point per value for a log axis: zeros at a small floor, NaN/Inf left as gaps."""
    return [max(float(v), 1e-12) if v is not None and math.isfinite(v) else math.nan
            for v in values]


def plot_prompts(results: dict, path: Path) -> Path:
    """Per prompt: PSNR of the candidate and of the 8-bit control; and every gate's distance
    as a fraction of its limit (max(k x control, floor)): a value right of 1 fails."""
    ids = list(results["prompts"])
    prompts = [results["prompts"][pid] for pid in ids]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 0.45 * len(ids) + 2.2))
    y = np.arange(len(ids))
    left.barh(y - 0.2, [p["psnr_mean"] for p in prompts], 0.4, label="packed")
    left.barh(y + 0.2, [p.get("control", {}).get("psnr_mean", math.nan) for p in prompts], 0.4,
              label="8-bit control", color="tab:gray")
    left.set(yticks=y, yticklabels=ids, xlabel="PSNR mean (dB) against the source, higher is better")
    left.invert_yaxis()
    left.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2)
    names = list(results["gates"])
    markers = "os^vD<>ph*"
    for number, name in enumerate(names):
        fractions = []
        for entry in prompts:
            judged = entry.get("distances", {}).get(name)
            fractions.append(math.nan if not judged or not judged["limit"] else
                             judged["candidate"] / judged["limit"])
        shown = [max(f, 1e-6) if math.isfinite(f) else 1e6 for f in fractions]   # NaN: far right
        right.scatter(shown, y + (number - len(names) / 2) * 0.06, s=18,
                      marker=markers[number % len(markers)], label=name)
    right.axvline(1.0, color="red", linestyle="--", label="limit")
    right.set_xscale("log")
    right.set(yticks=y, yticklabels=[], xlabel="distance / limit (log), a gate fails right of 1")
    right.invert_yaxis()
    right.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4)
    figure.suptitle("Per prompt: packed vs source, judged against the 8-bit control", y=1.12)
    return _save(figure, path)


def plot_trajectory(results: dict, path: Path) -> Path:
    """Relative error of the video latents after every denoising step, per prompt: the packed
    render (solid) and the 8-bit control (dashed), same colour per prompt."""
    figure, axis = plt.subplots(figsize=(8, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for number, (pid, entry) in enumerate(results["prompts"].items()):
        color = colors[number % len(colors)]
        candidate = entry.get("latent_trajectory") or []
        control = entry.get("control", {}).get("latent_trajectory") or []
        axis.plot(range(1, len(candidate) + 1), _log_safe(candidate), color=color, marker="o",
                  markersize=3, label=pid)
        if control:
            axis.plot(range(1, len(control) + 1), _log_safe(control), color=color,
                      linestyle="--", marker="x", markersize=3)
    axis.plot([], [], color="black", label="packed (solid)")
    axis.plot([], [], color="black", linestyle="--", label="8-bit control (dashed)")
    axis.set(yscale="log", xlabel="denoising step", ylabel="relative error of the video latents",
             title="Latent error after each step, against the source")
    axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axis.legend(fontsize=7, ncol=2)
    return _save(figure, path)


def plot_blocks(results: dict, metrics_rows: list[dict] | None, path: Path) -> Path:
    """Error per transformer block: first-step activations over the prompts (median and range
    per stream), and the quantized weights' errors per block."""
    panels = 2 if metrics_rows else 1
    figure, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    activations = axes[0][0]
    for stream, color in (("video", "tab:blue"), ("audio", "tab:orange")):
        by_block: dict[int, list[float]] = {}
        for entry in results["prompts"].values():
            for row in entry["blocks"]:
                if row["stream"] == stream:
                    by_block.setdefault(row["block"], []).append(row["rel_err"])
        blocks = sorted(by_block)
        if not blocks:
            continue
        values = [_positive(by_block[b]) for b in blocks]
        activations.fill_between(blocks, [min(v) for v in values], [max(v) for v in values],
                                 color=color, alpha=0.2)
        activations.plot(blocks, [float(np.median(v)) for v in values], color=color, marker="o",
                         markersize=3, label=f"{stream}: median over prompts (band: min-max)")
        control = {}
        for entry in results["prompts"].values():
            for row in entry["blocks"]:
                if row["stream"] == stream and math.isfinite(row.get("control_rel_err", math.nan)):
                    control.setdefault(row["block"], []).append(row["control_rel_err"])
        if control:
            shown = sorted(control)
            activations.plot(shown, [float(np.median(_positive(control[b]))) for b in shown],
                             color=color, linestyle="--", label=f"{stream}: 8-bit control")
    activations.set(yscale="log", xlabel="block", ylabel="relative error of the block output",
                    title="Activations, first denoising step (cumulative)")
    activations.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    activations.legend(fontsize=8)
    if metrics_rows:
        by_block = {}
        for row in metrics_rows:
            index = block_index(row["tensor"])
            if index is not None:
                by_block.setdefault(index, []).append(row["rel_mse"])
        weights = axes[0][1]
        blocks = sorted(by_block)
        if blocks:
            weights.boxplot([_positive(by_block[b]) for b in blocks], positions=blocks,
                            widths=0.6)
            shown = blocks[::max(1, len(blocks) // 16)]       # 48 labels would overlap
            weights.set_xticks(shown, [str(b) for b in shown])
        weights.set(yscale="log", xlabel="block", ylabel="relative MSE per tensor",
                    title="Quantized weights per block (metrics.parquet)")
    figure.tight_layout()
    return _save(figure, path)


def plot_module_types(metrics_rows: list[dict], path: Path) -> Path:
    """Distribution of per-tensor relative MSE for each module type (attn1.to_q, ff.net.2, ...)."""
    by_type: dict[str, list[float]] = {}
    for row in metrics_rows:
        by_type.setdefault(module_type(row["tensor"]), []).append(row["rel_mse"])
    names = sorted(by_type, key=lambda name: float(np.median(by_type[name])))
    figure, axis = plt.subplots(figsize=(8, 0.3 * len(names) + 1.5))
    axis.boxplot([_positive(by_type[name]) for name in names], vert=False, widths=0.6)
    axis.set(yticks=range(1, len(names) + 1), yticklabels=names, xscale="log",
             xlabel="relative MSE per tensor", title="Quantized weights by module type")
    return _save(figure, path)


def plot_tensor_errors(metrics_rows: list[dict], path: Path) -> Path:
    """Histograms of per-tensor relative MSE and cosine, one series per component."""
    by_component: dict[str, list[dict]] = {}
    for row in metrics_rows:
        by_component.setdefault(row.get("component") or "?", []).append(row)
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for component, rows in sorted(by_component.items()):
        errors = np.log10(_positive(r["rel_mse"] for r in rows))
        left.hist(errors, bins=30, histtype="step", linewidth=1.5,
                  label=f"{component} ({len(rows)})")
        right.hist([1.0 - r["cosine"] for r in rows], bins=30, histtype="step", linewidth=1.5,
                   label=component)
    left.set(xlabel="log10 relative MSE", ylabel="tensors",
             title="Distribution of per-tensor errors")
    right.set(xlabel="1 - cosine", ylabel="tensors", title="Distribution of per-tensor 1 - cosine")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


FAMILY_COLORS = {"hlwq": "tab:blue", "gguf": "tab:orange", "fp8": "tab:green", "int8": "tab:red",
                 "fp4": "tab:purple", "hqq": "tab:brown"}


def plot_error_per_bit(entries: list[dict], path: Path, title: str,
                       artifact: dict | None = None) -> Path:
    """Mean relative MSE against bits per weight: one point per format (``name``, ``family``,
    ``bits_per_weight``, ``rel_mse_mean``), the HLWQ front as a line, ``artifact`` (its own
    mix on the same tensors) as a star."""
    from hlwq.quant.formats import front

    figure, axes = plt.subplots(figsize=(9, 6))
    hlwq = front([e for e in entries if e["family"] == "hlwq"])
    axes.plot([e["bits_per_weight"] for e in hlwq], [e["rel_mse_mean"] for e in hlwq],
              color=FAMILY_COLORS["hlwq"], label="HLWQ front")
    for family, color in FAMILY_COLORS.items():
        points = [e for e in entries if e["family"] == family]
        axes.scatter([e["bits_per_weight"] for e in points],
                     _positive(e["rel_mse_mean"] for e in points), color=color, label=family,
                     zorder=3)
        for e in points:
            axes.annotate(e["name"], (e["bits_per_weight"], max(e["rel_mse_mean"], 1e-12)),
                          fontsize=7, xytext=(4, 3), textcoords="offset points")
    if artifact:
        axes.scatter([artifact["bits_per_weight"]], _positive([artifact["rel_mse_mean"]]),
                     marker="*", s=260, color="black", zorder=4, label="this artifact")
    axes.set_yscale("log")
    axes.set_xlabel("bits per weight (scales included)")
    axes.set_ylabel("mean relative MSE")
    axes.set_title(textwrap.fill(title, 110), fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    return _save(figure, path)


def plot_format_comparison(report_dir: Path, metrics_path: str | os.PathLike | None) -> dict[str, Path]:
    """The artifact's "against other formats at this size" sample (``format_comparison`` of
    the manifest beside its metrics.parquet) as an error-per-bit plot; nothing when the
    artifact has no measured comparison."""
    from hlwq.store.artifact import MANIFEST_NAME, read_manifest

    if metrics_path is None or not Path(metrics_path).with_name(MANIFEST_NAME).is_file():
        return {}
    comparison = read_manifest(Path(metrics_path).parent).get("format_comparison") or {}
    if not comparison.get("formats"):
        return {}
    sample = comparison["sample"]
    title = (f"This artifact's own tensors: {len(sample['tensors'])} of "
             f"{sample['quantized_tensors']} quantized tensors ({sample['rule']})")
    path = plot_error_per_bit(comparison["formats"], report_dir / PLOT_DIR / "formats.png", title,
                              comparison["artifact"])
    return {"Error per bit against other formats (this artifact's sample; the star is this "
            "artifact)": path}


def write_plots(report_dir: Path, results: dict, metrics_rows: list[dict] | None) -> dict[str, Path]:
    """Every plot of the report as ``{title: path}``, in page order."""
    plots = report_dir / PLOT_DIR
    written = {"Distances per prompt against their limits": plot_prompts(results,
                                                                          plots / "prompts.png"),
               "Latent error after each denoising step": plot_trajectory(
                   results, plots / "trajectory.png"),
               "Error per block": plot_blocks(results, metrics_rows, plots / "blocks.png")}
    if metrics_rows:
        written["Error per module type"] = plot_module_types(metrics_rows,
                                                             plots / "module_types.png")
        written["Distribution of per-tensor errors"] = plot_tensor_errors(
            metrics_rows, plots / "tensor_errors.png")
    return written


# --------------------------------------------------------------------------- HTML

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f2f2f2; } td.name { text-align: left; }
.pass { background: #e3f6e3; } .fail { background: #fbe0e0; font-weight: bold; }
.verdict { font-size: 1.4em; padding: 0.4em 0.8em; display: inline-block; }
figure { margin: 1em 0; } figcaption { font-size: 0.9em; color: #555; }
img.sheet { image-rendering: pixelated; width: 100%; max-width: 1200px; height: auto; }
img.plot { max-width: 100%; }
"""

IMAGE_CHECK = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-total", images.length);
  document.body.setAttribute("data-images-loaded", loaded);
  document.body.setAttribute("data-images", loaded === images.length ? "loaded" : "broken");
});
"""


def _e(value) -> str:
    return html.escape(str(value))


def _gate_table(results: dict) -> str:
    rows = []
    for name, gate in results["gates"].items():
        failed = ", ".join(gate["failed_prompts"]) or "-"
        blocks = ", ".join(gate.get("failed_blocks", [])) or ""
        ratio = "-" if gate["ratio"] is None else f"{gate['ratio']:.3g}"
        rows.append(f'<tr class="{gate["verdict"]}"><td class="name">{_e(name)}</td>'
                    f'<td>{gate["k"]:g}</td><td>{gate["floor"]:g}</td>'
                    f'<td class="name">{_e(gate["worst_prompt"])}</td>'
                    f'<td>{gate["candidate"]:.4g}</td><td>{gate["control"]:.4g}</td>'
                    f'<td>{ratio}</td><td>{gate["limit"]:.4g}</td>'
                    f'<td>{_e(gate["verdict"])}</td><td class="name">{_e(failed)}'
                    f'{"<br>" + _e(blocks) if blocks else ""}</td></tr>')
    return ("<table><tr><th>distance</th><th>k</th><th>floor</th><th>worst prompt</th>"
            "<th>packed</th><th>control</th><th>ratio</th><th>limit</th><th>verdict</th>"
            "<th>failed prompts / blocks</th></tr>" + "".join(rows) + "</table>")


def _distance_table(results: dict) -> str:
    """Per prompt and gate: packed distance / control distance (ratio), failures marked."""
    names = list(results["gates"])
    head = "".join(f"<th>{_e(name)}<br><small>{_e(gate_limit_label(results['gates'][name]))}"
                   "</small></th>" for name in names)
    rows = []
    for pid, entry in results["prompts"].items():
        cells = []
        for name in names:
            judged = entry["distances"][name]
            cells.append(f'<td class="{"" if judged["passed"] else "fail"}">'
                         f'{_e(distance_cell(judged))}</td>')
        rows.append(f'<tr class="{"pass" if entry["passed"] else "fail"}">'
                    f'<td class="name">{_e(pid)}</td>{"".join(cells)}</tr>')
    return (f"<table><tr><th>prompt</th>{head}</tr>" + "".join(rows) + "</table>")


def _metrics_table(results: dict) -> str:
    """Per prompt every absolute metric: packed, then the 8-bit control's in brackets."""
    head = "".join(f"<th>{_e(label)}</th>" for _, label, _ in OUTPUT_METRICS)
    rows = []
    for pid, entry in results["prompts"].items():
        control = entry.get("control", {})
        cells = "".join(
            f'<td>{fmt.format(entry[key])}'
            f'{" (" + fmt.format(control[key]) + ")" if key in control else ""}</td>'
            for key, _, fmt in OUTPUT_METRICS)
        size = f'{entry["width"]}x{entry["height"]}x{entry["frames"]}'
        rows.append(f'<tr class="{"pass" if entry["passed"] else "fail"}">'
                    f'<td class="name">{_e(pid)}</td><td>{size}</td><td>{entry["steps"]}</td>'
                    f'{cells}</tr>')
    return (f"<table><tr><th>prompt</th><th>WxHxF</th><th>steps</th>{head}</tr>"
            + "".join(rows) + "</table>")


def _frames(results: dict, report_dir: Path) -> str:
    parts = []
    for pid, entry in results["prompts"].items():
        if not (report_dir / FRAME_DIR / f"{pid}.png").is_file():
            continue
        control = entry.get("control", {})
        parts.append(
            f'<figure><img class="sheet" src="{FRAME_DIR}/{_e(pid)}.png" alt="{_e(pid)} worst frame">'
            f'<figcaption><b>{_e(pid)}</b>: frame {entry["worst_frame"]}, the packed render\'s '
            f'worst; PSNR packed {entry["psnr_min"]:.2f} dB, 8-bit control '
            f'{control.get("psnr_min", math.nan):.2f} dB</figcaption></figure>')
    return "".join(parts)


def _sheets(results: dict) -> str:
    parts = []
    for pid, entry in results["prompts"].items():
        verdict = "passed" if entry["passed"] else "FAILED " + ", ".join(entry["failed_gates"])
        parts.append(
            f'<figure><img class="sheet" src="{SHEET_DIR}/{_e(pid)}.png" alt="{_e(pid)}">'
            f'<figcaption><b>{_e(pid)}</b> ({_e(verdict)}): {_e(entry["prompt"])}; seed '
            f'{entry["seed"]}, PSNR {entry["psnr_mean"]:.2f} dB (worst frame '
            f'{entry["psnr_min"]:.2f}), SSIM {entry["ssim_mean"]:.4f}</figcaption></figure>')
    return "".join(parts)


def _control_text(results: dict) -> str:
    control = results.get("control") or {}
    if not control:
        return ""
    return (f"<p>Control: the source with the same {control['tensors']:,} tensors the packed "
            f"artifact quantized re-quantized at {control['bits']} bits (HLWQ, one scale per "
            f"block, {_e(control['mode'])}), rendered with the same prompts, seeds and settings. "
            "A gate passes when the packed render's distance from the source is at most "
            "max(k x the control's distance, floor).</p>")


def report_html(results: dict, plots: dict[str, Path], report_dir: Path) -> str:
    verdict = "passed" if results["passed"] else "FAILED"
    failures = "".join(f"<li>{_e(line)}</li>" for line in results["failures"])
    figures = "".join(
        f'<figure><img class="plot" src="{_e(path.relative_to(report_dir).as_posix())}" '
        f'alt="{_e(title)}"><figcaption>{_e(title)}</figcaption></figure>'
        for title, path in plots.items())
    suite = results["suite"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Output validation: {_e(verdict)}</title>
<style>{STYLE}</style></head>
<body data-images="pending">
<h1>Output validation</h1>
<p class="verdict {"pass" if results["passed"] else "fail"}">Output gates {verdict}</p>
<p>Artifact <code>{_e(results["artifact"])}</code> against source <code>{_e(results["source"])}</code>;
suite <code>{_e(suite["name"])}</code> (sha256 {_e(suite["sha256"][:16])}...),
{len(results["prompts"])} prompts, device {_e(results["device"])}.</p>
{_control_text(results)}
{"<ul>" + failures + "</ul>" if failures else ""}
<h2>Gates</h2>{_gate_table(results)}
<h2>Distances per prompt: packed / control (ratio)</h2>{_distance_table(results)}
<h2>Metrics per prompt: packed (control)</h2>{_metrics_table(results)}
<h2>Worst frames: source, control, packed</h2>{_frames(results, report_dir)}
<h2>Source, packed, difference</h2>{_sheets(results)}
<h2>Plots</h2>{figures}
<script>{IMAGE_CHECK}</script>
</body></html>
"""


def read_metrics_rows(metrics_path: str | os.PathLike | None) -> list[dict] | None:
    if metrics_path is None:
        return None
    import pyarrow.parquet as pq

    table = pq.read_table(metrics_path, columns=None)
    rows = [r for r in table.to_pylist() if r.get("rel_mse") is not None
            and r.get("action", "quantize") == "quantize"]
    return rows or None


def write_report(report_dir: str | os.PathLike, results: dict,
                 metrics_path: str | os.PathLike | None = None) -> Path:
    """Write the plots and ``report.html`` into ``report_dir`` (sheets must already be there)."""
    report_dir = Path(report_dir)
    plots = write_plots(report_dir, results, read_metrics_rows(metrics_path))
    plots |= plot_format_comparison(report_dir, metrics_path)
    path = report_dir / REPORT_NAME
    atomic_write_text(path, report_html(results, plots, report_dir))
    return path


# --------------------------------------------------------------------------- Prefect


def report_markdown(results: dict) -> str:
    """The gates' verdicts, then the model card's per-prompt table."""
    lines = [f"# Output gates {'passed' if results['passed'] else 'FAILED'}", "",
             f"Report: `{results['report']}`", "",
             ("| gate | k | floor | worst prompt | packed | control | ratio | limit | verdict "
              "| failed prompts |"), "|---|---:|---:|---|---:|---:|---:|---:|---|---|"]
    for name, gate in results["gates"].items():
        ratio = "-" if gate["ratio"] is None else f"{gate['ratio']:.3g}"
        lines.append(f"| {name} | {gate['k']:g} | {gate['floor']:g} | {gate['worst_prompt']} "
                     f"| {gate['candidate']:.4g} | {gate['control']:.4g} | {ratio} "
                     f"| {gate['limit']:.4g} | {gate['verdict']} "
                     f"| {', '.join(gate['failed_prompts']) or '-'} |")
    return "\n".join(lines) + "\n\n" + output_gate_table(results)


def publish_report(results: dict, report_dir: str | os.PathLike) -> None:
    """Attach the verdict (markdown), the plots and the contact sheets (image artifacts as data
    URLs: the UI cannot open local files) and a link to the report to the current run."""
    from prefect.artifacts import (
        create_image_artifact,
        create_link_artifact,
        create_markdown_artifact,
    )

    report_dir = Path(report_dir)
    create_markdown_artifact(report_markdown(results), key="output-gates",
                             description="output gate verdicts and per-prompt metrics")
    create_link_artifact(Path(results["report"]).resolve().as_uri(), link_text="report.html",
                         key="output-report", description="the full HTML validation report")
    images = [(path, "image/png", path.read_bytes())
              for path in sorted((report_dir / PLOT_DIR).glob("*.png"))]
    images += [(path, "image/jpeg", thumbnail_jpeg(path, THUMBNAIL_WIDTH))
               for folder in (FRAME_DIR, SHEET_DIR)
               for path in sorted((report_dir / folder).glob("*.png"))]
    for path, kind, data in images:
        key = re.sub(r"[^a-z0-9-]+", "-", f"validation-{path.parent.name}-{path.stem}".lower())
        create_image_artifact(f"data:{kind};base64,{base64.b64encode(data).decode()}",
                              key=key.strip("-"), description=path.name)
