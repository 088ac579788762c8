"""Test and benchmark fixtures (a tiny LTX-2.3 with the real architecture, a real-width
transformer writer). Production layers never import this package; the CLI's `fixture`
command and the benchmarks do."""
