"""`python -m lamina` is the `lamina` command (also what torchrun launches)."""

from lamina.cli import main

main()
