"""gRPC ranking service (`recsys serve`): Rank, Recommend, events in, model admin, health, reflection.

Layers, outermost first: `server` (grpc.aio server, TLS, auth, health, signals) -> `servicer` (proto
<-> Python, status codes; the only place that knows gRPC codes) -> `validation` (request checks that
name the field) -> `engine` (the service adapter over `recsys.scoring.request.RequestScorer` and the
live `FeatureState`) -> `model` (a registry version + ranker, hot-swappable). No torch anywhere.
"""

from __future__ import annotations
