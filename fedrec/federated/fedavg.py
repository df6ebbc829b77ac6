"""FedAvg of a model whose parameters are public (by default the plain SASRec backbone).

H. Brendan McMahan, Eider Moore, Daniel Ramage, Seth Hampson, Blaise Agüera y Arcas.
"Communication-Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017.

Every parameter the model declares ``public`` is averaged over the round's users (weighted
as configured); per-user private tables (e.g. an optional user-id embedding) stay home.
"""

from __future__ import annotations

from fedrec.federated.algorithm import Algorithm

__all__ = ["FedAvg"]


class FedAvg(Algorithm):
    """FedAvg with the model's own roles; default model ``sasrec``."""

    name = "fedavg"
    default_model = "sasrec"
