"""Ingestion: product apps stream interaction events over gRPC into ``events.raw``."""
