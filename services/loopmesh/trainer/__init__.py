"""The trainer: joins predictions with feedback, keeps a training set, retrains and publishes.

``joiner`` (faust) pairs ``predictions`` with ``feedback`` into ``training.examples`` and live
per-version metrics; ``agents`` feed the on-disk ``dataset``; ``core`` decides when to train
(``triggers``), trains (``train``), gates (``gate``) and publishes into the model repository;
``server`` is the ``TrainerService`` gRPC adapter.
"""
