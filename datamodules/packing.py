"""Document packing: back-to-back fixed windows of ``seq_len + 1`` tokens cut from a stream of documents.

No padding and no token is used twice: a document longer than a window continues in the next one, and a window
may hold the end of one document, its EOS and the start of the next (the layout of the DeepSeek-V3 report). The
packer also knows exactly where the next window starts, as a ``StreamPosition``, which is the whole resume state.
"""

from collections import deque
from typing import NamedTuple

import numpy as np


class StreamPosition(NamedTuple):
    """A point in a document stream: the next token is ``offset`` into document ``doc`` of ``file`` in pass ``epoch``.

    ``file`` indexes the stream's files in that epoch's order and ``doc`` the documents of that file as the stream
    reads them (empty and held-out ones too, ``datamodules.documents.iter_positioned``), so resuming opens that
    file, drops its documents before ``doc``, re-encodes document ``doc`` and drops its first ``offset`` tokens.
    """

    epoch: int = 0
    file: int = 0
    doc: int = 0
    offset: int = 0


class Packer:
    """Cut windows of ``window`` tokens from documents added in stream order.

    Args:
        window: tokens per window (``seq_len + 1``).
    """

    def __init__(self, window: int) -> None:
        self.window = window
        self._docs: deque[list] = deque()  # [position of tokens[0], tokens, tokens already taken]
        self._size = 0

    def __len__(self) -> int:
        """Tokens buffered and not yet taken."""
        return self._size

    def add(self, position: StreamPosition, tokens: np.ndarray) -> None:
        """Buffer one document's tokens; ``position`` is where ``tokens[0]`` sits in the stream."""
        if len(tokens):
            self._docs.append([position, tokens, 0])
            self._size += len(tokens)

    def take(self) -> np.ndarray:
        """The next window, shape ``(window,)``; needs ``len(self) >= window``."""
        assert self._size >= self.window, "take() called on an under-full packer"
        out = np.empty(self.window, dtype=np.int64)
        filled = 0
        while filled < self.window:
            entry = self._docs[0]
            _, tokens, taken = entry
            n = min(self.window - filled, len(tokens) - taken)
            out[filled : filled + n] = tokens[taken : taken + n]
            filled += n
            entry[2] += n
            if entry[2] == len(tokens):
                self._docs.popleft()
        self._size -= self.window
        return out

    def head(self) -> StreamPosition | None:
        """Where the next window starts, or ``None`` when nothing is buffered."""
        if not self._docs:
            return None
        position, _, taken = self._docs[0]
        return position._replace(offset=position.offset + taken)
