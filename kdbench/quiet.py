"""Silence third-party start-up messages that a kdbench user cannot act on.

torchao logs one warning per prebuilt C extension that does not match this Python or GPU (`Failed to load
..._C_*.so`), and registering its enums trips a torch deprecation warning (`... is an Enum subclass ...`). Each
process that imports kdbench (the CLI, the memory-measurement children, a user's script) would print them.
Filters drop exactly those records, so every other warning from these loggers still shows.
"""

from __future__ import annotations

import logging

# logger name -> substrings of the messages dropped from it
_NOISE = {
    "torchao": ("Failed to load ", "Skipping import of cpp extensions"),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
}


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def install() -> None:
    """Attach the filters (idempotent); cheap: it imports none of the libraries."""
    for name, fragments in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(fragments))
