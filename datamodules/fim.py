"""Fill-in-Middle (FIM) in the prefix-suffix-middle (PSM) layout, as in the DeepSeek-V3 report (section 4.1).

A document chosen with probability ``fim_rate`` (0.1 in the report) is cut at two random character positions into
prefix, middle and suffix and rearranged, at document level before packing, as

    <|fim_begin|> prefix <|fim_hole|> suffix <|fim_end|> middle <|eos|>

so the model learns to fill a hole from both sides while next-token prediction is unchanged (Bavarian et al. 2022,
"Efficient Training of Language Models to Fill in the Middle", whose character-level split this follows).
"""

import numpy as np


def fim_split(text: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """Cut ``text`` at two uniformly drawn character positions.

    Returns:
        ``(prefix, middle, suffix)``, which concatenate back to ``text``; any of them may be empty.
    """
    low, high = sorted(int(i) for i in rng.integers(0, len(text) + 1, size=2))
    return text[:low], text[low:high], text[high:]


def psm_tokens(
    prefix: list[int], middle: list[int], suffix: list[int], fim_ids: tuple[int, int, int], eos_id: int
) -> list[int]:
    """Assemble the PSM sequence from the separately tokenized pieces.

    Args:
        prefix: token ids of the prefix.
        middle: token ids of the middle (the hole's content, predicted last).
        suffix: token ids of the suffix.
        fim_ids: ids of ``<|fim_begin|>``, ``<|fim_hole|>``, ``<|fim_end|>``.
        eos_id: the end-of-document id.
    """
    begin, hole, end = fim_ids
    return [begin, *prefix, hole, *suffix, end, *middle, eos_id]
