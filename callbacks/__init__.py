"""Lightning callbacks: aux-loss-free expert balancing, MoE load metrics, throughput/MFU."""

from callbacks.expert_bias_balancing import ExpertBiasBalancing
from callbacks.moe_load_monitor import MoELoadMonitor
from callbacks.throughput_monitor import ThroughputMonitor

__all__ = ["ExpertBiasBalancing", "MoELoadMonitor", "ThroughputMonitor"]
