"""Built-in format plugins and the interface every format implements."""

from .base import Format, WriteOptions

__all__ = ["Format", "WriteOptions"]
