"""Hugging Face checkpoint interop: load DeepSeek-V3 checkpoints (DeepSeek's release, transformers 5.x) and export.

On disk (both DeepSeek's release and what transformers 5.x ``save_pretrained`` writes) the names are
``model.layers.{i}.self_attn.*``, ``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`` (one tensor per
expert), ``model.layers.{i}.mlp.gate.e_score_correction_bias``, ``lm_head.weight``; DeepSeek's release adds the
MTP module(s) as ``model.layers.{L+k}`` (a full decoder layer plus ``enorm``, ``hnorm``, ``eh_proj``,
``shared_head.norm``, and copies of the embedding and output head). Fused experts (``mlp.experts.gate_up_proj``
(E, 2F, D), ``mlp.experts.down_proj`` (E, D, F), transformers' in-memory layout) are read too.

Loading builds the model on the meta device, checks every tensor name and shape from the safetensors headers
before reading any data, then allocates the model once and copies tensors in shard by shard, so peak memory is
the model plus one tensor. FP8 weights with 128x128 block scales (``weight_scale_inv``) are dequantised.

Shapes: E routed experts, F expert hidden dim, D model dim, V vocabulary, H heads, N qk_nope_head_dim,
R qk_rope_head_dim, C kv_lora_rank.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.config import DeepSeekV3Config
from models.model import DeepSeekV3
from models.rope import rope_freqs_cis

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Our block-relative names -> HF's (the same inside main layers and MTP blocks).
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.e_score_correction_bias": "mlp.gate.e_score_correction_bias",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
}
_EXPERT_PROJ = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_MTP_NAMES = {
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "norm.weight": "shared_head.norm.weight",
}
_TOP_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
# Tensors that some checkpoints carry and that hold nothing we need.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_ROPE_ROWS = ("self_attn.q_proj.weight", "self_attn.q_b_proj.weight", "self_attn.kv_a_proj_with_mqa.weight")


# Our config fields that config.json holds inside rope_parameters.
_ROPE_FIELDS = {
    "rope_theta",
    "rope_factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
}


# ====================================================================== config
def config_from_hf(hf: dict[str, Any], **overrides: Any) -> DeepSeekV3Config:
    """Our config from a ``config.json`` dict, DeepSeek's release format (``rope_scaling``) or transformers 5.x's.

    Args:
        hf: The parsed ``config.json``.
        **overrides: DeepSeekV3Config fields to set on top (e.g. ``mtp_loss_weight=0.1``).

    Raises:
        ValueError: For model types or options this model does not implement.
    """
    if hf.get("model_type", "deepseek_v3") != "deepseek_v3":
        raise ValueError(f"config.json model_type is {hf.get('model_type')!r}; only 'deepseek_v3' is supported")
    _check_supported(hf)
    names = [f for f in DeepSeekV3Config.__dataclass_fields__ if DeepSeekV3Config.__dataclass_fields__[f].init]
    values = {k: hf[k] for k in names if k in hf and (hf[k] is not None or k == "q_lora_rank")}
    for key in ("n_group", "topk_group"):  # transformers allows None for "no groups"
        if key in hf and hf[key] is None:
            values[key] = 1
    values.update(_rope_from_hf(hf))
    # Training knobs come from our own keys only: DeepSeek's aux_loss_alpha (0.001) and initializer_range (0.02)
    # are leftovers of their HF code, not the report's 1e-4 and 0.006.
    values.update(overrides)
    return DeepSeekV3Config(**values)


def _check_supported(hf: dict[str, Any]) -> None:
    unsupported = {
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "attention_bias": (hf.get("attention_bias", False), False),
        "moe_layer_freq": (hf.get("moe_layer_freq", 1), 1),
        "topk_method": (hf.get("topk_method", "noaux_tc"), "noaux_tc"),
    }
    for key, (got, want) in unsupported.items():
        if got != want:
            raise ValueError(f"config.json {key}={got!r} is not supported by this model (needs {want!r})")


def _rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """Map ``rope_parameters`` (transformers 5.x) or ``rope_scaling`` + ``rope_theta`` (DeepSeek) to our fields."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    out: dict[str, Any] = {"rope_theta": rope.get("rope_theta", hf.get("rope_theta", 10000.0)), "rope_factor": 1.0}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return out
    if rope_type != "yarn":
        raise ValueError(f"rope type {rope_type!r} in config.json is not supported; use 'yarn' or 'default'")
    if not rope.get("truncate", True) or rope.get("attention_factor") is not None:
        raise ValueError("YaRN 'truncate': false and an explicit 'attention_factor' are not supported")
    original = rope.get("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    if original is None:
        raise ValueError("YaRN rope parameters need original_max_position_embeddings")
    factor = rope.get("factor") or hf["max_position_embeddings"] / original
    out.update(rope_factor=float(factor), original_max_position_embeddings=int(original))
    out.update(beta_fast=rope.get("beta_fast") or 32.0, beta_slow=rope.get("beta_slow") or 1.0)
    # Absent mscale keys mean 0 in transformers: cos/sin scaled by get_mscale(factor), softmax scale untouched.
    out.update(mscale=rope.get("mscale") or 0.0, mscale_all_dim=rope.get("mscale_all_dim") or 0.0)
    return out


def config_to_hf(config: DeepSeekV3Config, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A ``config.json`` dict in transformers 5.x's ``DeepseekV3Config`` format (plus DeepSeek's routing keys)."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.use_yarn:
        rope.update(
            rope_type="yarn",
            factor=config.rope_factor,
            original_max_position_embeddings=config.original_max_position_embeddings,
            beta_fast=config.beta_fast,
            beta_slow=config.beta_slow,
            mscale=config.mscale,
            mscale_all_dim=config.mscale_all_dim,
        )
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        # Every other field under its own name: transformers keeps unknown keys, so training knobs round-trip.
        **{k: v for k, v in config.to_dict().items() if k not in _ROPE_FIELDS},
        # MLA has no grouped KV heads; transformers' default (128) would break eager attention at other head counts.
        "num_key_value_heads": config.num_attention_heads,
        "rope_parameters": rope,
        "rope_interleave": True,
        "hidden_act": "silu",
        "attention_bias": False,
        "topk_method": "noaux_tc",
        "initializer_range": config.init_std,
        "dtype": str(dtype).removeprefix("torch."),
    }


# ====================================================================== names
@dataclass
class _Slot:
    """One tensor on the HF side and where it lives in our model.

    ``expert`` indexes the stacked (E, ...) parameter; ``shared`` marks DeepSeek's MTP copies of the embedding
    and head (and a tied ``lm_head``), which are compared with ours, never loaded.
    """

    ours: str
    shape: tuple[int, ...]
    expert: int | None = None
    shared: bool = False


def _block_slots(prefix: str, ours_prefix: str, rest: str, shape: torch.Size) -> dict[str, _Slot]:
    expert = re.fullmatch(r"ffn\.experts\.(w[123])", rest)
    if expert:
        proj = _EXPERT_PROJ[expert.group(1)]
        return {
            f"{prefix}mlp.experts.{e}.{proj}.weight": _Slot(ours_prefix + rest, tuple(shape[1:]), expert=e)
            for e in range(shape[0])
        }
    return {prefix + _BLOCK_NAMES[rest]: _Slot(ours_prefix + rest, tuple(shape))}


def hf_slots(model: DeepSeekV3) -> dict[str, _Slot]:
    """Every HF tensor name of ``model`` (per-expert layout, MTP as layers L+k), mapped to our tensors."""
    config = model.config
    slots: dict[str, _Slot] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        shape = tensor.shape
        if name in _TOP_NAMES:
            slots[_TOP_NAMES[name]] = _Slot(name, tuple(shape))
        elif name == "head.weight":
            slots["lm_head.weight"] = _Slot(name, tuple(shape), shared=config.tie_word_embeddings)
        elif m := re.fullmatch(r"layers\.(\d+)\.(.+)", name):
            slots.update(_block_slots(f"model.layers.{m.group(1)}.", f"layers.{m.group(1)}.", m.group(2), shape))
        elif m := re.fullmatch(r"mtp\.(\d+)\.block\.(.+)", name):
            layer = config.num_hidden_layers + int(m.group(1))
            slots.update(_block_slots(f"model.layers.{layer}.", f"mtp.{m.group(1)}.block.", m.group(2), shape))
        elif m := re.fullmatch(r"mtp\.(\d+)\.(.+)", name):
            prefix = f"model.layers.{config.num_hidden_layers + int(m.group(1))}."
            slots[prefix + _MTP_NAMES[m.group(2)]] = _Slot(name, tuple(shape))
        else:
            raise AssertionError(f"no HF name for parameter {name}")
    vocab = (config.vocab_size, config.hidden_size)
    for k in range(config.num_nextn_predict_layers):
        prefix = f"model.layers.{config.num_hidden_layers + k}."
        slots[prefix + "embed_tokens.weight"] = _Slot("embed.weight", vocab, shared=True)
        slots[prefix + "shared_head.head.weight"] = _Slot("head.weight", vocab, shared=True)
    return slots


# ====================================================================== reading
def _checkpoint_files(path: Path) -> list[Path]:
    if (path / INDEX_FILE).is_file():
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    raise ValueError(f"{path} holds neither {SINGLE_FILE} nor {INDEX_FILE}")


def _read_headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """Name -> (file, shape, dtype string) from the safetensors headers only."""
    headers: dict[str, tuple[Path, tuple[int, ...], str]] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                sl = f.get_slice(key)
                headers[key] = (file, tuple(sl.get_shape()), sl.get_dtype())
    return headers


def _mtp_depth_on_disk(keys: Iterator[str] | list[str], num_hidden_layers: int) -> int:
    layers = {int(m.group(1)) for k in keys if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    return len([i for i in layers if i >= num_hidden_layers])


@dataclass
class _Plan:
    """What to read: per checkpoint key, the (our name, expert, dim-1 slice) targets; plus checks and problems."""

    targets: dict[str, list[tuple[str, int | None, slice | None]]] = field(default_factory=dict)
    shared: dict[str, str] = field(default_factory=dict)
    scales: dict[str, str] = field(default_factory=dict)  # fp8 weight key -> its weight_scale_inv key
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)


def _fused_expert_targets(key: str, slots: dict[str, _Slot]) -> tuple[list, list[str], tuple[int, ...]] | None:
    """Targets, covered per-expert slots and expected shape of a fused ``experts.gate_up_proj``/``down_proj``."""
    m = re.fullmatch(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)", key)
    if not m or f"{m.group(1)}.0.down_proj.weight" not in slots:
        return None
    first = slots[f"{m.group(1)}.0.down_proj.weight"]
    n_experts = sum(1 for k in slots if k.startswith(m.group(1) + ".") and k.endswith(".down_proj.weight"))
    dim, hidden = first.shape
    projs = ["gate_proj", "up_proj"] if m.group(2) == "gate_up_proj" else ["down_proj"]
    covered = [f"{m.group(1)}.{e}.{p}.weight" for p in projs for e in range(n_experts)]
    if m.group(2) == "down_proj":
        return [(first.ours, None, None)], covered, (n_experts, dim, hidden)
    w1, w3 = (slots[f"{m.group(1)}.0.{p}.weight"].ours for p in projs)
    targets = [(w1, None, slice(0, hidden)), (w3, None, slice(hidden, 2 * hidden))]
    return targets, covered, (n_experts, 2 * hidden, dim)


def _expected_scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    return tuple(math.ceil(n / b) for n, b in zip(shape, block, strict=True))


def _classify(key: str, headers: dict, slots: dict[str, _Slot], plan: _Plan, block: tuple[int, int]) -> set[str]:
    """Add ``key`` to the plan (or to its problems); return the slot names it covers."""
    _, shape, dtype = headers[key]
    if key in slots:
        slot, covered, want = slots[key], {key}, slots[key].shape
        if slot.shared:
            plan.shared[key] = slot.ours
        else:
            plan.targets[key] = [(slot.ours, slot.expert, None)]
    elif (fused := _fused_expert_targets(key, slots)) is not None:
        plan.targets[key], covered, want = fused[0], set(fused[1]), fused[2]
    elif key.endswith("_scale_inv") or _IGNORED.fullmatch(key) or math.prod(shape) == 0:
        return set()  # scales are checked with their weight; transformers saves n_shared_experts=0 as (0, D)
    else:
        plan.unexpected.append(f"{key} {list(shape)}")
        return set()
    if shape != want:
        plan.mismatched.append(f"{key}: checkpoint {list(shape)}, model expects {list(want)}")
    if dtype.startswith("F8"):
        scale = key + "_scale_inv"
        if scale not in headers or len(shape) != 2:
            plan.mismatched.append(f"{key}: {dtype} weight without {scale} (block scales of 2-D weights are read)")
        elif headers[scale][1] != _expected_scale_shape(shape, block):
            want_scale = list(_expected_scale_shape(shape, block))
            plan.mismatched.append(f"{scale}: checkpoint {list(headers[scale][1])}, expected {want_scale}")
        else:
            plan.scales[key] = scale
    return covered


def _make_plan(headers: dict, slots: dict[str, _Slot], block: tuple[int, int]) -> _Plan:
    plan, covered = _Plan(), set()
    for key in headers:
        covered |= _classify(key, headers, slots, plan, block)
    plan.missing = [f"{k} {list(s.shape)}" for k, s in slots.items() if k not in covered and not s.shared]
    stray_scales = [k for k in headers if k.endswith("_scale_inv") and k.removesuffix("_scale_inv") not in headers]
    plan.unexpected += [f"{k} {list(headers[k][1])}" for k in stray_scales]
    return plan


def _raise_on_problems(plan: _Plan, path: Path) -> None:
    problems = []
    for title, items in (("missing", plan.missing), ("unexpected", plan.unexpected), ("mis-shaped", plan.mismatched)):
        if items:
            problems.append(f"{len(items)} {title} tensor(s):\n  " + "\n  ".join(items))
    if problems:
        raise ValueError(f"checkpoint {path} does not match the model config:\n" + "\n".join(problems))


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """DeepSeek's block-wise FP8: w = fp8 * scale_inv, one scale per (128, 128) block, edge blocks partial.

    Args:
        weight: (out, in) float8_e4m3fn.
        scale_inv: (ceil(out/128), ceil(in/128)) float32.
        block: Block size (rows, cols), config.json ``quantization_config.weight_block_size``.

    Returns:
        (out, in) float32.
    """
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


def _deinterleave_perm(rope_dim: int) -> torch.Tensor:
    """Row order taking rotate-half layout (x_i pairs x_{i+R/2}) to interleaved pairs (x_2i, x_2i+1)."""
    return torch.arange(rope_dim).view(2, rope_dim // 2).t().flatten()


def _interleave_rope_rows(key: str, w: torch.Tensor, config: DeepSeekV3Config) -> torch.Tensor:
    """Permute the RoPE output rows of a ``rope_interleave=False`` checkpoint into DeepSeek's interleaved layout."""
    if not key.endswith(_ROPE_ROWS):
        return w
    perm, rope, nope = _deinterleave_perm(config.qk_rope_head_dim), config.qk_rope_head_dim, config.qk_nope_head_dim
    if key.endswith("kv_a_proj_with_mqa.weight"):
        c = config.kv_lora_rank
        return torch.cat((w[:c], w[c:][perm]))
    heads = w.view(config.num_attention_heads, nope + rope, -1)  # (H, N+R, in)
    return torch.cat((heads[:, :nope], heads[:, nope:][:, perm]), dim=1).flatten(0, 1)


# ====================================================================== load
def _materialize(model: DeepSeekV3, device: torch.device, dtype: torch.dtype) -> None:
    """Allocate a meta-built model on ``device`` without initialising weights (the checkpoint fills them)."""
    for param in model.parameters():  # buffers (expert biases, counts, RoPE table) keep their dtypes
        param.data = param.data.to(dtype)
    model.to_empty(device=device)
    if model.config.tie_word_embeddings:  # to_empty replaces each module's Parameter, untying them
        model.head.weight = model.embed.weight
    model.freqs_cis = rope_freqs_cis(model.config, device)
    for moe in model.moe_layers():
        moe.tokens_per_expert.zero_()


def _resolve_dtype(dtype: torch.dtype | str | None, hf: dict[str, Any]) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        return getattr(torch, name)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype, 'auto' or None, got {dtype!r}")
    return dtype


def _read_tensor(key: str, handle, plan: _Plan, headers: dict, block: tuple[int, int]) -> torch.Tensor:
    """One tensor from the open shard ``handle``, FP8 dequantised with its scale (usually in the same shard)."""
    tensor = handle.get_tensor(key)
    if key not in plan.scales:
        return tensor
    scale_key = plan.scales[key]
    if headers[scale_key][0] == headers[key][0]:
        return dequantize_fp8(tensor, handle.get_tensor(scale_key), block)
    with safe_open(headers[scale_key][0], framework="pt") as f:
        return dequantize_fp8(tensor, f.get_tensor(scale_key), block)


@torch.no_grad()
def _fill(model: DeepSeekV3, plan: _Plan, headers: dict, hf: dict[str, Any], block: tuple[int, int]) -> None:
    params = model.state_dict(keep_vars=True)
    interleaved = hf.get("rope_interleave", True)
    by_file: dict[Path, list[str]] = {}
    for key in plan.targets:
        by_file.setdefault(headers[key][0], []).append(key)
    for file, keys in by_file.items():
        with safe_open(file, framework="pt") as handle:
            for key in keys:
                tensor = _read_tensor(key, handle, plan, headers, block)
                if not interleaved:
                    tensor = _interleave_rope_rows(key, tensor, model.config)
                for ours, expert, cols in plan.targets[key]:
                    dst = params[ours] if expert is None else params[ours][expert]
                    dst.copy_(tensor if cols is None else tensor[:, cols])


@torch.no_grad()
def _check_shared_copies(model: DeepSeekV3, plan: _Plan, headers: dict, block: tuple[int, int]) -> None:
    """DeepSeek's MTP layers store copies of the embedding and head, which our MTP shares; warn if they differ."""
    params = model.state_dict()
    for key, ours in plan.shared.items():
        with safe_open(headers[key][0], framework="pt") as handle:
            stored = _read_tensor(key, handle, plan, headers, block).to(params[ours].device, params[ours].dtype)
        if not torch.equal(stored, params[ours]):
            diff = (stored.float() - params[ours].float()).abs().max().item()
            warnings.warn(
                f"{key} differs from the shared {ours} (max abs diff {diff:.3g}); this model shares one embedding "
                "and head between the main model and MTP, so the main model's copy is used",
                stacklevel=3,
            )


def _open(path: Path) -> tuple[dict[str, Any], dict[str, tuple[Path, tuple[int, ...], str]]]:
    """(config.json, safetensors headers) of a checkpoint folder."""
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json; pass the folder of a Hugging Face checkpoint")
    return json.loads((path / "config.json").read_text()), _read_headers(_checkpoint_files(path))


def read_hf_config(path: str | Path, **config_overrides: Any) -> DeepSeekV3Config:
    """The model config of an HF checkpoint folder (its ``config.json``, MTP depth as far as the weights hold it).

    Args:
        path: The checkpoint folder.
        **config_overrides: DeepSeekV3Config fields to override (training knobs such as ``mtp_loss_weight``).
            When config.json declares MTP layers that the checkpoint lacks (transformers' exports), the config
            has none unless ``num_nextn_predict_layers`` is given here.
    """
    hf, headers = _open(Path(path))
    if "num_nextn_predict_layers" not in config_overrides:
        on_disk = _mtp_depth_on_disk(list(headers), hf["num_hidden_layers"])
        config_overrides["num_nextn_predict_layers"] = min(hf.get("num_nextn_predict_layers", 0), on_disk)
    return config_from_hf(hf, **config_overrides)


def _checked_plan(model: DeepSeekV3, path: Path) -> tuple[dict[str, Any], dict, tuple[int, int], _Plan]:
    """What to copy from ``path`` into ``model`` (meta or allocated), every name and shape checked first."""
    hf, headers = _open(path)
    block = tuple((hf.get("quantization_config") or {}).get("weight_block_size", (128, 128)))
    plan = _make_plan(headers, hf_slots(model), block)
    _raise_on_problems(plan, path)
    return hf, headers, block, plan


@torch.no_grad()
def load_hf_weights(model: DeepSeekV3, path: str | Path) -> None:
    """Copy an HF checkpoint's tensors into ``model`` (allocated, unsharded, of the checkpoint's shape).

    Every tensor name and shape is checked from the safetensors headers before any data is read; tensors are
    then copied shard by shard into the model's parameters and buffers (cast to their dtypes), FP8 ones
    dequantised with their block scales.

    Raises:
        ValueError: Listing missing, unexpected and mis-shaped tensors (names and shapes).
    """
    hf, headers, block, plan = _checked_plan(model, Path(path))
    _fill(model, plan, headers, hf, block)
    _check_shared_copies(model, plan, headers, block)


def load_hf_checkpoint(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    **config_overrides: Any,
) -> DeepSeekV3:
    """Load a DeepSeek-V3 checkpoint folder (``config.json`` + safetensors, one file or sharded with an index).

    Reads DeepSeek's released layout (MTP layers after the last layer, FP8 weights with block scales) and what
    transformers 5.x saves (per-expert or fused expert weights, ``rope_parameters``). The model is built on the
    meta device, checked against the checkpoint, then allocated once and filled tensor by tensor, so the
    weights are never held twice.

    Args:
        path: The checkpoint folder.
        device: Where to put the model (default CPU).
        dtype: Parameter dtype; None = float32 (training master weights), ``"auto"`` = config.json's dtype.
            Expert biases stay float32.
        **config_overrides: DeepSeekV3Config fields to override, as for ``read_hf_config``.

    Returns:
        The model, in eval mode.

    Raises:
        ValueError: Listing missing, unexpected and mis-shaped tensors (names and shapes), or unsupported config.
    """
    path = Path(path)
    with torch.device("meta"):
        model = DeepSeekV3(read_hf_config(path, **config_overrides))
    hf, headers, block, plan = _checked_plan(model, path)
    _materialize(model, torch.device(device or "cpu"), _resolve_dtype(dtype, hf))
    _fill(model, plan, headers, hf, block)
    _check_shared_copies(model, plan, headers, block)
    return model.eval()


# ====================================================================== save
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size must be bytes (int) or like '5GB' / '500MB', got {size!r}")
    units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    return int(float(m.group(1)) * units[(m.group(2) or "B").lower()])


def _export_tensors(model: DeepSeekV3, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) in checkpoint order; views into the model, cast only when ``dtype`` asks."""
    params = model.state_dict()
    for key, slot in hf_slots(model).items():
        if slot.shared and key == "lm_head.weight":
            continue  # tied: transformers saves the embedding only
        tensor = params[slot.ours] if slot.expert is None else params[slot.ours][slot.expert]
        if slot.shared:
            tensor = tensor.clone()  # DeepSeek's MTP copies; safetensors refuses two names for one storage
        if dtype is not None and tensor.is_floating_point() and not key.endswith("e_score_correction_bias"):
            tensor = tensor.to(dtype)
        yield key, tensor
    if model.config.n_shared_experts == 0:  # transformers builds zero-width shared experts and expects them
        for moe_key in (k for k in hf_slots(model) if k.endswith("mlp.gate.weight")):
            prefix, d = moe_key.removesuffix("gate.weight") + "shared_experts.", model.config.hidden_size
            for proj, shape in (("gate_proj", (0, d)), ("up_proj", (0, d)), ("down_proj", (d, 0))):
                yield f"{prefix}{proj}.weight", torch.empty(shape, dtype=dtype or model.embed.weight.dtype)


def save_hf_checkpoint(
    model: DeepSeekV3,
    path: str | Path,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    token_ids: dict[str, int] | None = None,
) -> None:
    """Write ``model`` as a transformers-loadable folder: config.json + safetensors (sharded with an index if large).

    Per-expert weights and MTP layers as layers L+k (with copies of the embedding and head) follow DeepSeek's
    release. transformers' ``DeepseekV3ForCausalLM.from_pretrained`` loads the main model; it does not build MTP
    layers and silently skips them only for ``model.layers.61.*`` (DeepSeek-V3's depth), otherwise it reports
    them as unexpected keys, harmlessly. Shards are written one at a time.

    Args:
        model: A model with real (non-meta, non-sharded) tensors.
        path: Output folder (created).
        max_shard_size: Bytes per shard, int or a string like ``"5GB"``.
        dtype: Cast floating tensors to this dtype (expert biases stay float32); None keeps the model's dtypes.
        token_ids: ``config.json`` keys of the tokenizer's special tokens, e.g. ``{"eos_token_id": 0}`` (else
            transformers' defaults, bos 0 and eos 1, which need not match the tokenizer).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for key, tensor in _export_tensors(model, dtype):
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((key, tensor))
        size += nbytes
    weight_dtype = dtype or model.embed.weight.dtype
    hf_config = {**config_to_hf(model.config, weight_dtype), **(token_ids or {})}
    (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    if n == 1 and (path / INDEX_FILE).exists():
        (path / INDEX_FILE).unlink()  # a stale index would win over the new single file on load
    weight_map, total = {}, 0
    for name, shard in zip(names, shards, strict=True):
        save_file({k: t.detach().contiguous().cpu() for k, t in shard}, path / name, metadata={"format": "pt"})
        for key, tensor in shard:
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
