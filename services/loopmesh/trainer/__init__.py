"""The trainer: keeps a training set, retrains and publishes.

``agents`` feed the on-disk ``dataset`` from ``training.examples`` (the joiner's output),
erasures, live metrics and rollouts; ``core`` decides when to train (``triggers``), trains
(``train``), gates (``gate``) and publishes into the model repository; ``server`` is the
``TrainerService`` gRPC adapter.
"""
