"""``python -m nodulenet`` (and ``torchrun -m nodulenet``) runs the CLI."""

from nodulenet.cli import main

main()
