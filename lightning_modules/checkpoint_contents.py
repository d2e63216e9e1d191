"""What a dsv3 checkpoint holds beyond Lightning's own keys, and reading or writing it outside the Trainer.

A checkpoint written by ``dsv3 fit`` (``DeepSeekV3LitModule.on_save_checkpoint``) carries, besides Lightning's
``state_dict`` (the network under ``model.``), optimizer and loop state:

- ``model_config``: the resolved ``DeepSeekV3Config`` as a dict (the model can be rebuilt from it alone);
- ``hyper_parameters``: the LitModule's ``preset`` and ``overrides`` (what ``--ckpt_path`` turns into defaults);
- ``tokenizer`` (the ``tokenizers`` JSON) and ``eos_token_id``, so that ``dsv3 generate`` needs nothing else.

``dsv3 generate`` and ``dsv3 convert`` use the functions below; ``checkpoint_from_model`` writes the same layout
from a bare model (e.g. one read from a Hugging Face folder), loadable by validate/test/generate.
"""

from __future__ import annotations

from typing import Any

import lightning
import torch

from models import DeepSeekV3, DeepSeekV3Config
from models.rope import rope_freqs_cis


def tokenizer_json(tokenizer: Any) -> str | None:
    """A ``tokenizers.Tokenizer`` (or a transformers fast tokenizer's backend) as JSON; None otherwise."""
    tokenizer = getattr(tokenizer, "backend_tokenizer", tokenizer)
    return tokenizer.to_str() if hasattr(tokenizer, "to_str") else None


def check_compatible(saved: dict[str, Any] | None, config: DeepSeekV3Config) -> None:
    """Raise a ``ValueError`` naming every shape field where a checkpoint's model differs from ``config``."""
    diff = config.shape_mismatches(saved or {})
    if diff:
        raise ValueError(
            "the checkpoint's model has another shape than the configured one ("
            + "; ".join(diff)
            + "). Use the model config the checkpoint was trained with, or leave model.preset/overrides out of the "
            "config files and flags to take them from the checkpoint."
        )


def model_from_checkpoint(checkpoint: dict[str, Any], device: torch.device | str = "cpu") -> DeepSeekV3:
    """The ``DeepSeekV3`` stored in a checkpoint written by ``dsv3 fit`` (or ``checkpoint_from_model``)."""
    if "model_config" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError("not a dsv3 checkpoint: it lacks 'model_config'/'state_dict' (was it written by dsv3 fit?)")
    config = DeepSeekV3Config.from_dict(checkpoint["model_config"])
    with torch.device("meta"):
        model = DeepSeekV3(config)
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    model.to_empty(device=device)
    model.load_state_dict(state)
    # Non-persistent buffers are not in the checkpoint: the RoPE table and the (zeroed) load counters.
    model.freqs_cis = rope_freqs_cis(config, torch.device(device))
    for moe in model.moe_layers():
        moe.tokens_per_expert.zero_()
    return model


def tokenizer_from_checkpoint(checkpoint: dict[str, Any]) -> tuple[Any, int | None]:
    """(``tokenizers.Tokenizer``, EOS id) saved in a checkpoint."""
    if "tokenizer" not in checkpoint:
        raise ValueError(
            "this checkpoint carries no tokenizer: it was written without a datamodule, or converted from a Hugging "
            "Face folder without tokenizer.json"
        )
    from tokenizers import Tokenizer

    return Tokenizer.from_str(checkpoint["tokenizer"]), checkpoint.get("eos_token_id")


def checkpoint_from_model(model: DeepSeekV3, tokenizer: Any = None, eos_token_id: int | None = None) -> dict[str, Any]:
    """A Lightning checkpoint holding ``model`` (weights and config, no optimizer) and optionally its tokenizer.

    The hyperparameters name the preset closest to the model's config plus the fields that differ
    (``DeepSeekV3Config.closest_preset``), as ``dsv3 fit`` would have written them; ``vocab_size`` stays out of the
    overrides, as in a fit checkpoint, since the data supply it.
    """
    config = model.config.to_dict()
    preset, overrides = model.config.closest_preset()
    overrides.pop("vocab_size", None)
    checkpoint = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {"preset": preset, "overrides": overrides, "model_config": config},
        "model_config": config,
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
    }
    text = tokenizer_json(tokenizer)
    if text is not None:
        checkpoint["tokenizer"], checkpoint["eos_token_id"] = text, eos_token_id
    return checkpoint
