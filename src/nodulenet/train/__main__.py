"""``python -m nodulenet.train <command>``: the training commands without the main CLI (also under torchrun)."""

from nodulenet.train.cli import main

main()
