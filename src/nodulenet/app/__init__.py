"""The desktop viewer (``nodulenet viewer``), the optional ``app`` extra: PySide6 (Qt 6) and VTK.

Importing this package imports neither; :mod:`nodulenet.app.launch` checks that they are there. See docs/viewer.md.
"""
