"""What a --target-size budget counts (tasks/budget.py selects the rows).

Its own module, free of torch, because the CLI builds its options from it at startup.
"""

SCOPES = ("package", "checkpoint", "transformer")
SCOPE_HELP = ("package: every tensor the plan lists; checkpoint: all but the text encoder "
              "(what the LTX-2.3 checkpoint files hold; Gemma 3 is a separate download); "
              "transformer: the transformer alone")
