"""Inference gateway: Open Inference Protocol and ``Predict`` over gRPC, backed by Triton.

One grpc.aio port serves ``inference.GRPCInferenceService`` (so a stock ``tritonclient``
works) and ``loopmesh.v1.InferenceService`` (entity features + canary routing + logging).
"""
