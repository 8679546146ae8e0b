"""Feedback: product apps report outcomes of predictions over gRPC into ``feedback``."""
