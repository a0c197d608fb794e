"""``python -m arctl_tuner``: run the tuner gRPC service."""

import sys

from arctl_tuner.server import run

sys.exit(run())
