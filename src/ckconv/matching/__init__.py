"""Matching a checkpoint's model onto an architecture: targets (lookup and specs), the key pipeline (engine,
alignment, selectors), the report, and remapping a checkpoint by it."""
