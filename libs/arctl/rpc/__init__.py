"""gRPC plumbing shared by the planner, tuner and exporter services.

- ``errors``: domain errors and the one table that maps them to status codes.
- ``jobs``: long-running jobs (SQLite store, worker threads, cooperative cancellation, resume).
- ``verbs``: Start/Watch/Get/Cancel behaviour every service shares.
- ``artefacts``: references to files and folders (allowed roots, no traversal, completeness,
  optional fsspec URLs).
- ``interceptors``: status mapping, structured logs, Prometheus metrics, token auth.
- ``metrics``: the ``arctl_rpc_*`` and ``arctl_job*`` metrics and their HTTP endpoint.
- ``convert``: job records, progress events, artefact references and plans <-> protobuf.
- ``server``: settings, health, reflection, TLS, graceful drain on SIGTERM.
- ``client``: channels (TLS, token) and following a job with resume after a reconnect.
- ``loading``: model loading serialized per process (transformers is not thread-safe there).
- ``probe``: ``python -m arctl.rpc.probe HOST:PORT``, a health check for containers.

Nothing here imports a service; services plug their servicers and job handlers in.
"""
