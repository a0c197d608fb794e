"""``python -m arctl_exporter``: run the exporter gRPC service."""

import sys

from arctl_exporter.server import run

sys.exit(run())
