import itertools
import json
import math
import random

from hlwq.cli.prefect_env import configure_prefect

configure_prefect()  # before Prefect loads its settings: the ephemeral API's longer start timeout

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from hlwq.cli.main import cli
from hlwq.quant.budget import (
    Candidate,
    TensorOptions,
    allocate,
    allocation_tables,
    best_uniform_bits,
    format_label,
    lower_hull,
    smallest_size,
    tensor_options,
    weighted_relative_mse,
)
from hlwq.quant.core import dequantize, quantize_tensor
from hlwq.quant.errors import BudgetError, InvalidOptionError
from hlwq.quant.names import block_and_module
from hlwq.quant.sizes import format_size, packed_nbytes, parse_size, size_table
from hlwq.store.inventory import build_inventory
from hlwq.store.safetensors_io import read_rows
from hlwq.tasks.budget import (
    activation_stats,
    allocate_rows,
    measure_damages,
    params_sensitivity,
    rows_in_scope,
)

OFFICIAL = "model.diffusion_model."


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("text, expected", [
    ("15GB", 15_000_000_000), ("15 gb", 15_000_000_000), ("14.5GiB", int(14.5 * 2**30)),
    ("800MB", 800_000_000), ("1.5 TB", 1_500_000_000_000), ("64KiB", 65536),
    ("123456789", 123456789), (".5GB", 500_000_000), ("2e3 MB", 2_000_000_000), (4096, 4096),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "fifteen GB", "15 GBs", "15XB", "-1GB", "0GB",
                                  "15 G B", "1,5GB", "0.1"])
def test_parse_size_rejects_garbage(text):
    with pytest.raises(InvalidOptionError, match="--target-size"):
        parse_size(text)


def test_format_size():
    assert format_size(15_013_456_789) == "15.01 GB (15,013,456,789 bytes)"
    assert format_size(999) == "999 bytes"


# --------------------------------------------------------------------------- allocation


def random_problem(rng: random.Random, shapes) -> list[TensorOptions]:
    """Tensors whose error falls ~4x per bit, with random sensitivities and wobble."""
    options = []
    for i, shape in enumerate(shapes):
        weight = rng.uniform(0.1, 3.0) * shape[0] * shape[1]
        damages = {b: weight * 0.12 * 3.8 ** -(b - 2) * rng.uniform(0.8, 1.25) for b in range(2, 9)}
        options.append(tensor_options(f"t{i}", shape, damages))
    return options


def brute_force(options, budget, fixed=0) -> float:
    return min(math.fsum(c.damage for c in combo)
               for combo in itertools.product(*(o.candidates for o in options))
               if fixed + sum(c.nbytes for c in combo) <= budget)


SMALL_SHAPES = [(64, 128), (128, 256), (96, 384), (32, 128)]


def test_allocation_never_exceeds_the_budget():
    rng = random.Random(0)
    for _ in range(150):
        options = random_problem(rng, [(rng.choice([16, 64, 256]), rng.choice([128, 200, 512]))
                                       for _ in range(rng.randint(1, 12))])
        fixed = rng.randint(0, 10_000)
        floor = smallest_size(options, fixed)
        budget = rng.randint(floor, floor + sum(o.candidates[-1].nbytes for o in options))
        allocation = allocate(options, budget, fixed)
        chosen = [next(c for c in o.candidates if c.bits == allocation.bits[o.name]) for o in options]
        assert allocation.quantized_bytes == sum(c.nbytes for c in chosen)
        assert allocation.total_bytes <= budget
        assert allocation.damage == pytest.approx(math.fsum(c.damage for c in chosen))


def test_allocation_is_optimal_on_hull_breakpoints():
    """Where the budget is what a price per byte buys, the Lagrangian answer is the optimum."""
    rng = random.Random(1)
    for _ in range(6):
        options = random_problem(rng, SMALL_SHAPES)
        for price in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1):
            picks = [min(o.candidates, key=lambda c: c.damage + price * c.nbytes) for o in options]
            budget = sum(c.nbytes for c in picks)
            allocation = allocate(options, budget)
            assert allocation.damage == pytest.approx(brute_force(options, budget), rel=1e-12)


def test_allocation_is_within_one_hull_step_of_the_optimum():
    rng = random.Random(2)
    exact = 0
    for _ in range(40):
        options = random_problem(rng, SMALL_SHAPES)
        top = sum(o.candidates[-1].nbytes for o in options)
        budget = rng.randint(smallest_size(options), top)
        best = brute_force(options, budget)
        step = max(a.damage - b.damage for o in options
                   for a, b in itertools.pairwise(lower_hull(o.candidates)))
        damage = allocate(options, budget).damage
        assert best - 1e-12 <= damage <= best + step
        exact += damage <= best * (1 + 1e-12)
    assert exact >= 25          # most budgets are solved exactly by the fill


def test_fill_spends_what_the_hull_walk_leaves():
    # The big tensor's only step does not fit; two cheap upgrades of the small one do.
    big = TensorOptions("big", (Candidate(2, 1000, 10.0), Candidate(3, 1600, 4.0)))
    small = TensorOptions("small", (Candidate(2, 100, 5.0), Candidate(3, 150, 4.0),
                                    Candidate(4, 200, 1.0)))
    allocation = allocate([big, small], budget=1300)
    assert allocation.bits == {"big": 2, "small": 4} and allocation.total_bytes == 1200
    assert allocation.damage == brute_force([big, small], 1300) == 11.0


def test_lower_hull_drops_dominated_and_concave_points():
    points = [Candidate(2, 100, 10.0), Candidate(3, 200, 9.5), Candidate(4, 300, 2.0),
              Candidate(5, 400, 2.5), Candidate(6, 500, 1.0)]
    assert [c.bits for c in lower_hull(points)] == [2, 4, 6]


def test_impossible_budget_names_the_smallest_reachable_size():
    options = [tensor_options("a", (256, 256), {2: 1.0, 5: 0.1}),
               tensor_options("b", (512, 128), {2: 1.0, 5: 0.1})]
    floor = smallest_size(options, fixed_bytes=5000)
    assert floor == 5000 + packed_nbytes((256, 256), 2) + packed_nbytes((512, 128), 2)
    with pytest.raises(BudgetError) as error:
        allocate(options, floor - 1, fixed_bytes=5000)
    assert f"{floor:,} bytes" in str(error.value) and "smallest reachable" in str(error.value)
    assert allocate(options, floor, 5000).bits == {"a": 2, "b": 2}
    assert best_uniform_bits(options, floor - 1, 5000) is None
    assert best_uniform_bits(options, floor + 10**6, 5000) == 5


def test_bad_problems_are_refused():
    with pytest.raises(BudgetError, match="twice"):
        allocate([TensorOptions("a", (Candidate(2, 10, 1.0),))] * 2, 100)
    with pytest.raises(BudgetError, match="non-negative"):
        allocate([TensorOptions("a", (Candidate(2, 10, math.nan),))], 100)


def test_tables_by_module_and_block():
    assert block_and_module(f"{OFFICIAL}transformer_blocks.7.attn1.to_q.weight") == \
        ("transformer_blocks.7", "attn1.to_q")
    assert block_and_module("proj_out.weight") == ("", "proj_out")
    rows = [{"tensor": f"transformer_blocks.{i}.ff.net.2.weight", "shape": (4, 8), "bits": b}
            for i, b in ((0, 4), (1, 2), (10, 3))]
    tables = allocation_tables(rows)
    assert tables["modules"]["ff.net.2"]["mean_bits"] == 3.0
    assert tables["modules"]["ff.net.2"]["widths"] == {"2": 1, "3": 1, "4": 1}
    assert list(tables["blocks"]) == ["transformer_blocks.0", "transformer_blocks.1",
                                      "transformer_blocks.10"]


# --------------------------------------------------------------------------- damage


def test_relative_error_weights_channels():
    ref = torch.ones(2, 4)
    approx = ref.clone()
    approx[:, 0] += 1.0
    assert weighted_relative_mse(ref, approx) == pytest.approx(0.25)
    assert weighted_relative_mse(ref, approx, torch.tensor([0.0, 1.0, 1.0, 1.0])) == 0.0
    assert weighted_relative_mse(ref, approx, torch.tensor([3.0, 1.0, 1.0, 1.0])) == pytest.approx(0.5)


@pytest.fixture
def small_checkpoint(tmp_path):
    """An official-layout file: 2 blocks x 2 quantized linears, a bias and a VAE conv."""
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for block in range(2):
        for module, shape in (("attn1.to_q", (32, 128)), ("ff.net.2", (16, 256))):
            tensors[f"{OFFICIAL}transformer_blocks.{block}.{module}.weight"] = \
                torch.randn(shape, generator=gen).bfloat16()
    tensors[f"{OFFICIAL}transformer_blocks.0.attn1.to_q.bias"] = torch.zeros(32).bfloat16()
    tensors["vae.decoder.conv_in.conv.weight"] = torch.zeros(8, 8, 3, 3, 3).bfloat16()
    path = tmp_path / "ltx-2.3-small.safetensors"
    save_file(tensors, str(path))
    return path


def test_read_rows_reads_only_the_sampled_rows(small_checkpoint):
    row = next(r for r in build_inventory(small_checkpoint, "ltx23").to_pylist()
               if r["tensor"].endswith("blocks.1.ff.net.2.weight"))
    stored = load_file(small_checkpoint)[row["tensor"]].float()
    indices = torch.tensor([0, 5, 15])
    assert torch.equal(read_rows(small_checkpoint, row, indices), stored[indices])


def test_measured_damage_allocation_fits_and_prefers_the_edges(small_checkpoint):
    from hlwq.tasks.budget import file_sampler

    rows = build_inventory(small_checkpoint, "ltx23").to_pylist()
    quantized = [r for r in rows if r["action"] == "quantize"]
    damages = measure_damages(rows, file_sampler(small_checkpoint.parent), bits=(2, 3, 4))
    for curve in damages.values():
        assert curve[2, 128] > curve[3, 128] > curve[4, 128] > 0
        assert curve[4, 128] > curve[4, 64] > curve[4, 32]      # smaller groups, less error
    shares = params_sensitivity(quantized)
    assert math.fsum(shares.values()) == pytest.approx(1.0)
    target = size_table(rows)["total_packed_bytes"]      # room for 5 bits everywhere
    allocated, allocation = allocate_rows(rows, target, "package", damages)
    assert set(allocation.bits.values()) == {4}          # the widest candidate measured
    assert size_table(allocated)["total_packed_bytes"] == allocation.total_bytes <= target
    tight = allocation.fixed_bytes + sum(packed_nbytes(r["shape"], 3) for r in quantized)
    allocated, allocation = allocate_rows(rows, tight, "package", damages)
    assert size_table(allocated)["total_packed_bytes"] <= tight
    with pytest.raises(BudgetError, match="smallest reachable"):
        allocate_rows(rows, 1000, "package", damages)


def test_scopes():
    rows = [{"component": c, "tensor": "w"} for c in ("transformer", "vae", "text_encoder")]
    assert [r["component"] for r in rows_in_scope(rows, "checkpoint")] == ["transformer", "vae"]
    assert [r["component"] for r in rows_in_scope(rows, "transformer")] == ["transformer"]
    assert len(rows_in_scope(rows, "package")) == 3
    with pytest.raises(InvalidOptionError, match="--target-scope"):
        rows_in_scope(rows, "everything")


def test_activation_damage_predicts_the_output_error():
    """First-order model: predicted output rel MSE of a quantized MLP ~ the measured one."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.GELU(),
                                torch.nn.Linear(256, 128), torch.nn.GELU(),
                                torch.nn.Linear(128, 128))
    x = torch.randn(64, 128) * torch.linspace(0.2, 3.0, 128)   # loud and quiet channels
    stats = activation_stats(model, lambda: model(x), "mlp")
    assert set(stats.output_gain) == {"mlp/0.weight", "mlp/2.weight", "mlp/4.weight"}
    assert stats.channel_mean_square["mlp/0.weight"].shape == (128,)
    rows = [{"component": "mlp", "tensor": f"{name}.weight", "action": "quantize",
             "shape": list(module.weight.shape), "dtype": "F32"}
            for name, module in model.named_children() if isinstance(module, torch.nn.Linear)]
    weights = {f"mlp/{r['tensor']}": model.get_submodule(r["tensor"][:-7]).weight for r in rows}
    damages = measure_damages(rows, lambda row, count, seed: weights[f"mlp/{row['tensor']}"].detach(),
                              sensitivity="activations", stats=stats, bits=(3,))
    with torch.no_grad():
        reference = model(x)
        for module in (model[0], model[2], model[4]):
            module.weight.copy_(dequantize(quantize_tensor(module.weight, 3)))
        measured = float((model(x) - reference).square().sum() / reference.square().sum())
    predicted = math.fsum(curve[3, 128] for curve in damages.values())
    assert 0.6 < predicted / measured < 1.6


class _Block(torch.nn.Module):
    """Self-attention and an MLP on (batch, tokens, width), with residuals."""

    def __init__(self, width=32):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(width, width) for _ in range(4))
        self.up, self.down = torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)

    def forward(self, x):
        attention = torch.softmax(self.q(x) @ self.k(x).mT / 4, -1) @ self.v(x)
        x = x + self.o(attention)
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def test_output_gains_from_one_backward_agree_with_the_noise_probe():
    """The Hutchinson estimate (one forward + one backward) against the oracle (one noisy
    forward per linear, averaged over seeds): same ranking, same scale."""
    from hlwq.runtime.block_calibration import output_gains
    from hlwq.testing.sensitivity_probe import probe_gains

    torch.manual_seed(0)
    model = torch.nn.Sequential(_Block(), _Block())
    with torch.no_grad():
        model[1].up.weight.mul_(4)          # a louder layer, so the gains spread
    x = torch.randn(3, 24, 32) * torch.linspace(0.3, 2.0, 32)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    gains, outputs = output_gains(model, linears, [lambda: model(x)])
    assert torch.allclose(outputs[0], model(x)) and not outputs[0].requires_grad
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    probes = [probe_gains(linears, lambda: model(x), seed=seed) for seed in range(4)]
    oracle = {n: sum(p[n] for p in probes) / len(probes) for n in linears}
    names = sorted(linears)
    ranks = [torch.tensor(v).argsort().argsort().double()
             for v in ([gains[n][1] for n in names], [oracle[n] for n in names])]
    assert float(torch.corrcoef(torch.stack(ranks))[0, 1]) > 0.8
    assert 0.7 < sum(gains[n][1] for n in names) / sum(oracle.values()) < 1.4


def small_cross_attention():
    from diffusers.models.transformers.transformer_ltx2 import (
        LTX2Attention,
        LTX2PerturbedAttnProcessor,
    )

    torch.manual_seed(0)
    attn = LTX2Attention(query_dim=32, heads=4, kv_heads=4, dim_head=16, cross_attention_dim=24,
                         apply_gated_attention=True, processor=LTX2PerturbedAttnProcessor())
    with torch.no_grad():
        for norm in (attn.norm_q, attn.norm_k):
            norm.weight.uniform_(0.5, 1.5)
    mask = torch.zeros(2, 1, 64)
    mask[1, :, 50:] = -10000.0                 # the second sequence's last keys are padding
    return attn, torch.randn(2, 3, 32), torch.randn(2, 64, 24), mask


def test_cross_attention_with_its_values_after_the_weights_is_the_same_attention():
    """3 queries over 64 keys: the reassociated value projection and the scaled scores give
    the module's own output; a self-attention or many queries go to its own processor."""
    from hlwq.runtime.calibration_attention import ValuesAfterAttention, few_queries

    attn, queries, text, mask = small_cross_attention()
    standing, seen = attn.processor, []

    def record(linear, x, mixed, heads):
        seen.append((linear, x.shape, mixed.shape, heads.shape))
        return heads

    expected = attn(queries, encoder_hidden_states=text, attention_mask=mask)
    attn.processor = ValuesAfterAttention(standing, record)
    assert few_queries(3, 64, 16) and not few_queries(64, 64, 16)
    assert torch.allclose(attn(queries, encoder_hidden_states=text, attention_mask=mask),
                          expected, atol=1e-5)
    assert seen == [(attn.to_v, (2, 64, 24), (2, 4, 3, 24), (2, 4, 3, 16))]
    many = torch.randn(2, 64, 32)
    mine = attn(many, encoder_hidden_states=text)
    attn.processor = standing
    assert torch.equal(mine, attn(many, encoder_hidden_states=text)) and len(seen) == 1


def test_output_gains_are_the_same_with_the_values_after_the_weights():
    from hlwq.runtime.block_calibration import output_gains

    attn, queries, text, mask = small_cross_attention()
    linears = {n: m for n, m in attn.named_modules() if isinstance(m, torch.nn.Linear)}
    calls = [lambda: attn(queries, encoder_hidden_states=text, attention_mask=mask)]
    reassociated, _ = output_gains(attn, linears, calls)
    plain, _ = output_gains(attn, linears, calls, values_after_weights=False)
    assert set(reassociated) == set(plain) == set(linears)
    for name, (channels, gain) in plain.items():
        assert torch.allclose(reassociated[name][0], channels, rtol=1e-5), name
        assert math.isclose(reassociated[name][1], gain, rel_tol=1e-4), name
    assert attn.processor.__class__.__name__ == "LTX2PerturbedAttnProcessor"


def test_weight_gradient_energy_is_the_squared_weight_gradient_norm():
    from hlwq.runtime.block_calibration import weight_gradient_energy

    torch.manual_seed(0)
    for tokens in (3, 40):      # through the Gram matrices, and through the gradient itself
        x, grad = torch.randn(2, tokens, 8), torch.randn(2, tokens, 6)
        expected = sum(float((grad[b].T @ x[b]).square().sum()) for b in range(2))
        assert math.isclose(weight_gradient_energy(x, grad), expected, rel_tol=1e-5)
    assert math.isclose(weight_gradient_energy(x[0], grad[0]),
                        float((grad[0].T @ x[0]).square().sum()), rel_tol=1e-5)


def test_layers_reading_one_input_share_its_gram_matrix_and_channel_sums():
    from hlwq.runtime.block_calibration import _InputCache, weight_gradient_energy

    torch.manual_seed(0)
    x, cache = torch.randn(2, 5, 16), _InputCache()
    for grad in (torch.randn(2, 5, 16), torch.randn(2, 5, 12)):      # key and value
        assert math.isclose(weight_gradient_energy(x, grad, cache),
                            weight_gradient_energy(x, grad), rel_tol=1e-6)
    assert len(cache._entries) == 1
    assert torch.allclose(cache.channel_sums(x), x.double().square().sum((0, 1)))


def test_calibration_measures_the_conditional_pass_of_guided_calls():
    from hlwq.tasks.budget import conditional_pass

    guided = {"hidden_states": torch.stack([torch.zeros(3, 4), torch.ones(3, 4)]),
              "timestep": torch.tensor([0.0, 1.0]), "num_frames": 9, "coords": None}
    half = conditional_pass(guided, guided=True)
    assert half["hidden_states"].shape == (1, 3, 4) and bool(half["hidden_states"].eq(1).all())
    assert half["timestep"].tolist() == [1.0] and half["num_frames"] == 9
    assert conditional_pass(guided, guided=False) is guided


def test_a_block_is_filled_from_its_staged_bytes_and_checked_strictly(tmp_path):
    from hlwq.quant.errors import CorruptCheckpointError
    from hlwq.runtime.block_calibration import block_places, fill_part, tensor_index
    from hlwq.store.safetensors_io import StagingReader

    block = torch.nn.Linear(4, 3).to(torch.bfloat16)
    weights = {"blocks.0.weight": torch.randn(3, 4).to(torch.bfloat16),
               "blocks.0.bias": torch.randn(3).float()}           # stored in another dtype
    save_file(weights, str(tmp_path / "m.safetensors"))
    address = block.weight.data_ptr()
    places = block_places(block, tensor_index(tmp_path), "blocks.0.", tmp_path)
    assert fill_part(block, places, StagingReader().read(places.values())) == 3 * 4 * 2 + 3 * 4
    assert block.weight.data_ptr() == address
    assert torch.equal(block.weight, weights["blocks.0.weight"])
    assert torch.equal(block.bias, weights["blocks.0.bias"].to(torch.bfloat16))
    save_file({"blocks.1.weight": torch.zeros(4, 4)}, str(tmp_path / "m.safetensors"))
    mismatch = "missing \\['bias'\\].*wrong shape \\['weight'\\]"
    with pytest.raises(CorruptCheckpointError, match=mismatch):
        block_places(block, tensor_index(tmp_path), "blocks.1.", tmp_path)


# --------------------------------------------------------------------------- plan CLI


def test_plan_with_target_size_prints_the_allocation(small_checkpoint):
    plain = json.loads(CliRunner().invoke(cli, ["plan", str(small_checkpoint), "--json",
                                                "--bits", "3"]).output)
    target = plain["total_packed_bytes"] + 2000          # a little more than uniform 3-bit
    result = CliRunner().invoke(cli, ["plan", str(small_checkpoint), "--json",
                                      "--target-size", str(target)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    budget = report["budget"]
    assert report["total_packed_bytes"] == budget["total_bytes"] <= target
    assert budget["best_uniform"]["bits"] == 3
    assert budget["predicted_error"] < budget["best_uniform"]["predicted_error"]
    assert budget["damage_source"] == "measured" and len(budget["bits"]) == 4
    assert set(budget["modules"]) == {"attn1.to_q", "ff.net.2"}
    assert sum(e["tensors"] for e in budget["formats"].values()) == 4
    assert set(budget["group_sizes"].values()) <= {32, 64, 128}
    text = CliRunner().invoke(cli, ["plan", str(small_checkpoint), "--target-size",
                                    f"{target / 1000}kB", "--target-scope", "transformer"])
    assert text.exit_code == 0, text.output
    assert "Size budget" in text.output and "scope transformer" in text.output
    assert "best uniform format that fits: Q5/g32" in text.output   # the VAE is out of scope
    assert any(line.split()[:2] == ["format", "tensors"] for line in text.output.splitlines())
    lines = text.output.splitlines()
    assert any(line.split()[:2] == ["transformer_blocks.1", "2"] for line in lines)
    assert any(line.split()[:3] == ["module", "tensors", "params"] for line in lines)


def test_plan_with_an_impossible_or_unreadable_target(small_checkpoint):
    tiny = CliRunner().invoke(cli, ["plan", str(small_checkpoint), "--target-size", "5kB"])
    assert isinstance(tiny.exception, BudgetError)
    assert "smallest reachable size" in str(tiny.exception)
    garbage = CliRunner().invoke(cli, ["plan", str(small_checkpoint), "--target-size", "lots"])
    assert isinstance(garbage.exception, InvalidOptionError) and "'lots'" in str(garbage.exception)


# --------------------------------------------------------------------------- quantize flow


@pytest.mark.slow
def test_quantize_flow_with_a_size_budget(tmp_path):
    """`hlwq quantize --target-size`: mixed widths that fit, recorded in the manifest."""
    from distributed import LocalCluster
    from flow_support import write_diffusers_checkpoint

    from hlwq.flows.quantize_flow import run_quantize
    from hlwq.store.artifact import read_manifest, verify_artifact

    source = write_diffusers_checkpoint(tmp_path / "ckpt", layers=2, width=128)
    rows = build_inventory(source, "ltx23").to_pylist()
    q3, q4 = (size_table([{**r, "bits": b} for r in rows])["total_packed_bytes"] for b in (3, 4))
    target = (q3 + q4) // 2
    out = tmp_path / "artifact"
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster:
        summary = run_quantize(str(source), str(out), dask_address=cluster.scheduler_address,
                               target_size=str(target))
    assert verify_artifact(out) == []
    manifest = read_manifest(out)
    budget = manifest["quantization"]["budget"]
    assert manifest["sizes"]["total_packed_bytes"] == budget["total_bytes"] <= target
    assert summary["budget"]["total_bytes"] == budget["total_bytes"]
    assert budget["best_uniform"]["bits"] == 3 and budget["scope"] == "package"
    assert budget["sensitivity"] == "params"           # a transformer alone cannot render
    formats = [(entry["bits"], entry["group_size"]) for entry in manifest["tensors"].values()
               if entry.get("bits")]
    assert len(set(formats)) >= 2, formats
    assert {label: e["tensors"] for label, e in budget["formats"].items()} == \
        {format_label(*f): formats.count(f) for f in set(formats)}
    card = (out / "README.md").read_text()
    assert "## Size budget" in card and all(f"`{label}`" in card for label in budget["formats"])
