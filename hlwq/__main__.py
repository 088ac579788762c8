"""`python -m hlwq` is the `hlwq` command."""

from hlwq.cli.main import main

main()
