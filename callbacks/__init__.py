"""Lightning callbacks: aux-loss-free expert balancing, MoE load metrics, throughput/MFU, checkpoints, preemption."""

from callbacks.checkpoint import BestAndLastCheckpoint
from callbacks.expert_bias_balancing import ExpertBiasBalancing
from callbacks.moe_load_monitor import MoELoadMonitor
from callbacks.preemption import Preemption
from callbacks.throughput_monitor import ThroughputMonitor

__all__ = ["BestAndLastCheckpoint", "ExpertBiasBalancing", "MoELoadMonitor", "Preemption", "ThroughputMonitor"]
