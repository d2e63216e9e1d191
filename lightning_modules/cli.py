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
import sys
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_modules.checkpoint_io import AtomicCheckpointIO
from lightning_modules.config_include import PARSER_MODE, expand_config_args
from lightning_modules.module import (
    DeepSeekV3LitModule,
    checkpoint_from_model,
    model_from_checkpoint,
    tokenizer_from_checkpoint,
)

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

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or ckpt_path in _SPECIAL_CKPT or str(ckpt_path).startswith("registry"):
            return
        if not Path(ckpt_path).is_file():
            raise UserError(
                f"--ckpt_path {ckpt_path}: no such file. Give a .ckpt file, or 'last' to resume from the newest "
                "checkpoint of the configured ModelCheckpoint directory"
            )
        hparams = _read_checkpoint(ckpt_path).get("hyper_parameters", {})
        saved = {k: hparams[k] for k in ("preset", "overrides", "init_from") if k in hparams}
        if not saved:
            return
        # The checkpoint's model becomes the default; config files and flags parsed on top of it win.
        self._subcommand_parsers[subcommand].set_defaults({f"model.{k}": v for k, v in saved.items()})
        self.parse_arguments(self.parser, self._raw_args)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


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
        if _is_model_checkpoint(getattr(callback, "class_path", "")) and init_args.get("dirpath") is None:
            init_args.dirpath = os.path.join(save_dir, name, "checkpoints")


def _is_model_checkpoint(class_path: str) -> bool:
    module, _, name = class_path.rpartition(".")  # a parsed class_path is a full import path
    try:
        return issubclass(getattr(importlib.import_module(module), name), ModelCheckpoint)
    except (ImportError, AttributeError, TypeError, ValueError):
        return False


def _read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # a truncated or foreign file
        raise UserError(f"cannot read checkpoint {path}: {err}") from err


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
    ckpt = _read_checkpoint(_existing(args.ckpt_path, "--ckpt_path"))
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
        description="Convert between a Lightning checkpoint and a Hugging Face folder (config.json + safetensors).",
        epilog="examples:\n  dsv3 convert --ckpt_path runs/tiny/checkpoints/last.ckpt --to_hf hf_tiny/\n"
        "  dsv3 convert --hf_path hf_tiny/ --to_ckpt tiny_from_hf.ckpt",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt_path", help="Lightning .ckpt to export")
    src.add_argument("--hf_path", help="HF checkpoint folder to import")
    p.add_argument("--to_hf", help="output folder (with --ckpt_path)")
    p.add_argument("--to_ckpt", help="output .ckpt (with --hf_path); loadable by validate/test/generate")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="cast weights (default: keep)")
    return p


def convert_main(argv: list[str]) -> int:
    """``dsv3 convert``: Lightning checkpoint <-> HF folder."""
    from models import load_hf_checkpoint, save_hf_checkpoint

    parser = _convert_parser()
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.ckpt_path:
        if not args.to_hf:
            parser.error("--ckpt_path needs --to_hf OUT_DIR")
        model = model_from_checkpoint(_read_checkpoint(_existing(args.ckpt_path, "--ckpt_path")))
        save_hf_checkpoint(model, args.to_hf, dtype=dtype)
        print(f"wrote {args.to_hf}")
    else:
        if not args.to_ckpt:
            parser.error("--hf_path needs --to_ckpt OUT.ckpt")
        model = load_hf_checkpoint(_existing(args.hf_path, "--hf_path"), dtype=dtype)
        AtomicCheckpointIO().save_checkpoint(checkpoint_from_model(model), args.to_ckpt)
        print(f"wrote {args.to_ckpt}")
    return 0


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
    except (UserError, ValueError, FileNotFoundError) as err:
        if os.environ.get("DSV3_TRACEBACK"):
            raise
        print(f"dsv3 {argv[0]}: error: {err}\n(set DSV3_TRACEBACK=1 for the full traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
