"""FedMF: federated matrix factorisation, user vectors private, item vectors averaged.

Di Chai, Leye Wang, Kai Chen, Qiang Yang. "Secure Federated Matrix Factorization", IEEE
Intelligent Systems 36(5), 2020 (arXiv 1906.05108) — here without its homomorphic encryption
(the engine's secure aggregation, ``secure-aggregation = true``, hides individual uploads
instead).

Each user is a client holding its own user vector ``p_u`` (and bias, with the model option
``user-bias``): the ``mf`` model's per-user tables (:mod:`fedrec.models.mf`), which never
leave it. Every round the user starts from the global item table, takes ``local-steps``
steps of the engine's optimiser on its own training positives and sampled negatives (BCE),
updating ``p_u`` and its copy of the item rows it read, and uploads that copy. With
``item-aggregation = all`` the server averages the copies over the round's users (untouched
rows count with their global value): Chai et al.'s server step — item gradients summed over
users — scaled by one over the number of users, so a row read by few users barely moves;
with ``touched`` (``auto``, the next-item formats' default) each row is averaged over the users that
read it (:mod:`fedrec.federated.config`, ``item_aggregation``). Item tables are trained as
compact per-user copies (only the rows a user's targets and negatives read), so memory grows
with the users' data, not with the catalogue.

Hyper-parameters: the ``mf`` defaults (dimension 32, no biases) and the engine's local update
(one step of a fresh Adam at lr 0.1 per user and round). On ML-100K (validation NDCG@10,
sampled-99, 80 rounds, ``item-aggregation = all``) that gave 0.337, and a 10x larger item
learning rate 0.359 (not kept: a small gain for one more knob); popularity: 0.241. The
recorded test numbers with either aggregation: ``simulations/results/fed_next_item.md``.

Run: ``fedrec simulate --algorithm fedmf --data SPEC --task next_item --protocol sampled-99``.
"""

from __future__ import annotations

from typing import Any

from fedrec.errors import ConfigError
from fedrec.federated.algorithm import Algorithm

__all__ = ["FedMF"]


class FedMF(Algorithm):
    """FedMF on the ``mf`` model (see the module docstring)."""

    name = "fedmf"
    default_model = "mf"

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Only the ``mf`` model is matrix factorisation."""
        if self.model_name != "mf":
            raise ConfigError(f"algorithm '{self.name}' trains the 'mf' model (got model '{self.model_name}')")
        return options
