"""Local infrastructure for one machine: real Kafka (KRaft), tritonserver and Feast."""
