"""``python -m arctl_planner``: run the planner gRPC service."""

import sys

from arctl_planner.server import run

sys.exit(run())
