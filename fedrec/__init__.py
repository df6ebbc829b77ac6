"""fedrec: federated, privacy-preserving multifaceted user modelling for recommendation.

The library holds everything that does not depend on how messages travel: data sources and
splits (:mod:`fedrec.data`), metrics (:mod:`fedrec.metrics`) and, in later modules, models,
the federated algorithms and the centralised trainer. The Flower apps live in the
``clients/`` and ``server/`` folders of the project and import this package.
"""

__version__ = "0.1.0"
