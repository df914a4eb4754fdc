"""The ``nodulenet`` command's sub-commands, one module per stage, above every stage package.

Each module holds thin Typer wrappers over a stage's API (``predict_api``, ``train``, ``serve``, ``app``) and
imports that API inside the command, so ``nodulenet --help`` stays instant and no stage package ever imports a
command (the import graph has no cycle: ``tests/test_import_graph.py``). ``nodulenet.cli`` assembles them.
"""
