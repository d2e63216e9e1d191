"""No autograd.Function of the project returns a tensor its forward mutated in place.

torch 2.11 (the CUDA image this project's GPU runs use) compiles such a Function wrongly: the gradient of that output
goes to the wrong slot (pytorch/pytorch#180642, fixed in 2.12). ``_PadGroups`` did it (``index_copy_`` into the padded
groups) and the compiled FP8 MoE's input gradient came out 82 % off eager's on an H200 (docs/fp8.md). torch 2.13,
which CI runs, compiles it right, so a compiled-against-eager test cannot see a relapse here: this one checks the
pattern itself, under a dispatch mode, in every Function the model runs.
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import models
from models import DeepSeekV3, DeepSeekV3Config
from models.parallel.fp8 import FP8Config, convert_to_fp8


class _Mutations(TorchDispatchMode):
    """Records the storages that in-place ops write to."""

    def __init__(self) -> None:
        super().__init__()
        self.written: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        schema = {a.name: a for a in func._schema.arguments}
        named = [*zip(schema, args, strict=False), *kwargs.items()]  # positional by schema order, then out= and co
        for name, arg in named:
            alias = schema[name].alias_info if name in schema else None
            if isinstance(arg, torch.Tensor) and alias is not None and alias.is_write:
                self.written.add(arg.untyped_storage().data_ptr())
        return func(*args, **kwargs)


def _project_functions() -> list[type]:
    for info in pkgutil.walk_packages(models.__path__, "models."):
        importlib.import_module(info.name)
    found, todo = [], list(torch.autograd.Function.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.__module__.startswith("models.") and "forward" in cls.__dict__:
            found.append(cls)
    return found


@pytest.fixture
def checked_functions(monkeypatch):
    """Wraps every project Function's forward; returns the names of those that ran and the offences seen."""
    ran, offences = set(), []
    for cls in _project_functions():
        original = cls.__dict__["forward"].__func__

        def forward(ctx, *args, _original=original, _name=cls.__qualname__):  # noqa: ANN001, ANN202
            ran.add(_name)
            with _Mutations() as mode:
                out = _original(ctx, *args)
            outs = out if isinstance(out, tuple) else (out,)
            for t in outs:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in mode.written:
                    offences.append(_name)
            return out

        monkeypatch.setattr(cls, "forward", staticmethod(forward))
    return ran, offences


@pytest.mark.parametrize("fp8", [None, "tensorwise", "rowwise", "blockwise"])
def test_no_function_returns_a_tensor_its_forward_wrote_in_place(checked_functions, fp8, one_thread):
    ran, offences = checked_functions
    config = DeepSeekV3Config.from_preset(
        "tiny", vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
        num_hidden_layers=2, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=64,
        v_head_dim=64, num_attention_heads=2, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("meta"):
        model = DeepSeekV3(config)
    if fp8 is not None:
        with pytest.warns(UserWarning, match="emulated"):
            convert_to_fp8(model, FP8Config(fp8, experts=True), device=torch.device("cpu"))
    model.to_empty(device="cpu")
    model.init_weights(buffer_device=torch.device("cpu"))
    batch = torch.randint(0, 256, (2, 65))
    model(batch[:, :-1], labels=batch[:, 1:], return_logits=False).loss.backward()
    expected = {"_Dispatch", "_LinearCrossEntropy"} | (
        {"_PadGroups", "_UnpadGroups", "_Float8SwiGLU"} if fp8 else set()
    )
    assert expected <= ran, ran
    assert not offences, f"these Functions return a tensor written in place by their forward: {sorted(set(offences))}"
