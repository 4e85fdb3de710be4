"""Looking at checkpoints without converting them: ``inspect``, ``scan`` and ``diff``."""
