"""``python -m lightning_modules.sweep --config configs/sweeps/tiny_lr.yaml`` (the same as ``dsv3 sweep``)."""

import sys

from lightning_modules.sweep.runner import main

sys.exit(main())
