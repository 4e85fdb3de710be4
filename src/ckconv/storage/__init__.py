"""Bytes on disk: regular-file checks and capped reads, zip archives, atomic staging, fast copies, the spec cache.

Nothing here knows what a checkpoint is; everything above writes and reads files through it.
"""
