"""Continued pretraining: ``--model.init_from`` an HF folder (a random transformers model, DeepSeek's FP8 layout) or
a dsv3 checkpoint; the config comes from it, the optimizer and schedules start fresh; a tiny checkpoint's context
extended with YaRN (configs/context_extension/tiny-1k.yaml)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from lightning_modules import DeepSeekV3LitModule
from lightning_modules.cli import DSV3CLI, main
from models import DeepSeekV3Config, load_hf_checkpoint, save_hf_checkpoint
from models.rope import rope_freqs_cis
from tests.lightning_modules.conftest import ROOT, SMALL_MODEL, TINY_YAML

transformers = pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Initializing zero-element tensors"),
]


def _no_model_flags(args: list[str]) -> list[str]:
    """The small CLI arguments without the model overrides: the shape must come from init_from."""
    i = args.index("--model.overrides")
    return args[:i] + args[i + 2 :]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random transformers DeepseekV3ForCausalLM (1024 tokens, as the small BPE) saved with save_pretrained."""
    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(
        vocab_size=1024, hidden_size=48, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2, topk_group=1, max_position_embeddings=64, attn_implementation="eager",
    )  # fmt: skip
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.05)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.uniform_(-0.3, 0.3)
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    return path, model


class FirstBatch(Callback):
    """At the start of fit: the model's weights and its logits on the first batch (eval mode), the counters."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx:
            return
        self.state = {k: v.clone() for k, v in pl_module.model.state_dict().items()}
        self.batch = batch.clone()
        pl_module.model.eval()
        with torch.no_grad():
            self.logits = pl_module.model(batch[:, :-1]).logits
        pl_module.model.train()
        self.step, self.tokens = trainer.global_step, pl_module.tokens_seen


def test_fit_from_a_transformers_checkpoint(small, hf_dir):
    path, hf_model = hf_dir
    probe = FirstBatch()
    cli = DSV3CLI(
        args=["fit", *_no_model_flags(small(max_steps=2, val_check_interval=2)), "--model.init_from", str(path)],
        trainer_defaults={"callbacks": [probe]},
    )
    config = cli.model.config
    assert (config.hidden_size, config.num_hidden_layers, config.n_routed_experts) == (48, 2, 8)  # from config.json
    assert config.num_nextn_predict_layers == 0  # transformers saves no MTP layers
    # Training started from the checkpoint's weights and biases, from step 0 and a fresh optimizer.
    reference = load_hf_checkpoint(path)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(probe.state[name], tensor), name
    assert probe.step == 0 and probe.tokens == 0
    with torch.no_grad():
        theirs = hf_model(probe.batch[:, :-1]).logits
    torch.testing.assert_close(probe.logits, theirs, rtol=1e-5, atol=1e-5)
    assert cli.trainer.global_step == 2 and cli.model.tokens_seen == 2 * 2 * 32
    saved = torch.load(cli.trainer.checkpoint_callback.last_model_path, weights_only=True)
    assert saved["model_config"]["hidden_size"] == 48 and saved["hyper_parameters"]["init_from"] == str(path)


def test_init_from_fp8_block_scaled_release_layout(tmp_path, hf_dir):
    from tests.models.test_hf_checkpoint import _dequantize_reference, _load_all, _quantize_fp8, _rewrite

    path, _ = hf_dir
    fp8 = tmp_path / "fp8"
    save_hf_checkpoint(load_hf_checkpoint(path), fp8)  # DeepSeek's layout (per-expert names, MTP as layer L+k)
    tensors, reference = _load_all(fp8), {}
    for key in list(tensors):
        if "proj" in key or "experts" in key:  # as released: the projection weights in e4m3 with 128x128 scales
            q, scale_inv = _quantize_fp8(tensors[key], 128)
            tensors[key], tensors[key + "_scale_inv"] = q, scale_inv
            reference[key] = _dequantize_reference(q, scale_inv, 128)
    quantization = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    _rewrite(fp8, tensors, {"quantization_config": quantization})
    module = DeepSeekV3LitModule(init_from=str(fp8), vocab_size=1000, seq_len=32)  # a smaller tokenizer is fine
    module.configure_model()
    assert module.config.vocab_size == 1024
    w = module.model.layers[0].attn.wq_a.weight
    assert torch.equal(w, reference["model.layers.0.self_attn.q_a_proj.weight"])


def test_bad_init_from_gets_one_line(small, hf_dir, tmp_path, capsys):
    path, _ = hf_dir
    args = _no_model_flags(small())
    assert main(["fit", *args, "--model.init_from", str(tmp_path / "nope")]) == 2
    assert "model.init_from" in capsys.readouterr().err
    assert main(["fit", *args, "--model.init_from", str(path), "--model.overrides.hidden_size=64"]) == 2
    err = capsys.readouterr().err
    assert "change the shape of the model.init_from checkpoint (hidden_size: 64, checkpoint 48)" in err
    assert main(["fit", *args, "--data.vocab_size=2048", "--model.init_from", str(path)]) == 2
    assert "use the checkpoint's tokenizer" in capsys.readouterr().err


def test_init_from_a_dsv3_checkpoint_keeps_weights_and_starts_fresh(small, trained_ckpt):
    probe = FirstBatch()
    args = _no_model_flags(small(max_steps=1, val_check_interval=1)) + ["--model.init_from", str(trained_ckpt)]
    cli = DSV3CLI(args=["fit", *args], trainer_defaults={"callbacks": [probe]})
    saved = torch.load(trained_ckpt, weights_only=True)
    assert (
        cli.model.config.to_dict() == saved["model_config"]
        and cli.model.config.hidden_size == SMALL_MODEL["hidden_size"]
    )
    for name, tensor in saved["state_dict"].items():
        assert torch.equal(probe.state[name.removeprefix("model.")], tensor), name
    assert probe.step == 0 and probe.tokens == 0 and saved["global_step"] == 2


def test_tiny_checkpoint_extends_its_context_on_the_cpu(small, trained_ckpt, tmp_path):
    """The tiny stage config, from a 32-token checkpoint to 128 tokens (s = 4): weights in, YaRN on, trains."""
    args = small(max_steps=2, val_check_interval=2)
    args[args.index(TINY_YAML)] = str(ROOT / "configs" / "context_extension" / "tiny-1k.yaml")  # it includes tiny
    i = args.index("--model.overrides")  # the shape comes from the checkpoint
    args = args[:i] + args[i + 2 :]
    yarn = ["--model.overrides.original_max_position_embeddings=32", "--model.overrides.max_position_embeddings=128"]
    args += [f"--model.init_from={trained_ckpt}", "--data.seq_len=128", *yarn]
    cli = DSV3CLI(args=["fit", *args])
    config = cli.model.config
    saved = torch.load(trained_ckpt, weights_only=True)
    assert config.use_yarn and config.rope_factor == 4.0 and config.max_position_embeddings == 128
    assert not DeepSeekV3Config.from_dict(saved["model_config"]).use_yarn
    assert config.hidden_size == saved["model_config"]["hidden_size"]
    model = cli.model.model
    torch.testing.assert_close(model.freqs_cis, rope_freqs_cis(config))  # the YaRN table over 128 positions
    assert model.freqs_cis.shape[0] == 128 and cli.trainer.global_step == 2
    assert cli.model.tokens_seen == 2 * 2 * 128  # 2 steps of 2 x 128 tokens, counted from 0
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert math.isfinite(cli.trainer.callback_metrics["val/loss"].item())


def _sharded_load(rank: int, source: str, config: dict) -> dict:
    """FSDP2-shard a meta model over 2 gloo ranks, load ``source`` into the shards, gather the full state back."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_modules.module import load_source_weights
    from models import DeepSeekV3
    from models.parallel.compile import blocks

    mesh = init_device_mesh("cpu", (2,))
    with torch.device("meta"):
        model = DeepSeekV3(DeepSeekV3Config.from_dict(config))
    for block in blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    model.init_weights(buffer_device=torch.device("cpu"))
    load_source_weights(model, source)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"full": full, "sharded": all(type(p).__name__ == "DTensor" for p in model.parameters())}


@pytest.mark.distributed
def test_init_from_into_fsdp2_shards_equals_the_one_device_load(tmp_path, hf_dir, trained_ckpt):
    from tests.callbacks.conftest import run_gloo_ranks

    path, _ = hf_dir
    for source in (str(path), str(trained_ckpt)):
        module = DeepSeekV3LitModule(init_from=source)
        module.configure_model()  # the one-device load, the reference
        want = module.model.state_dict()
        out = tmp_path / Path(source).name
        out.mkdir()
        ranks = run_gloo_ranks(out, _sharded_load, source, module.config.to_dict())
        assert all(r["sharded"] for r in ranks)
        got = ranks[0]["full"]
        assert got.keys() == want.keys()
        for name, tensor in want.items():
            assert torch.equal(got[name], tensor), (source, name)
