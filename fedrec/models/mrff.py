"""MRFF — Multifaceted User Modeling in Recommendation with Federated Foundation models.

Chunxu Zhang, Guodong Long, Hongkuan Guo, Zhaojie Liu, Guorui Zhou, Zijian Zhang, Yang Liu,
Bo Yang. "Multifaceted User Modeling in Recommendation: A Federated Foundation Models
Approach", AAAI 2025 (arXiv 2412.16969).

Each Transformer block's feed-forward part is the sum of

* a **user-specific FFN** (private: one per user, stacked by user index, never shared), and
* one of ``G`` **group FFNs** shared by the users routed to it, chosen per user and per
  layer by a **group gating network** on ``[mean of the layer's hidden states over real
  positions ; user-profile embedding]`` with a softmax.

Because layer ``l``'s gate reads layer ``l``'s hidden states, a user can join different
groups at different layers (hierarchical groups, ``G ** L`` combinations).

Options (beyond the backbone's, see :mod:`fedrec.models.backbone`):

``groups`` (G, 4)
    Group FFNs per layer; each is an independent module (the public reference code repeats
    one module, so all its "groups" share weights — not copied).
``top_k`` (1)
    Groups per user and layer.
``gate`` (``scaled``)
    ``hard``: the chosen groups' outputs are summed unscaled, as in the reference code, so
    the router learns only through the balance loss (kept for reproduction: its routing
    collapses, see the README's group-routing results). ``scaled``: each chosen group's
    output is multiplied by its gate probability (Switch Transformer), so the task loss
    trains the router too.
``gate_noise`` (0)
    Standard deviation of Gaussian noise added to the gate logits in training (noisy top-k
    gating, Shazeer et al. 2017): exploration, so that a group is not abandoned for good.
``z_loss`` (0)
    Weight of the router z-loss ``mean(logsumexp(logits) ** 2)`` per layer (ST-MoE, Zoph et
    al. 2022): keeps the gate logits small, so a fresh Adam's fixed-size steps do not push
    the softmax into saturation.
``entropy`` (0)
    Weight of the mean entropy of each user's gate distribution per layer: > 0 makes each
    user commit to a group (with the balance loss, which spreads users, this maximises the
    mutual information between users and groups).
``balance`` (``counts``)
    ``f`` of the balance loss: ``counts``, the share of users routed to each group (counted;
    federated, the previous round's counts, as in the reference), or ``soft``, the mean
    gate probability of the batch's users, with its gradient (so the loss is
    ``alpha * G * sum_g P_g ** 2``, minimal when the batch's users spread evenly). ``soft``
    needs several users in a batch, so it is centralised only (federated, a batch is one
    user).
``router_detach`` (true, except with ``gate=hard``)
    The router's auxiliary losses (balance, z-loss, entropy) train the gate only, not its
    inputs (the hidden states and the user's profile embedding). Federated, ``f`` is the
    same for every user, so a balance gradient that reaches the inputs pushes every user's
    private profile embedding the same way each round, and the whole population jumps
    from group to group together. ``gate=hard`` keeps the reference behaviour (false).
``gate_input`` (``both``)
    What the gate reads: ``both`` (the reference: mean hidden state and user profile) or
    ``history`` (the mean hidden state only).
``router_lr`` (1.0)
    Multiplier of the learning rate of the gate parameters (centralised: their own
    optimiser group; federated: their local step), e.g. 0.1 so the shared router moves by
    a tenth of ``lr`` per round instead of ``lr``.
``residual`` (false)
    Add ``z`` around the gated FFN (the reference has no residual there).
``alpha`` (0.1)
    Weight of the Switch-Transformer balance loss ``alpha * G * sum_g f_g * P_g`` per layer,
    ``f_g`` the share of users routed to ``g`` (counted, no gradient) and ``P_g`` the mean
    gate probability. Centrally ``f`` comes from the batch; federated, from the previous
    round's counts (``context["group_share"]``).
``dispatch`` (false)
    Run each group FFN only on the users routed to it instead of on every user (the same
    function, G / top_k times less group-FFN work; about 1.4x faster training, see
    ``simulations/bench_training.py``).
    Only where the batch is not under ``torch.func.vmap``: the federated engine keeps the
    dense form. Off by default because dropout then draws other random numbers, so
    recorded results would not repeat bit for bit.
``user_ffn`` (true), ``user_hidden`` (0 = ``dim``)
    The private user FFN and its hidden width (a small width is a low-rank private FFN:
    ``2 * dim * user_hidden + user_hidden + dim`` parameters per user and layer). Its
    parameters are stored in sparse embedding tables (one row per user), so an optimiser
    step touches only the batch's users — the semantics of one model per user.
``user_init`` (``copy``)
    ``copy``: every user's private FFN starts as one shared random FFN (as when each client
    copies the initial model); ``zero``: its output layer starts at zero, so every user
    starts exactly at its group's FFN and the private part grows only as far as the user's
    own data push it.
``user_decay`` (0)
    L2 weight on the batch users' private FFN rows, added to the loss: shrinkage toward
    zero, i.e. (with ``user_init=zero``) toward the user's group FFN. It reaches the sparse
    per-user tables in centralised and federated training alike.
``user_scale`` (``none``), ``user_k`` (10)
    ``history``: the private FFN's output is multiplied by ``n / (n + user_k)``, ``n`` the
    number of real positions of the user's sequence, so a user with a short history leans
    on its group and a long one on itself.

Evaluation routes only with groups that were trained: when the batch carries
``group_alive`` (``(layers, G)`` booleans: groups with at least one member in the last
training round, which the federated engine passes), an untrained group's gate logit is
masked before the choice outside training.

Parameter roles: group FFN ``g`` of layer ``l`` -> ``group(l, g)``; user FFNs, user-profile
and user-id embeddings -> ``private`` (per-user tables stacked by user index); the rest
(item embeddings, positions, attention, norms, gates, head) -> ``public``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedrec.errors import ConfigError
from fedrec.models.backbone import BackboneConfig, SequenceModel
from fedrec.models.base import PRIVATE, PRIVATE_PER_USER, PUBLIC, ModelData, ParamRole, group_role
from fedrec.models.layers import PositionwiseFFN

__all__ = ["MRFFConfig", "MRFF", "GroupGatedFFN", "UserFFN"]


@dataclass
class MRFFConfig(BackboneConfig):
    """Backbone options plus MRFF's (see the module docstring)."""

    groups: int = 4
    top_k: int = 1
    gate: str = "scaled"
    gate_noise: float = 0.0
    z_loss: float = 0.0
    entropy: float = 0.0
    balance: str = "counts"
    router_lr: float = 1.0
    router_detach: bool | None = None
    gate_input: str = "both"
    residual: bool = False
    alpha: float = 0.1
    user_ffn: bool = True
    user_hidden: int = 0
    user_init: str = "copy"
    user_decay: float = 0.0
    user_scale: str = "none"
    user_k: float = 10.0
    dispatch: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.groups, int) or self.groups < 1:
            raise ConfigError(f"model option 'groups' must be a positive integer (got {self.groups!r})")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.groups:
            raise ConfigError(f"model option 'top_k' must be in 1..groups ({self.groups}) (got {self.top_k!r})")
        if self.gate not in ("hard", "scaled"):
            raise ConfigError(f"model option 'gate' must be hard or scaled (got {self.gate!r})")
        if self.alpha < 0:
            raise ConfigError(f"model option 'alpha' must be >= 0 (got {self.alpha})")
        if self.user_hidden < 0:
            raise ConfigError(f"model option 'user_hidden' must be >= 0 (got {self.user_hidden})")
        for name in ("gate_noise", "z_loss", "entropy", "user_decay"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"model option '{name}' must be >= 0 (got {getattr(self, name)})")
        if not self.router_lr > 0:
            raise ConfigError(f"model option 'router_lr' must be > 0 (got {self.router_lr})")
        if not self.user_k > 0:
            raise ConfigError(f"model option 'user_k' must be > 0 (got {self.user_k})")
        if self.router_detach is None:
            self.router_detach = self.gate != "hard"
        if self.gate_input not in ("both", "history"):
            raise ConfigError(f"model option 'gate_input' must be both or history (got {self.gate_input!r})")
        if self.balance not in ("counts", "soft"):
            raise ConfigError(f"model option 'balance' must be counts or soft (got {self.balance!r})")
        if self.user_init not in ("copy", "zero"):
            raise ConfigError(f"model option 'user_init' must be copy or zero (got {self.user_init!r})")
        if self.user_scale not in ("none", "history"):
            raise ConfigError(f"model option 'user_scale' must be none or history (got {self.user_scale!r})")
        if not self.user_ffn and (self.user_decay or self.user_scale != "none" or self.user_init != "copy"
                                  or self.user_hidden):
            raise ConfigError("model options user_hidden / user_init / user_decay / user_scale need user_ffn = true")


class UserFFN(nn.Module):
    """Per-user position-wise FFNs ``dim -> hidden -> dim``, stacked by user index.

    Each table row holds one user's flattened weights; every user starts from the same
    initial FFN (as when each client copies the initial global model).
    """

    def __init__(self, n_users: int, dim: int, hidden: int, dropout: float, *, zero_out: bool = False) -> None:
        super().__init__()
        self.dim, self.hidden = dim, hidden
        proto = PositionwiseFFN(dim, hidden)
        self.inner = nn.Embedding(n_users + 1, dim * hidden + hidden, sparse=True)
        self.outer = nn.Embedding(n_users + 1, hidden * dim + dim, sparse=True)
        with torch.no_grad():
            self.inner.weight.copy_(torch.cat([proto.inner.weight.T.reshape(-1), proto.inner.bias]).expand_as(self.inner.weight))
            self.outer.weight.copy_(torch.cat([proto.outer.weight.T.reshape(-1), proto.outer.bias]).expand_as(self.outer.weight))
            if zero_out:  # every user starts exactly at its group (LoRA-style zero output layer)
                self.outer.weight.zero_()
        self.drop = nn.Dropout(dropout)

    def per_user(self) -> int:
        """Private parameters per user of this layer."""
        return self.inner.weight.shape[1] + self.outer.weight.shape[1]

    def penalty(self, users: torch.Tensor) -> torch.Tensor:
        """Sum of squares of ``users``' rows (each user once per batch position it has)."""
        return self.inner(users).pow(2).sum() + self.outer(users).pow(2).sum()

    def forward(self, z: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        """``(B, T, dim)`` hidden states of ``(B,)`` users -> ``(B, T, dim)``."""
        d, h = self.dim, self.hidden
        inner = self.inner(users)  # (B, d*h + h)
        outer = self.outer(users)
        w1, b1 = inner[:, : d * h].view(-1, d, h), inner[:, d * h :]
        w2, b2 = outer[:, : h * d].view(-1, h, d), outer[:, h * d :]
        x = self.drop(F.relu(torch.bmm(z, w1) + b1.unsqueeze(1)))
        return self.drop(torch.bmm(x, w2) + b2.unsqueeze(1))


class GroupGatedFFN(nn.Module):
    """One MRFF block's FFN part: gate -> chosen group FFN(s) + the user's private FFN."""

    def __init__(self, cfg: MRFFConfig, data: ModelData, layer: int, user_width: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.gate = nn.Linear(cfg.dim + (user_width if cfg.gate_input == "both" else 0), cfg.groups)
        self.group_ffns = nn.ModuleList(PositionwiseFFN(cfg.dim, cfg.dim, dropout=cfg.dropout) for _ in range(cfg.groups))
        self.user_ffn = (UserFFN(data.n_users, cfg.dim, cfg.user_hidden or cfg.dim, cfg.dropout,
                                 zero_out=cfg.user_init == "zero") if cfg.user_ffn else None)

    def forward(self, z: torch.Tensor, context: dict[str, Any]) -> torch.Tensor:
        """``(B, T, dim)`` -> ``(B, T, dim)``; appends this layer's routing to ``context``."""
        keep = context["keep"]  # (B, T, 1)
        real = keep.sum(1).clamp(min=1.0)
        summary = (z * keep).sum(1) / real  # mean over real positions
        gate_in = torch.cat([summary, context["user_repr"]], dim=-1) if self.cfg.gate_input == "both" else summary
        logits = self.gate(gate_in)  # (B, G)
        noise = None
        if self.training and self.cfg.gate_noise > 0:
            noise = self.cfg.gate_noise * torch.randn_like(logits)
            logits = logits + noise
        alive = context.get("group_alive")
        if alive is not None and not self.training:
            # route only to groups trained in the last round (a layer with none: no mask)
            mask = alive[..., self.layer, :].to(torch.bool)
            mask = mask | ~mask.any(-1, keepdim=True)
            logits = logits.masked_fill(~mask, float("-inf"))
        probs = F.softmax(logits, dim=-1)  # (B, G)
        choice = probs.topk(self.cfg.top_k, dim=-1).indices  # (B, k)
        chosen = torch.zeros_like(probs).scatter(1, choice, 1.0)
        weights = chosen * probs if self.cfg.gate == "scaled" else chosen
        # G is small: run every group FFN and keep the chosen ones (no data-dependent
        # branch, so the layer also runs under torch.func.vmap; an unchosen group gets an
        # exactly zero gradient)
        out = torch.zeros_like(z)
        if self.cfg.dispatch and not context.get("vmap_safe", False):
            for g, ffn in enumerate(self.group_ffns):  # only the users routed to g
                rows = chosen[:, g].nonzero(as_tuple=True)[0]
                # also when none is: an empty batch gives g an exactly zero gradient, as the
                # dense form does (None would make Adam skip g's momentum step)
                out = out.index_add(0, rows, weights[rows, g].view(-1, 1, 1) * ffn(z[rows]))
        else:
            for g, ffn in enumerate(self.group_ffns):
                out = out + weights[:, g].view(-1, 1, 1) * ffn(z)
        if self.user_ffn is not None:
            private = self.user_ffn(z, context["user"])
            if self.cfg.user_scale == "history":
                n = keep.sum(1, keepdim=True)  # (B, 1, 1) real positions
                private = private * (n / (n + self.cfg.user_k))
            out = out + private
        if self.cfg.residual:
            out = out + z
        entry = {"probs": probs, "choice": choice, "logits": logits, "gate_in": gate_in}
        if self.cfg.router_detach and self.training:
            # the auxiliary losses see the same routing, with gradients for the gate only
            aux_logits = self.gate(gate_in.detach())
            if noise is not None:
                aux_logits = aux_logits + noise
            entry["aux_logits"], entry["aux_probs"] = aux_logits, F.softmax(aux_logits, dim=-1)
        context["routing"].append(entry)
        return out


class MRFF(SequenceModel):
    """MRFF on the causal (SASRec-style) or bidirectional backbone (``bidirectional``)."""

    def __init__(self, data: ModelData, cfg: MRFFConfig) -> None:
        # the gate reads e_u, so its width is the user encoder's (built before the blocks)
        super().__init__(data, cfg, make_ffn=lambda layer: GroupGatedFFN(cfg, data, layer, self.users.width))

    def auxiliary_loss(self, out: dict[str, Any]) -> torch.Tensor:
        """The balance loss, summed over layers (0 when ``alpha`` is 0), plus the router
        z-loss, the gate-entropy term and the private-FFN shrinkage when switched on."""
        cfg = self.cfg
        context = out["context"]
        routing = context["routing"]
        total = self.balance_loss(routing, context.get("group_share"))
        for r in routing:
            if cfg.z_loss:
                total = total + cfg.z_loss * torch.logsumexp(r.get("aux_logits", r["logits"]), dim=-1).pow(2).mean()
            if cfg.entropy:
                p = r.get("aux_probs", r["probs"])
                total = total + cfg.entropy * -(p * torch.log(p.clamp(min=1e-9))).sum(-1).mean()
        if cfg.user_decay and cfg.user_ffn:
            users = context["user"]
            for ffn in self.ffns:
                total = total + cfg.user_decay * ffn.user_ffn.penalty(users) / users.shape[0]
        return total

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers by parameter name (the gates', ``router_lr``)."""
        if self.cfg.router_lr == 1.0:
            return {}
        return {n: self.cfg.router_lr for n, _ in self.named_parameters() if ".gate." in n}

    def balance_loss(self, routing: list[dict[str, torch.Tensor]], group_share: torch.Tensor | None = None) -> torch.Tensor:
        """``alpha * G * sum_g f_g * P_g`` summed over layers.

        ``group_share`` (``(layers, G)``, optional) gives ``f`` from outside (the previous
        federated round); otherwise ``f`` is the batch's share of users per group.
        """
        cfg = self.cfg
        total = routing[0]["probs"].new_zeros(())
        if cfg.alpha == 0:
            return total
        for layer, r in enumerate(routing):
            probs = r.get("aux_probs", r["probs"])
            if cfg.balance == "soft":  # the batch's mean probabilities, with their gradient
                mean = probs.mean(0)
                total = total + cfg.alpha * cfg.groups * (mean * mean).sum()
                continue
            if group_share is not None:
                f = group_share[layer].to(probs)
            else:
                f = torch.zeros(cfg.groups, device=probs.device).scatter_add(
                    0, r["choice"].reshape(-1), torch.ones(r["choice"].numel(), device=probs.device)
                ) / r["choice"].numel()
            total = total + cfg.alpha * cfg.groups * (f.detach() * probs.mean(0)).sum()
        return total

    def parameter_roles(self) -> dict[str, ParamRole]:
        """Groups -> ``group(l, g)``; user FFNs and user embeddings -> private; rest public."""
        roles = {}
        for name, _ in self.named_parameters():
            parts = name.split(".")
            if parts[0] == "ffns" and parts[2] == "group_ffns":
                roles[name] = group_role(int(parts[1]), int(parts[3]))
            elif parts[0] == "ffns" and parts[2] == "user_ffn":
                roles[name] = PRIVATE_PER_USER
            elif name.startswith("users.id_embedding."):
                roles[name] = PRIVATE_PER_USER
            elif name.startswith("users.fields."):
                roles[name] = PRIVATE
            else:
                roles[name] = PUBLIC
        return roles

    def forward(self, batch: dict[str, torch.Tensor], mode: str = "train") -> Any:
        """The backbone's modes plus ``route``: the ``(B, layers)`` groups chosen (first of
        top-k), for ``torch.func.functional_call`` (the federated engine's routing report)."""
        if mode == "route":
            routing = self.encode(batch)["context"]["routing"]
            return torch.stack([r["choice"][:, 0] for r in routing], dim=1)
        return super().forward(batch, mode)

    @torch.no_grad()
    def route(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, layers)`` group chosen (first of top-k) per user and layer."""
        return self.forward(batch, mode="route")

    @torch.no_grad()
    def gate_inputs(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per layer, the ``(B, w)`` input of the group gating network (the user's history
        summary, with ``e_u`` where ``gate_input = both``): what a router can separate users by."""
        return [r["gate_in"] for r in self.encode(batch)["context"]["routing"]]
