"""A/B experiments: a YAML config of rankers, layers, experiments and holdouts (`config`), a pure
salted hash assignment (`assignment`), the service's variant router with hot reload (`router`), and
offline analysis of exposure logs joined with later events (`analysis`, `stats`, `report`).

Nothing here imports gRPC, ONNX Runtime or LightGBM: the router is handed a `resolve(ranker_name)`
callable by the service, so this package stays testable without a model.
"""

from __future__ import annotations
