"""Shared test fixtures: tiny configs, fixed seeds, restored global state, offline HF."""

from __future__ import annotations

import gc
import os
import signal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from models import DeepSeekV3Config  # noqa: E402


@pytest.fixture
def tiny_config() -> DeepSeekV3Config:
    """Dim 64, 3 layers (1 dense), 16 experts in 4 groups, one MTP depth, fp32."""
    return DeepSeekV3Config.from_preset(
        "tiny",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        max_position_embeddings=256,
    )


@pytest.fixture
def one_thread():
    """Tiny matmuls gain nothing from intra-op threads, and on a busy 2-core box OpenMP spinning slows them ~100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1]


@pytest.fixture(autouse=True)
def _seed_and_restore_globals():
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    handlers = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    yield
    torch.set_default_dtype(dtype)
    # A Trainer run in this process may leave its stop-signal handlers behind (Preemption's, Lightning's): restore
    # them, so that no test runs (or forks workers) under another test's handlers.
    for sig, handler in handlers.items():
        if signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        # Free the dead process groups here: a forked child that garbage-collects an inherited gloo group joins
        # its worker threads, which do not exist after fork, and hangs.
        gc.collect()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
