"""The ``dsv3`` command: LightningCLI for fit/validate/test, plus generate, convert and sweep.

::

    dsv3 fit --config configs/tiny.yaml                      # train (Ctrl-C safe: resume with --ckpt_path last)
    dsv3 fit --config configs/tiny.yaml --ckpt_path last     # resume: weights, optimizer, biases, data position
    dsv3 generate --ckpt_path runs/tiny/checkpoints/last.ckpt --prompt "ROMEO:"
    dsv3 convert --ckpt_path last.ckpt --to_hf hf_out/       # Lightning checkpoint -> HF folder (and back)
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from lightning_modules.checkpoint_contents import (
    checkpoint_from_model,
    model_from_checkpoint,
    tokenizer_from_checkpoint,
)
from lightning_modules.checkpoint_io import (
    AtomicCheckpointIO,
    CheckpointError,
    CheckpointWriteError,
    check_writable_dir,
)
from lightning_modules.config_include import PARSER_MODE, expand_config_args
from lightning_modules.module import DeepSeekV3LitModule
from lightning_modules.nonfinite import NonFiniteError
from lightning_modules.pipelining import check_pipeline
from lightning_modules.strategy import DeepSeekV3Strategy, is_sharded_checkpoint, read_any_checkpoint
from models.parallel.mixed_precision import cast_parameters

OVERVIEW = """\
usage: dsv3 {fit,validate,test,generate,convert,sweep} [options]

DeepSeek-V3-style MoE pretraining on PyTorch Lightning.

commands:
  fit         train a model:        dsv3 fit --config configs/tiny.yaml [--trainer.max_steps 500] [--ckpt_path last]
  validate    validation loss:      dsv3 validate --config configs/tiny.yaml --ckpt_path runs/tiny/checkpoints/last.ckpt
  test        test loss:            dsv3 test --config configs/tiny.yaml --ckpt_path ...
  generate    sample text:          dsv3 generate --ckpt_path ... --prompt "ROMEO:" [--max_new_tokens 64]
  convert     checkpoint formats:   dsv3 convert --ckpt_path X.ckpt --to_hf DIR | --hf_path DIR --to_ckpt X.ckpt
  sweep       hyperparameter sweep: dsv3 sweep --help

Each command has --help; fit/validate/test also take --print_config to show the full resolved config.
Configs compose: a config's include: [base/...] files first, --config a.yaml --config b.yaml (last wins), then
flags like --model.overrides.hidden_size 256.
"""

# Checkpoint names Lightning resolves itself (not files).
_SPECIAL_CKPT = ("last", "best", "hpc")


class UserError(Exception):
    """A mistake in the command line or the files it names: reported as one line, no traceback."""


def _default_datamodule() -> type:
    from datamodules import PretrainDataModule

    return PretrainDataModule


class DSV3CLI(LightningCLI):
    """LightningCLI with the DeepSeek-V3 module, the pretraining datamodule and linked hyperparameters.

    * ``data.vocab_size`` and ``data.seq_len`` feed ``model.vocab_size``/``model.seq_len`` (set them once).
    * A config file's ``include: [...]`` files are read before it (``lightning_modules.config_include``).
    * A ``ModelCheckpoint`` without ``dirpath`` writes to ``<save_dir>/<name>/checkpoints`` of the logger, the same
      folder for every version, so that ``--ckpt_path last`` finds it from a new run.
    * ``validate``/``test`` log into ``<save_dir>/<name>/validate`` (``/test``), not a new ``version_N`` each time.
    * ``--ckpt_path FILE``: the checkpoint's model hyperparameters become defaults, and what the command line
      and config files say still wins (plain LightningCLI lets the checkpoint override explicit flags).
    * Checkpoints are written atomically (``AtomicCheckpointIO``) unless a config picks another CheckpointIO.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", DeepSeekV3LitModule)
        if "datamodule_class" not in kwargs:
            kwargs["datamodule_class"] = _default_datamodule()
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # Hyperparameters are the module's own init args (with linked values), not the raw parsed config.
        kwargs.setdefault("load_from_checkpoint_support", False)
        kwargs.setdefault("parser_kwargs", {"default_env": False, "parser_mode": PARSER_MODE})
        # The optimizer and schedule live under model: (injected callables), not as top-level keys too.
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("fit", "validate", "test")}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.seq_len", "model.seq_len", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if isinstance(args, (dict, Namespace)):
            self._raw_args = args
            super().parse_arguments(parser, args)
            return
        # The command line with each config's include files spelled out as --config flags before it.
        self._raw_args = expand_config_args(sys.argv[1:] if args is None else args)
        self.config = parser.parse_args(self._raw_args)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        default_checkpoint_dirpath(config.get("trainer"))
        if self.subcommand in ("validate", "test"):
            _log_evaluation_into(config.get("trainer"), self.subcommand)

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if ckpt_path == "last":  # the file Lightning will resume from, so that its model is the default here too
            ckpt_path = last_checkpoint(self.config[subcommand].get("trainer"))
        if not ckpt_path or ckpt_path in _SPECIAL_CKPT or str(ckpt_path).startswith("registry"):
            return
        if not Path(ckpt_path).is_file() and not is_sharded_checkpoint(ckpt_path):
            raise UserError(
                f"--ckpt_path {ckpt_path}: no such file. Give a .ckpt file (or a sharded .ckpt directory), or 'last' "
                "to resume from the newest checkpoint of the configured ModelCheckpoint directory"
            )
        hparams = read_any_checkpoint(ckpt_path, weights=False).get("hyper_parameters", {})
        saved = {k: hparams[k] for k in ("preset", "overrides", "init_from") if k in hparams}
        if not saved:
            return
        # The checkpoint's model becomes the default; config files and flags parsed on top of it win.
        self._subcommand_parsers[subcommand].set_defaults({f"model.{k}": v for k, v in saved.items()})
        self.parse_arguments(self.parser, self._raw_args)

    def _check_layout(self) -> None:
        """Check the parallel layout against the model (the pipeline against the batch too), and the checkpoint's
        kind, before any process starts."""
        strategy = self.trainer.strategy
        if isinstance(strategy, DeepSeekV3Strategy):
            strategy.check_model(self.model.config)
            batch_size = getattr(self.datamodule, "batch_size", None)
            dims, dtype = strategy.parallel_dims, strategy.param_dtype
            check_pipeline(self.model.config, self.model.pipeline, dims.pp, batch_size, dtype)
            return
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path and is_sharded_checkpoint(ckpt_path):
            raise UserError(
                f"--ckpt_path {ckpt_path} is a sharded checkpoint: load it with --trainer.strategy "
                "lightning_modules.strategy.DeepSeekV3Strategy (on any number of devices), or make it one file with "
                f"dsv3 convert --ckpt_path {ckpt_path} --to_ckpt OUT.ckpt"
            )

    before_validate = before_test = _check_layout

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def before_fit(self) -> None:
        """Fail now, not at the first save or validation 50 steps in, on what Lightning checks only then."""
        self._check_layout()
        for callback in self.trainer.checkpoint_callbacks:
            if getattr(callback, "dirpath", None) is not None:
                check_writable_dir(callback.dirpath, "trainer.callbacks.init_args.dirpath")
        interval = self.trainer.val_check_interval
        if isinstance(interval, int) and interval < 1:
            raise UserError(
                f"--trainer.val_check_interval={interval}: give a number of training batches >= 1 (the training "
                "stream is endless, so not a fraction of an epoch)"
            )


def default_checkpoint_dirpath(trainer: Any) -> None:
    """Give each ``ModelCheckpoint`` of a parsed trainer config that has no ``dirpath`` the logger's
    ``<save_dir>/<name>/checkpoints``, one folder for all versions (Lightning's default is inside ``version_N``)."""
    logger = trainer.get("logger") if trainer else None
    init = getattr(logger, "init_args", None)
    save_dir, name = getattr(init, "save_dir", None), getattr(init, "name", None)
    if save_dir is None or name is None:
        return
    for callback in trainer.get("callbacks") or []:
        init_args = getattr(callback, "init_args", None)
        if is_model_checkpoint(getattr(callback, "class_path", "")) and init_args.get("dirpath") is None:
            init_args.dirpath = os.path.join(save_dir, name, "checkpoints")


def _log_evaluation_into(trainer: Any, version: str) -> None:
    """``dsv3 validate``/``test`` log into ``<save_dir>/<name>/validate`` (``test``) rather than a new ``version_N``
    each time: one folder whose points sit at the steps of the checkpoints evaluated (the LitModule logs them at the
    checkpoint's ``global_step``). An explicit version stays."""
    init = getattr(trainer.get("logger") if trainer else None, "init_args", None)
    if init is not None and "version" in init and init.version is None:
        init.version = version


def last_checkpoint(trainer: Any) -> str | None:
    """What ``--ckpt_path last`` loads (Lightning's rule): the newest ``last*.ckpt`` of the checkpoint directories."""
    default_checkpoint_dirpath(trainer)
    dirs = [
        callback.init_args.dirpath
        for callback in (trainer.get("callbacks") if trainer else None) or []
        if is_model_checkpoint(getattr(callback, "class_path", "")) and callback.init_args.get("dirpath")
    ]
    found = [p for d in dirs for p in Path(d).glob("last*.ckpt")]
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None


def is_model_checkpoint(class_path: str) -> bool:
    """Whether a config's ``class_path`` names ``ModelCheckpoint`` or a subclass (an unimportable path: no)."""
    module, _, name = class_path.rpartition(".")  # a parsed class_path is a full import path
    try:
        return issubclass(getattr(importlib.import_module(module), name), ModelCheckpoint)
    except (ImportError, AttributeError, TypeError, ValueError):
        return False


# ---------------------------------------------------------------------- generate
def _generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv3 generate", description="Sample text from a trained checkpoint.")
    p.add_argument("--ckpt_path", required=True, help="Lightning .ckpt written by dsv3 fit")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for several); default: the EOS token")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def generate_main(argv: list[str]) -> int:
    """``dsv3 generate``: load a checkpoint (model + its tokenizer) and print one sample per prompt."""
    from models.generate import generate

    args = _generate_parser().parse_args(argv)
    _check_device(args.device)
    ckpt = read_any_checkpoint(_existing(args.ckpt_path, "--ckpt_path"))
    model = model_from_checkpoint(ckpt, device=args.device).eval()
    tokenizer, eos_id = tokenizer_from_checkpoint(ckpt)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    for prompt in args.prompt or [""]:
        ids = tokenizer.encode(prompt).ids if prompt else [eos_id]
        prompt_ids = torch.tensor([ids], device=args.device)
        out = generate(
            model,
            prompt_ids,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            eos_token_id=eos_id,
            generator=generator,
        )
        print(prompt + tokenizer.decode(out[0, len(ids) :].tolist()))
        print("-" * 40)
    return 0


# ---------------------------------------------------------------------- convert
def _convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsv3 convert",
        description="Convert between a Lightning checkpoint and a Hugging Face folder (config.json + safetensors), "
        "or a sharded checkpoint directory (DeepSeekV3Strategy) into a single-file one.",
        epilog="examples:\n  dsv3 convert --ckpt_path runs/tiny/checkpoints/last.ckpt --to_hf hf_tiny/\n"
        "  dsv3 convert --hf_path hf_tiny/ --to_ckpt tiny_from_hf.ckpt\n"
        "  dsv3 convert --ckpt_path runs/tiny-fsdp-ep/checkpoints/last.ckpt --to_ckpt tiny.ckpt  # sharded -> file",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt_path", help="Lightning .ckpt to export (a file, or a sharded checkpoint directory)")
    src.add_argument("--hf_path", help="HF checkpoint folder to import")
    p.add_argument("--to_hf", help="output folder (with --ckpt_path)")
    p.add_argument(
        "--to_ckpt",
        help="output .ckpt, loadable by validate/test/generate (with --hf_path, or with --ckpt_path of a sharded "
        "checkpoint: its weights and metadata, no optimizer state)",
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="cast weights (default: keep)")
    return p


def convert_main(argv: list[str]) -> int:
    """``dsv3 convert``: Lightning checkpoint <-> HF folder, with the tokenizer when there is one."""
    from models import load_hf_checkpoint

    parser = _convert_parser()
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.ckpt_path:
        _convert_checkpoint(parser, args, dtype)
    else:
        if not args.to_ckpt:
            parser.error("--hf_path needs --to_ckpt OUT.ckpt")
        model = load_hf_checkpoint(_existing(args.hf_path, "--hf_path"), dtype=dtype)
        tokenizer, eos_id = _hf_tokenizer(args.hf_path)
        AtomicCheckpointIO().save_checkpoint(checkpoint_from_model(model, tokenizer, eos_id), args.to_ckpt)
        print(f"wrote {args.to_ckpt}" + ("" if tokenizer else " (the folder has no tokenizer.json: none saved)"))
    return 0


def _convert_checkpoint(parser: argparse.ArgumentParser, args: argparse.Namespace, dtype: torch.dtype | None) -> None:
    """``--ckpt_path``: to an HF folder (``--to_hf``) and, for a sharded checkpoint, to one file (``--to_ckpt``)."""
    if not args.to_hf and not args.to_ckpt:
        parser.error("--ckpt_path needs --to_hf OUT_DIR or, for a sharded checkpoint, --to_ckpt OUT.ckpt")
    if args.to_ckpt and not is_sharded_checkpoint(args.ckpt_path):
        parser.error("--ckpt_path FILE --to_ckpt: the checkpoint is already a single file")
    checkpoint = read_any_checkpoint(_existing(args.ckpt_path, "--ckpt_path"))
    model = model_from_checkpoint(checkpoint)
    if args.to_ckpt:  # the sharded checkpoint's metadata with the full weights, as one file
        if dtype is not None:
            cast_parameters(model, dtype)
        state = {f"model.{k}": v for k, v in model.state_dict().items()}
        AtomicCheckpointIO().save_checkpoint({**checkpoint, "state_dict": state}, args.to_ckpt)
        print(f"wrote {args.to_ckpt}")
    if args.to_hf:
        _model_to_hf(model, checkpoint, args.to_hf, dtype)
        print(f"wrote {args.to_hf}")


def _model_to_hf(model: Any, checkpoint: dict[str, Any], folder: str, dtype: torch.dtype | None) -> None:
    """Weights and config.json, then tokenizer.json + tokenizer_config.json when the checkpoint carries a tokenizer
    (with config.json's eos/bos ids set to the tokenizer's EOS)."""
    from datamodules.tokenizer import save_pretrained
    from models import save_hf_checkpoint

    if "tokenizer" not in checkpoint:
        save_hf_checkpoint(model, folder, dtype=dtype)
        return
    tokenizer, eos_id = tokenizer_from_checkpoint(checkpoint)
    ids = {} if eos_id is None else {"eos_token_id": eos_id, "bos_token_id": eos_id}
    save_hf_checkpoint(model, folder, dtype=dtype, token_ids=ids)
    save_pretrained(tokenizer, folder, eos_id, model_max_length=model.config.max_position_embeddings)


def _hf_tokenizer(folder: str) -> tuple[Any, int | None]:
    """(tokenizer, EOS id) of an HF folder's tokenizer.json and tokenizer_config.json; (None, None) without one."""
    from datamodules.tokenizer import eos_token_id, load_tokenizer

    if not (Path(folder) / "tokenizer.json").is_file():
        return None, None
    tokenizer = load_tokenizer(folder)
    return tokenizer, eos_token_id(tokenizer, folder, None)


def _check_device(device: str) -> None:
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:  # "Torch not compiled with CUDA enabled", no such device
        raise UserError(f"--device {device}: not usable here ({err}); use --device cpu") from err


def _existing(path: str, flag: str) -> str:
    if not Path(path).exists():
        raise UserError(f"{flag} {path}: no such file or folder")
    return path


# ---------------------------------------------------------------------- entry point
def sweep_main(argv: list[str]) -> int:
    try:
        import sweeps
    except ImportError as err:
        raise UserError(
            f"the sweep tool is unavailable ({err}); install the extra with pip install -e '.[sweep]'"
        ) from err
    return sweeps.main(argv)


COMMANDS = {"generate": generate_main, "convert": convert_main, "sweep": sweep_main}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dsv3`` console script; returns the exit status."""
    cli_args = None if argv is None else list(argv)  # None: LightningCLI reads sys.argv itself
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(OVERVIEW)
        return 0
    try:
        if argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
        DSV3CLI(args=cli_args)
    except SIGTERMException as stop:  # callbacks.Preemption saved the step; non-zero so a scheduler requeues
        print(
            f"dsv3 {argv[0]}: {str(stop) or 'stopped by SIGTERM without a checkpoint (no callbacks.Preemption)'}",
            file=sys.stderr,
        )
        return stop.code or 128 + signal.SIGTERM
    except (
        NonFiniteError,
        CheckpointError,
        UserError,
        ValueError,
        FileNotFoundError,
        MisconfigurationException,
    ) as err:
        if os.environ.get("DSV3_TRACEBACK"):
            raise
        print(f"dsv3 {argv[0]}: error: {err}\n(set DSV3_TRACEBACK=1 for the full traceback)", file=sys.stderr)
        # 1: the run failed (it diverged, the disk filled up); 2: the command line or a file it names is wrong.
        return 1 if isinstance(err, NonFiniteError | CheckpointWriteError) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
