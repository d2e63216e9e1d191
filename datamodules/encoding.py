"""Document text to token ids: the tokenizer, EOS after every document, and the optional FIM transform."""

from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer

from datamodules.documents import document_hash
from datamodules.fim import fim_split, psm_tokens


class DocumentEncoder:
    """Tokenize documents for packing.

    Every random choice (FIM or not, where to cut) comes from a generator seeded by ``(seed, epoch, document
    content)``, so a document is encoded the same way whichever rank or worker reads it and however often the
    stream is replayed for a resume.

    Args:
        tokenizer: the tokenizer (special tokens are not added around documents; EOS is appended here).
        eos_id: id appended after every document.
        fim_rate: probability that a document is rearranged for Fill-in-Middle.
        fim_ids: ids of the FIM begin, hole and end tokens; required when ``fim_rate > 0``.
        seed: the run's seed.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        eos_id: int,
        fim_rate: float = 0.0,
        fim_ids: tuple[int, int, int] | None = None,
        seed: int = 0,
    ) -> None:
        if fim_rate > 0 and fim_ids is None:
            raise ValueError(f"fim_rate={fim_rate} needs the FIM special tokens in the tokenizer")
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.fim_rate = fim_rate
        self.fim_ids = fim_ids
        self.seed = seed

    def encode(self, texts: Sequence[str], epoch: int = 0) -> list[np.ndarray]:
        """Token ids of each document, EOS included, as ``int64`` arrays."""
        if self.fim_rate <= 0:
            return [np.asarray([*ids, self.eos_id], dtype=np.int64) for ids in self._ids(texts)]
        pieces, layouts = [], []  # layouts: (is_fim, index of the document's first piece)
        for text in texts:
            rng = np.random.default_rng([self.seed, epoch, int.from_bytes(document_hash(text), "little")])
            is_fim = bool(rng.random() < self.fim_rate)
            layouts.append((is_fim, len(pieces)))
            pieces.extend(fim_split(text, rng) if is_fim else (text,))
        ids = self._ids(pieces)
        out = []
        for is_fim, i in layouts:
            if is_fim:
                prefix, middle, suffix = ids[i : i + 3]
                tokens = psm_tokens(prefix, middle, suffix, self.fim_ids, self.eos_id)
            else:
                tokens = [*ids[i], self.eos_id]
            out.append(np.asarray(tokens, dtype=np.int64))
        return out

    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]
