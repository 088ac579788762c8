"""The options' vocabularies, named once and free of torch: the CLI builds its options from them
at startup, before any heavy import.
"""

MODES = ("refined", "reference")            # encoders: refined scale search, or the reference's
ON_NONFINITE = ("fail", "keep")             # a tensor with NaN/Inf fails the run, or is kept
# What a --target-size budget counts (tasks/budget.py selects the rows).
SCOPES = ("package", "checkpoint", "transformer")
SCOPE_HELP = ("package: every tensor the plan lists; checkpoint: all but the text encoder "
              "(what the LTX-2.3 checkpoint files hold; Gemma 3 is a separate download); "
              "transformer: the transformer alone")
# How a budget weighs each tensor's damage: measured from the model's output, from parameter
# counts, or auto (activations where the model can run, else params).
SENSITIVITIES = ("params", "activations")
SENSITIVITY_CHOICES = ("auto", *SENSITIVITIES)
# Where a render keeps its weights (runtime/offload.py) and the compute dtypes it takes.
OFFLOAD_MODES = ("auto", "none", "model", "sequential", "group")
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
