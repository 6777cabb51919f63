"""`python -m runtime ...` is the `mamba2-aot` command line."""

from runtime.tools.cli import main

main()
