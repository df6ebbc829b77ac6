"""Federated MRFF: public parameters averaged over all users, each group FFN over the users
routed to it, user FFNs and profile embeddings kept on the client.

Chunxu Zhang et al. "Multifaceted User Modeling in Recommendation: A Federated Foundation
Models Approach", AAAI 2025 (arXiv 2412.16969), section "Federated optimisation"; the
protocol of its released code (one user per client, all users every round, one local step
with a fresh Adam at lr 0.1, unweighted means) is the default of
:class:`~fedrec.federated.config.FederatedConfig`.

``mrff-nogroups`` is the ablation without groups: G = 1, so the single group FFN of each
layer is shared by everyone (averaged like a public parameter).
"""

from __future__ import annotations

from typing import Any

from fedrec.errors import ConfigError
from fedrec.federated.algorithm import Algorithm

__all__ = ["FedMRFF", "FedMRFFNoGroups"]


class FedMRFF(Algorithm):
    """MRFF trained federated (roles as the model declares them)."""

    name = "mrff"
    default_model = "mrff"

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Only the ``mrff`` model has groups to federate."""
        if self.model_name != "mrff":
            raise ConfigError(f"algorithm '{self.name}' trains the 'mrff' model (got model '{self.model_name}')")
        if str(options.get("balance", "counts")).strip() == "soft":
            raise ConfigError("model option balance=soft averages the gate over the batch's users; a federated "
                              "user trains alone, so federated MRFF uses balance=counts (the last round's shares)")
        return options


class FedMRFFNoGroups(FedMRFF):
    """MRFF with one group per layer (the ablation "without groups")."""

    name = "mrff-nogroups"

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Force ``groups = 1``; a different explicit value is an error, not a silent fix."""
        options = super().check_options(options)
        given = {k: v for k, v in options.items() if k.replace("-", "_") == "groups"}
        if any(str(v).strip() != "1" for v in given.values()):
            raise ConfigError(f"algorithm 'mrff-nogroups' uses groups = 1 (got groups = {list(given.values())[0]})")
        return {**{k: v for k, v in options.items() if k not in given}, "groups": 1}
