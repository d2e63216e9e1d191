"""Tokenizers: a local ``tokenizer.json`` or Hub id, or a byte-level BPE trained once on the bundled corpus.

The special tokens the data pipeline needs are resolved here: EOS (appended after every document) and the three
Fill-in-Middle tokens (``<|fim_begin|>``, ``<|fim_hole|>``, ``<|fim_end|>``; DeepSeek's own tokenizer spells them
``<｜fim▁begin｜>`` and so on, and both spellings are recognised).
"""

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
FIM_TOKENS = ("<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>")
SPECIAL_TOKENS = (EOS_TOKEN, *FIM_TOKENS)
# Spellings in published tokenizers, tried in order when no eos_token is given.
_EOS_CANDIDATES = (EOS_TOKEN, "<｜end▁of▁sentence｜>", "<|end_of_text|>", "</s>", "<eos>")
_FIM_ALIASES = {
    "<|fim_begin|>": ("<|fim_begin|>", "<｜fim▁begin｜>", "<|fim_prefix|>", "<fim_prefix>"),
    "<|fim_hole|>": ("<|fim_hole|>", "<｜fim▁hole｜>", "<|fim_suffix|>", "<fim_suffix>"),
    "<|fim_end|>": ("<|fim_end|>", "<｜fim▁end｜>", "<|fim_middle|>", "<fim_middle>"),
}
_CACHE_FORMAT = "bpe-v1"  # bump when train_bpe changes, so stale cached tokenizers are not reused


def cache_dir() -> Path:
    """Where trained tokenizers are cached: ``$DSV3_CACHE_DIR``, else ``$XDG_CACHE_HOME/dsv3`` or ``~/.cache/dsv3``."""
    if os.environ.get("DSV3_CACHE_DIR"):
        return Path(os.environ["DSV3_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dsv3"


def train_bpe(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenization) with the pipeline's special tokens first.

    Args:
        texts: the training documents.
        vocab_size: the target size including the 256 byte symbols and the special tokens.

    Returns:
        The trained tokenizer; ``get_vocab_size()`` can be below ``vocab_size`` on a small corpus.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def cached_bpe(files: Sequence[Path], vocab_size: int, name: str = "corpus") -> Tokenizer:
    """A byte-level BPE trained on ``files``, trained on first use and then read from the cache.

    The cache key hashes the files' names and bytes and the vocabulary size. The file is published with a hard link
    from a temporary file, so concurrent ranks never see a partial file and the first finished writer wins (every
    process then loads that same file).

    Args:
        files: the training texts (decoded as UTF-8, undecodable bytes replaced).
        vocab_size: the target vocabulary size.
        name: a readable prefix for the cache file.

    Returns:
        The tokenizer loaded from the cache file.
    """
    digest = hashlib.sha256(f"{_CACHE_FORMAT}|{vocab_size}|{SPECIAL_TOKENS}".encode())
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    target = cache_dir() / f"{name}-bpe{vocab_size}-{digest.hexdigest()[:16]}.json"
    if not target.exists():
        log.info("Training a %d-token byte-level BPE on %d files (cached at %s)", vocab_size, len(files), target)
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
        _publish(train_bpe(texts, vocab_size).to_str(), target)
    return Tokenizer.from_file(str(target))


def _publish(text: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is for every user of the machine
        try:
            os.link(tmp, target)
        except FileExistsError:
            pass  # another process published first; its file is identical in content and is the one we load
        except OSError:
            os.replace(tmp, target)  # filesystems without hard links: atomic rename, last writer wins
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_tokenizer(spec: str) -> Tokenizer:
    """Load a tokenizer from a ``tokenizer.json`` file, a directory holding one, or a Hub repository id.

    Raises:
        ValueError: ``spec`` is none of these (or the Hub cannot be reached).
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    try:
        return Tokenizer.from_pretrained(spec)
    except Exception as err:  # the tokenizers/hub errors are varied; the user needs one clear message
        raise ValueError(
            f"tokenizer={spec!r} is neither a tokenizer.json file, a directory holding one, nor a Hub repository "
            f"with a tokenizer.json that could be fetched ({type(err).__name__}: {err}). Pass a local path, a Hub id "
            "such as 'deepseek-ai/DeepSeek-V3' (online, or cached with HF_HUB_OFFLINE=1), or leave it unset for the "
            "default BPE."
        ) from err


def save_pretrained(
    tokenizer: Tokenizer, folder: str | os.PathLike, eos_token_id: int | None, model_max_length: int | None = None
) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``folder``, as a Hugging Face model folder has them.

    ``transformers.AutoTokenizer.from_pretrained(folder)`` then loads it as a ``PreTrainedTokenizerFast`` with the
    EOS token (also its BOS: documents are separated by EOS, and generation from nothing starts with it) and the
    FIM tokens as special tokens; ``load_tokenizer(folder)`` and ``eos_token_id(tokenizer, folder, None)`` read
    them back.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    eos = tokenizer.id_to_token(eos_token_id) if eos_token_id is not None else None
    fim = [t for t in FIM_TOKENS if tokenizer.token_to_id(t) is not None]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        "bos_token": eos,
        "additional_special_tokens": fim,
        "clean_up_tokenization_spaces": False,
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def eos_token_id(tokenizer: Tokenizer, spec: str | None, eos_token: str | None) -> int:
    """The id of the end-of-document token.

    Args:
        tokenizer: the loaded tokenizer.
        spec: what the tokenizer was loaded from (its ``tokenizer_config.json`` is read for ``eos_token``).
        eos_token: an explicit token string, which wins.

    Raises:
        ValueError: no EOS token can be found.
    """
    candidates = [eos_token] if eos_token else [*_config_eos(spec), *_EOS_CANDIDATES]
    for token in candidates:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise ValueError(
        f"eos_token={eos_token!r}: no end-of-document token found in the tokenizer (tried {candidates}); pass "
        "--data.eos_token with the token your tokenizer uses."
    )


def _config_eos(spec: str | None) -> list[str]:
    """``eos_token`` from the ``tokenizer_config.json`` beside a local tokenizer or in its Hub repository."""
    if spec is None:
        return []
    path = Path(spec).expanduser()
    config = (path if path.is_dir() else path.parent) / "tokenizer_config.json"
    if not path.exists():
        try:
            from huggingface_hub import hf_hub_download

            config = Path(hf_hub_download(spec, "tokenizer_config.json"))
        except Exception:  # offline or no such file: fall back to the known spellings
            return []
    if not config.is_file():
        return []
    eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    return [eos] if isinstance(eos, str) else []


def fim_token_ids(tokenizer: Tokenizer, add_missing: bool) -> tuple[int, int, int] | None:
    """Ids of the FIM begin, hole and end tokens, under any known spelling.

    Args:
        tokenizer: the tokenizer; changed in place when tokens are added.
        add_missing: add the canonical tokens as special tokens when the tokenizer lacks them (this grows the
            vocabulary, which the model picks up through ``PretrainDataModule.vocab_size``).

    Returns:
        ``(begin, hole, end)``, or ``None`` when they are missing and ``add_missing`` is false.
    """
    ids = [_first_id(tokenizer, _FIM_ALIASES[token]) for token in FIM_TOKENS]
    if all(i is not None for i in ids):
        return ids[0], ids[1], ids[2]
    if not add_missing:
        return None
    missing = [token for token, i in zip(FIM_TOKENS, ids, strict=True) if i is None]
    log.warning("The tokenizer has no %s; adding them as special tokens (the vocabulary grows).", missing)
    tokenizer.add_special_tokens(missing)
    return tuple(_first_id(tokenizer, _FIM_ALIASES[token]) for token in FIM_TOKENS)


def _first_id(tokenizer: Tokenizer, spellings: Sequence[str]) -> int | None:
    for token in spellings:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return None
