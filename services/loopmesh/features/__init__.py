"""Features service: stream agents fold ``events.raw`` into Feast, FeatureService serves it.

``agents.py`` (a kernel ``BatchSink`` with a changelog-backed table) computes per-entity
aggregates and pushes them to the Feast online store; ``server.py`` serves them over gRPC with
a status per value; ``export.py`` builds point-in-time-correct training frames from the event
log. Only this package imports feast
(``store.py``), and only where a store is opened.
"""
