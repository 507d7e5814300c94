"""tunec's runtime: executes a compiled plan (training). Imports the compiler, never the reverse.

The training loop lands with its own issue; until then this package only marks
the place in the layout.
"""
