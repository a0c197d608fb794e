"""Model loading for servers: one load at a time per process.

transformers builds a model under process-global state (meta-device initialisation, patched
module constructors), so two threads loading at once corrupt each other ("Cannot copy out of meta
tensor"). A server runs jobs on worker threads, and tests or ``arctl services up`` may host several
services in one process: every load there goes through this lock.
"""

from __future__ import annotations

import threading

from arctl.models import LoadedModel, load_model

MODEL_LOAD_LOCK = threading.Lock()


def load_model_serialized(reference: str) -> LoadedModel:
    """``arctl.models.load_model`` under the process-wide lock."""
    with MODEL_LOAD_LOCK:
        return load_model(reference)
