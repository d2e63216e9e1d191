"""``python -m sweeps --config configs/sweeps/tiny_lr.yaml`` (the same as ``dsv3 sweep``)."""

import sys

from sweeps.runner import main

sys.exit(main())
