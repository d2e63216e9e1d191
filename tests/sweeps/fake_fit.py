"""A fast stand-in for ``dsv3 fit`` in sweep tests: same flags in, TensorBoard ``val/loss`` out, no torch.

It reads ``--key=value`` flags like LightningCLI, writes ``val/loss`` scalars into the logger's version
directory (``save_dir/name/version``) and records its argv and pid there. Behaviour flags (prefix ``fake.``):
``fake.fail=true`` exits 1 after printing to stderr, ``fake.sleep=S`` sleeps S seconds before logging,
``fake.fail_if_env=VAR`` fails while the environment variable VAR is set. ``val/loss`` is a smooth function
of the numeric flags, so sweeps have a known best trial.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


def parse(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    configs, flags, it = [], {}, iter(argv)
    for arg in it:
        if arg == "--config":
            configs.append(next(it))
        elif arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            flags[key] = value
    return configs, flags


def _env() -> dict[str, str | None]:
    return {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")}


def fake_loss(flags: dict[str, str]) -> float:
    """Distance of log10(lr) from -2.5 plus gamma: lr=3e-3, gamma=small wins."""
    lr = float(flags.get("model.optimizer.init_args.lr", "1e-3"))
    gamma = float(flags.get("model.bias_update_speed", flags.get("fake.gamma", "0.0")))
    return 2.0 + abs(math.log10(lr) + 2.5) + gamma


def main() -> int:
    configs, flags = parse(sys.argv[1:])
    log_dir = Path(flags["trainer.logger.init_args.save_dir"]) / flags["trainer.logger.init_args.name"]
    log_dir = log_dir / flags["trainer.logger.init_args.version"]
    log_dir.mkdir(parents=True, exist_ok=True)
    record = {"argv": sys.argv[1:], "configs": configs, "flags": flags, "env": _env()}
    (log_dir / "fake_argv.json").write_text(json.dumps(record))
    (log_dir / "fake_pid").write_text(str(os.getpid()))
    start = time.time()
    print("fake fit starting", flush=True)
    time.sleep(float(flags.get("fake.sleep", "0")))
    if flags.get("fake.fail") == "true" or os.environ.get(flags.get("fake.fail_if_env", "-"), ""):
        print("RuntimeError: fake trial failed on purpose", file=sys.stderr, flush=True)
        return 1
    writer = EventFileWriter(str(log_dir))
    loss = fake_loss(flags)
    for step in (10, 20):
        value = summary_pb2.Summary.Value(tag="val/loss", simple_value=loss + 1.0 / step)
        writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=[value])))
    writer.close()
    (log_dir / "fake_times.json").write_text(json.dumps([start, time.time()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
