"""Lightning callbacks, one behaviour per file: aux-loss-free expert balancing, MoE load metrics, router entropy,
throughput/MFU; the MoE ones share the per-step expert counts through ``MoECounts`` (``pl_module.moe_counts``)."""

from callbacks.expert_bias_balancing import ExpertBiasBalancing
from callbacks.moe_counts import MoECounts
from callbacks.moe_load_monitor import MoELoadMonitor
from callbacks.router_entropy import RouterEntropyMonitor
from callbacks.throughput_monitor import ThroughputMonitor

__all__ = ["ExpertBiasBalancing", "MoECounts", "MoELoadMonitor", "RouterEntropyMonitor", "ThroughputMonitor"]
