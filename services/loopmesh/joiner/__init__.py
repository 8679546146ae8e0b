"""The joiner: pairs ``predictions`` with ``feedback`` by prediction_id into labelled examples.

``core`` holds the pairing rules (pure), ``live`` the sliding-window metrics per model version,
``agents`` the faust app that applies them to the topics (``training.examples`` and
``metrics.live`` out), ``state`` what keeps its memory bounded (the age index of unmatched
feedback, the erased entities), ``app`` the process. The trainer stores the examples; the rollout
controller and the trainer's drift trigger read the metrics.
"""
