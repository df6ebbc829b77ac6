"""The algorithm registry: name -> :class:`~fedrec.federated.algorithm.Algorithm` subclass."""

from __future__ import annotations

from typing import Any

from fedrec.data.split import SplitData
from fedrec.federated.algorithm import Algorithm
from fedrec.federated.config import FederatedConfig
from fedrec.federated.fedavg import FedAvg
from fedrec.federated.fedmf import FedMF
from fedrec.federated.local import LocalOnly
from fedrec.federated.mrff import FedMRFF, FedMRFFNoGroups
from fedrec.federated.pfedrec import PFedRec
from fedrec.federated.unicdr import FedUniCDR
from fedrec.registry import Registry

__all__ = ["ALGORITHMS", "create_algorithm", "algorithm_names"]

ALGORITHMS: Registry[type[Algorithm]] = Registry("algorithm")
for _cls in (FedMRFF, FedMRFFNoGroups, FedAvg, LocalOnly, FedMF, PFedRec, FedUniCDR):
    ALGORITHMS.register(_cls.name)(lambda cls=_cls: cls)


def algorithm_names() -> list[str]:
    """Registered algorithm names."""
    return ALGORITHMS.names()


def create_algorithm(name: str, split: SplitData, *, task: str, model: str | None = None,
                     model_options: dict[str, Any] | None = None, config: FederatedConfig | None = None) -> Algorithm:
    """Build algorithm ``name`` on ``split`` (``model`` defaults to the algorithm's own);
    a task the data cannot support (ctr without labels) is refused first
    (:func:`~fedrec.data.batching.check_task`)."""
    from fedrec.data.batching import check_task

    cls = ALGORITHMS.create(name)
    check_task(split, task)
    return cls(split, task=task, model=model, model_options=model_options, config=config)
