"""What is inside a checkpoint: where the model is (one rule, :mod:`.unwrap`), the sections of a bundle, pickled
modules, optimizer slot names, bundle layouts, and the transforms (``--plain``, ``--dtype``) on checkpoint trees.

Pure functions of a checkpoint tree: no I/O, no plugins.
"""
