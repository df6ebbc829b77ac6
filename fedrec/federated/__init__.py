"""Federated training, transport-free: the algorithm interface (client_update, aggregate,
client evaluation), vectorised shards, the algorithms (MRFF, FedAvg, local-only), pooled
evaluation from client summaries, and the in-process runner of the Flower apps."""

from fedrec.federated.algorithm import Algorithm, LocalState, Shard, Upload, make_shard, participants
from fedrec.federated.config import FederatedConfig
from fedrec.federated.layout import Layout
from fedrec.federated.registry import ALGORITHMS, algorithm_names, create_algorithm

__all__ = ["Algorithm", "LocalState", "Shard", "Upload", "make_shard", "participants", "FederatedConfig", "Layout",
           "ALGORITHMS", "algorithm_names", "create_algorithm"]
