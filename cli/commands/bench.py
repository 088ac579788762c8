"""`hlwq bench ...`: each benchmark compares two things in one run and records JSON."""

import click

from hlwq.cli.lazy_group import LazyGroup

BENCHMARKS = {
    "quantize": ("hlwq.benchmarks.quantize_bench:bench_quantize",
                 "Quantize speed and error vs polarquant 0.6.0 and GGUF Q5_0."),
    "scale": ("hlwq.benchmarks.scale_bench:bench_scale",
              "Run the flow on the real-width transformer with 1 and 2 workers."),
    "runtime": ("hlwq.benchmarks.runtime_bench:bench_runtime",
                "Peak memory and step latency: packed runtime vs BF16."),
    "budget": ("hlwq.benchmarks.budget_bench:bench_budget",
               "Budgeted mixed precision vs the best uniform width at equal size."),
    "calibration": ("hlwq.benchmarks.calibration_bench:bench_calibration",
                    "Block-by-block calibration (forward + backward) vs the quantize run, 48 blocks."),
    "formats": ("hlwq.benchmarks.formats_bench:bench_formats",
                "Error per bit vs GGUF, FP8, INT8, NVFP4, MXFP4 and HQQ on the same tensors."),
    "gates": ("hlwq.benchmarks.gates_bench:bench_gates",
              "Output gates: candidate / 8-bit control distance ratios, Q5 to 2 bits."),
    "lora": ("hlwq.benchmarks.lora_bench:bench_lora",
             "Packed + LoRA vs packed: step latency, memory overhead, error vs dequantized + PEFT."),
}


@click.group(cls=LazyGroup, lazy_commands=BENCHMARKS)
def bench() -> None:
    """Benchmarks (commands, not tests)."""
