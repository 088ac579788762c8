"""Allocation over formats (bits x group size) on the LTX-2.3 fixtures: at the size of
uniform Q4 with 32-value groups, the budget predicts and delivers no more output error."""

import math

import pytest
import torch

from hlwq.benchmarks.budget_bench import (
    CALIBRATION_PROMPTS,
    EVAL_PROMPTS,
    WeightSetter,
    output_rel_err,
    real_width_inputs,
)
from hlwq.quant.budget import (
    Candidate,
    TensorOptions,
    allocate,
    best_uniform_format,
    candidate_formats,
    format_label,
    tensor_options,
    uniform_allocation,
)
from hlwq.quant.sizes import format_bits_per_weight, packed_nbytes, size_table
from hlwq.store.artifact import tensor_key
from hlwq.store.inventory import build_inventory
from hlwq.tasks.budget import (
    activation_stats,
    allocate_rows,
    file_sampler,
    first_step_inputs,
    measure_damages,
)


def test_formats_cost_their_true_bits_per_weight():
    assert candidate_formats()[:3] == ((2, 128), (2, 64), (2, 32))
    assert len(candidate_formats()) == 21 and candidate_formats(group_size=32)[0] == (2, 32)
    assert candidate_formats(64) == tuple((b, g) for b in range(2, 9) for g in (64, 32))
    assert format_label(4, 32) == "Q4/g32" and format_label(5, 128) == "Q5"
    assert format_bits_per_weight(4, 32) == 4.5 and format_bits_per_weight(5, 128) == 5.125
    shape = (256, 4096)
    for bits, group in candidate_formats():
        codebook = 2 ** bits * 4
        assert 8 * (packed_nbytes(shape, bits, 128, group) - codebook) / math.prod(shape) == \
            format_bits_per_weight(bits, group)
    options = tensor_options("t", shape, {(4, 32): 1.0, (4, 128): 2.0, 5: 0.5})
    assert [c.format for c in options.candidates] == [(4, 32), (4, 128), (5, 128)]


def test_allocation_is_never_worse_than_the_best_uniform_format():
    # Three equal tensors whose hulls make the Lagrangian walk stop short of Q4/g32 for all.
    def option(name):
        return TensorOptions(name, (Candidate(4, 100, 10.0, 128), Candidate(4, 112, 2.0, 32),
                                    Candidate(5, 140, 1.9, 128)))
    options = [option(n) for n in "abc"]
    allocation = allocate(options, 336)
    assert best_uniform_format(options, 336) == (4, 32)
    assert allocation.damage <= uniform_allocation(options, 4, 32).damage
    assert allocation.total_bytes <= 336 and allocation.group_sizes["a"] in (32, 128)


def test_model_card_shows_the_budget_mix():
    from hlwq.store.model_card import render_model_card

    mix = {"Q4/g32": {"bits": 4, "group_size": 32, "bits_per_weight": 4.5, "tensors": 3,
                      "params": 1536, "packed_bytes": 900},
           "Q5": {"bits": 5, "group_size": 128, "bits_per_weight": 5.125, "tensors": 1,
                  "params": 512, "packed_bytes": 460}}
    budget = {"target_bytes": 1400, "scope": "transformer", "sensitivity": "params",
              "sensitivity_source": "fallback: the model cannot run here (why)",
              "total_bytes": 1360, "predicted_error": 0.01, "error_unit": "unit",
              "best_uniform": {"format": "Q4/g32", "predicted_error": 0.02}, "formats": mix}
    rows = [{"component": "transformer", "shape": [4, 128], "dtype": "BF16", "action": "keep",
             "bits": None}]
    card = render_model_card({"source": {"source": "/x", "kind": "local", "layout": "diffusers"},
                              "quantization": {"budget": budget, "mode": "refined"},
                              "format": "hlwq", "format_version": 1, "sizes": size_table(rows),
                              "validation": {}, "tensors": {}}, None)
    section = card.split("## Size budget")[1].split("\n## ")[0]
    assert "Sensitivity `params` (fallback: the model cannot run here (why))" in section
    assert "| `Q4/g32` | 4 | 32 | 4.500 | 3 |" in section and "| `Q5` | 5 | 128 | 5.125 | 1 |" in section
    assert "Q4/g32, predicts 0.02" in section
    assert "budget:" not in card.split("## Lineage")[1]     # not dumped again as JSON


def _equal_size_comparison(rows, model, names, forward, calibration, evaluation, root):
    """Allocate at the size of uniform Q4/g32 with output sensitivity; return (allocation,
    uniform) predicted damage and measured output error of each."""
    quantized = [r for r in rows if r["action"] == "quantize"]
    with torch.no_grad():
        stats = activation_stats(model, forward(calibration), "transformer", names)
        reference = forward(evaluation)()
    damages = measure_damages(quantized, file_sampler(root), "activations", stats)
    target = size_table([{**r, "bits": 4, "group_size": 32} for r in rows])["total_packed_bytes"]
    allocated, allocation = allocate_rows(rows, target, "transformer", damages)
    assert size_table(allocated)["total_packed_bytes"] == allocation.total_bytes <= target
    options = [tensor_options(tensor_key("transformer", r["tensor"]), r["shape"],
                              damages[tensor_key("transformer", r["tensor"])]) for r in quantized]
    uniform = uniform_allocation(options, 4, 32)
    setter = WeightSetter(model, names, cache=False)
    errors = {}
    for label, formats in (("budget", allocation.formats), ("uniform", uniform.formats)):
        setter.apply({name.removeprefix("transformer/"): f for name, f in formats.items()})
        with torch.no_grad():
            errors[label] = output_rel_err(reference, forward(evaluation)())
        setter.restore()
    return allocation, uniform, errors


@pytest.mark.slow
def test_budget_beats_uniform_q4_g32_on_the_tiny_fixture(tmp_path):
    from hlwq.tasks.validate_output import load_suite
    from hlwq.testing.fixtures import load_tiny_pipeline, make_tiny_ltx23

    root = make_tiny_ltx23(tmp_path / "tiny")
    rows = [r for r in build_inventory(root, "ltx23").to_pylist() if r["component"] == "transformer"]
    names = [r["tensor"] for r in rows if r["action"] == "quantize"]
    pipeline = load_tiny_pipeline(root)
    pipeline.set_progress_bar_config(disable=True)
    suite = {r.id: r for r in load_suite(None)}
    calibration = [first_step_inputs(pipeline, suite[p]) for p in CALIBRATION_PROMPTS]
    evaluation = [first_step_inputs(pipeline, suite[p]) for p in EVAL_PROMPTS]

    def forward(inputs):
        return lambda: [pipeline.transformer(**kwargs, return_dict=False) for kwargs in inputs]

    allocation, uniform, errors = _equal_size_comparison(
        rows, pipeline.transformer, names, forward, calibration, evaluation, root)
    assert allocation.damage <= uniform.damage
    assert errors["budget"] <= errors["uniform"], errors
    assert len(set(allocation.formats.values())) > 1        # a real mix, not one format


@pytest.mark.heavy   # 76 s on a quiet 2-core machine, minutes under load: `./dev.sh test -m heavy`
def test_budget_beats_uniform_q4_g32_on_the_real_width_fixture(tmp_path):
    from diffusers import LTX2VideoTransformer3DModel

    from hlwq.testing.fixtures import make_real_width_transformer

    root = make_real_width_transformer(tmp_path / "real-width", layers=1)
    rows = build_inventory(root, "ltx23").to_pylist()
    names = [r["tensor"] for r in rows if r["action"] == "quantize"]
    model = LTX2VideoTransformer3DModel.from_pretrained(root / "transformer",
                                                        torch_dtype=torch.float32).eval()
    config = dict(model.config)
    calibration = [real_width_inputs(config, seed) for seed in (1, 2)]
    evaluation = [real_width_inputs(config, seed) for seed in (11, 12)]

    def forward(inputs):
        return lambda: [model(**kwargs, return_dict=False) for kwargs in inputs]

    allocation, uniform, errors = _equal_size_comparison(
        rows, model, names, forward, calibration, evaluation, root)
    assert allocation.damage <= uniform.damage
    assert errors["budget"] <= errors["uniform"], errors


# --------------------------------------------------------------------------- sensitivity choice


def test_budget_task_falls_back_to_params_where_the_model_cannot_run(tmp_path):
    import pyarrow.parquet as pq
    from flow_support import write_diffusers_checkpoint

    from hlwq.quant.errors import BudgetError
    from hlwq.store.inventory import save_inventory
    from hlwq.tasks.budget import budget_task

    source = write_diffusers_checkpoint(tmp_path / "ckpt", layers=1, width=128)
    inventory = save_inventory(build_inventory(source, "ltx23"), tmp_path / "inventory.parquet")
    rows = pq.read_table(inventory).to_pylist()
    target = size_table([{**r, "bits": 4, "group_size": 32} for r in rows])["total_packed_bytes"]
    report = budget_task.fn(str(inventory), str(source), str(target))
    assert report["sensitivity"] == "params"
    assert report["sensitivity_source"].startswith("fallback: the model cannot run here")
    assert "not a whole LTX-2 pipeline" in report["sensitivity_source"]
    assert report["total_bytes"] <= target and report["formats"]
    stored = pq.read_table(inventory).to_pylist()
    assert size_table(stored)["total_packed_bytes"] == report["total_bytes"]
    assert {r["group_size"] for r in stored if r["action"] == "quantize"} <= {32, 64, 128}
    with pytest.raises(BudgetError, match="--sensitivity activations"):
        budget_task.fn(str(inventory), str(source), str(target), sensitivity="activations")


@pytest.mark.slow
def test_budget_task_measures_output_sensitivity_where_the_model_runs(tmp_path):
    import pyarrow.parquet as pq

    from hlwq.store.inventory import save_inventory
    from hlwq.store.model_card import render_model_card
    from hlwq.tasks.budget import CALIBRATION_PROMPTS, ERROR_UNITS, budget_task
    from hlwq.testing.fixtures import make_tiny_ltx23

    root = make_tiny_ltx23(tmp_path / "tiny")
    inventory = save_inventory(build_inventory(root, "ltx23"), tmp_path / "inventory.parquet")
    rows = pq.read_table(inventory).to_pylist()
    target = size_table([{**r, "bits": 4, "group_size": 32} for r in rows])["total_packed_bytes"]
    report = budget_task.fn(str(inventory), str(root), str(target), scope="transformer")
    assert report["sensitivity"] == "activations"
    assert report["error_unit"] == ERROR_UNITS["activations"]
    assert report["sensitivity_source"].startswith("measured: the model's output")
    assert report["sensitivity_source"].count(",") + 1 >= CALIBRATION_PROMPTS
    assert report["predicted_error"] <= report["best_uniform"]["predicted_error"]
    card = render_model_card({"source": {"source": str(root), "kind": "local", "layout": "diffusers"},
                              "quantization": {"budget": report, "mode": "refined"},
                              "format": "hlwq", "format_version": 1,
                              "sizes": size_table(pq.read_table(inventory)),
                              "validation": {}, "tensors": {}}, None)
    section = card.split("## Size budget")[1].split("\n## ")[0]
    assert "Sensitivity `activations` (measured" in section
    assert all(f"`{label}`" in section for label in report["formats"])


@pytest.mark.slow
def test_block_by_block_calibration_agrees_with_the_whole_model(tmp_path, monkeypatch):
    """Streaming the blocks records the same channel statistics as the in-memory forward and
    output gains that rank the layers alike; the task streams where the model does not fit."""
    from hlwq.quant.errors import CorruptCheckpointError
    from hlwq.runtime import block_calibration
    from hlwq.runtime.block_calibration import streamed_activation_stats
    from hlwq.tasks import budget
    from hlwq.tasks.validate_output import load_suite
    from hlwq.testing.fixtures import load_tiny_pipeline, make_tiny_ltx23

    root = make_tiny_ltx23(tmp_path / "tiny")
    pipeline = load_tiny_pipeline(root)
    pipeline.set_progress_bar_config(disable=True)
    inputs = [first_step_inputs(pipeline, load_suite(None)[1])]
    rows = build_inventory(root, "ltx23").to_pylist()
    chosen = [r for r in rows if r["action"] == "quantize" and (".attn1." in r["tensor"]
                                                                or ".ff." in r["tensor"])]
    names = {r["tensor"] for r in chosen}
    streamed, cost = streamed_activation_stats(root / "transformer", inputs, names)
    whole = activation_stats(pipeline.transformer, lambda: [pipeline.transformer(
        **kwargs, return_dict=False) for kwargs in inputs], "transformer", names)
    assert set(streamed.output_gain) == set(whole.output_gain) == \
        {f"transformer/{n}" for n in names}
    assert cost["blocks"] == 2 and cost["bytes_read"] > 0 and cost["forward_backward_s"] > 0
    cached, _ = streamed_activation_stats(root / "transformer", inputs, names, direct_reads=False)
    assert cached.output_gain == streamed.output_gain          # the same bytes, either way
    index = block_calibration.tensor_index(root / "transformer")
    monkeypatch.setattr(block_calibration, "tensor_index", lambda folder: {
        name: place for name, place in index.items() if name != "proj_out.weight"})
    with pytest.raises(CorruptCheckpointError, match="outside the blocks are missing: "
                                                     "\\['proj_out.weight'\\]"):
        streamed_activation_stats(root / "transformer", inputs, names)
    monkeypatch.undo()
    for key, channels in whole.channel_mean_square.items():
        assert torch.allclose(streamed.channel_mean_square[key], channels, rtol=1e-4)
    keys = sorted(whole.output_gain)

    def ranks(values):
        return torch.tensor(values).argsort().argsort().double()

    a, b = (ranks([stats.output_gain[k] for k in keys]) for stats in (streamed, whole))
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.6     # Spearman

    monkeypatch.setattr(budget, "_memory_shortfall", lambda rows, device: "too big (test)")
    only = [{**r, "action": "quantize" if r in chosen else "keep"} for r in rows]
    sensitivity, stats, why = budget.choose_sensitivity(only, root, "transformer")
    assert sensitivity == "activations"
    assert "block by block" in why and "too big (test)" in why
    assert "one forward and one backward" in why and stats.calibration["video_tokens"] > 0
    assert set(stats.output_gain) == {f"transformer/{n}" for n in names}
