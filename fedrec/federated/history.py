"""Per-round history of a federated run, best-round selection on validation, early stop.

Test metrics are computed at every evaluation round but only *read* at the round with the
best validation metric (:func:`fedrec.train.selection_metric`), as in centralised training.
"""

from __future__ import annotations

import math
import time
from typing import Any

from fedrec.errors import ConfigError
from fedrec.federated.spec import RunSpec
from fedrec.logs import RunLog
from fedrec.train import selection_metric

__all__ = ["RunHistory", "data_identity"]

#: run options a resumed run may change: where files go, how long to wait, how far to go,
#: where clients compute
_RESUME_FREE = ("rounds", "out", "checkpoint-dir", "checkpoint-every", "resume", "model-dir", "min-nodes",
                "round-timeout", "node-wait", "device", "log-dir", "patience")


def _clean(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, list):
            out[k] = v
            continue
        if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
            v = None  # JSON has no NaN/inf (an infinite epsilon: no noise)
        out[k] = round(v, 6) if isinstance(v, float) else v
    return out


def data_identity(infos: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """What the nodes hold, from their info replies (node id -> info): the catalogue's
    fingerprint and, per client id, its data spec and data fingerprint
    (:func:`fedrec.federated.nodedata.data_fingerprint`). Node ids are left out (a restarted
    node gets another)."""
    catalogues = sorted({str(i.get("catalogue-fingerprint")) for i in infos.values()})
    clients = sorted(({"client": int(i.get("client", -1)), "data": str(i.get("data")),
                       "fingerprint": i.get("data-fingerprint")} for i in infos.values()),
                     key=lambda c: (c["client"], str(c["fingerprint"])))
    return {"catalogue": catalogues[0] if len(catalogues) == 1 else catalogues, "clients": clients}


def _check_data(saved: dict[str, Any], mine: dict[str, Any]) -> None:
    """Refuse a resume over other data: another catalogue, or a client (present in both
    runs) whose data fingerprint differs; names the client and its data."""
    if saved.get("catalogue") != mine.get("catalogue"):
        raise ConfigError(f"resume: the checkpoint was trained on other data (the item catalogue's fingerprint is "
                          f"{saved.get('catalogue')} there, {mine.get('catalogue')} here); resume over the data it "
                          "was trained on, or start afresh without 'resume'")
    theirs = {c["client"]: c for c in saved.get("clients", [])}
    for c in mine.get("clients", []):
        old = theirs.get(c["client"])
        if old is not None and c["fingerprint"] is not None and old.get("fingerprint") is not None \
                and old["fingerprint"] != c["fingerprint"]:
            who = f"client {c['client']}" if c["client"] >= 0 else "a node"
            raise ConfigError(f"resume: {who}'s data {c['data']} is not what the checkpoint was trained on (data "
                              f"fingerprint {old['fingerprint']} there, {c['fingerprint']} here); resume over the same "
                              "data, or start afresh without 'resume'")


class RunHistory:
    """Collects round metrics; decides the best round and when to stop."""

    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec
        self.metric = selection_metric(spec.task, spec.federated.topk)
        self.rounds: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.best_score = -math.inf  # unrounded, so a slightly worse round never wins
        self.stale = 0
        self.stopped = False
        self.start = time.perf_counter()
        #: the experiment log of the rounds (the run config's ``log-dir``; see :mod:`fedrec.logs`),
        #: opened at its first line, after a resumed checkpoint was checked
        self._log: RunLog | None = None
        #: what the nodes hold (set by the server from their info: :func:`data_identity`);
        #: part of a resumed run's identity
        self.data: dict[str, Any] | None = None

    @property
    def log(self) -> RunLog:
        """The run's experiment log (opened on first use)."""
        if self._log is None:
            self._log = RunLog(self.spec.federated.log_dir or None, kind="round",
                               run={"command": "simulate",
                                    **{k: v for k, v in self.spec.to_flat().items() if k != "log-dir"}})
        return self._log

    def close(self) -> None:
        """Close the experiment log (idempotent)."""
        if self._log is not None:
            self._log.close()

    def record_train(self, round: int, metrics: dict[str, Any]) -> None:
        """Training metrics of ``round`` (loss, users)."""
        self.rounds.append({"round": round, "train": _clean(metrics)})
        if not self.should_evaluate(round):  # an evaluation round is logged with its validation
            self.log.write(round, {"train": self.rounds[-1]["train"]}, total=self.spec.federated.rounds)

    def record_eval(self, round: int, valid: dict[str, Any], test: dict[str, Any],
                    nodes: dict[str, Any] | None = None) -> None:
        """Evaluation of ``round`` (``nodes``: which clients replied and which nodes
        failed); updates the best round and the patience counter."""
        entry = next((r for r in self.rounds if r["round"] == round), None)
        if entry is None:
            entry = {"round": round}
            self.rounds.append(entry)
        entry["valid"], entry["test"] = _clean(valid), _clean(test)
        if nodes:
            entry["evaluate"] = nodes
        # the log shows what selects the round (validation), as the centralised log does
        self.log.write(round, {"train": entry.get("train", {}), "valid": entry["valid"]}, total=self.spec.federated.rounds)
        score = valid.get(self.metric)
        if self.spec.task == "ctr" and valid.get("auc") is None and not any("valid" in r for r in self.rounds
                                                                           if r is not entry):
            # the nodes' valid impressions are all of one class: no round could ever be selected
            raise ConfigError("task 'ctr': the valid impressions of all nodes have one label only, so AUC is "
                              "undefined; the data needs both clicks (1) and non-clicks (0) in its held-out rows "
                              "(or use --task next_item)")
        if score is not None and score > self.best_score:
            self.best, self.best_score, self.stale = entry, float(score), 0
        else:
            self.stale += 1
            if self.spec.federated.patience and self.stale >= self.spec.federated.patience:
                self.stopped = True

    def identity(self) -> dict[str, Any]:
        """What a resumed run must share with the run that wrote the checkpoint: every run
        option but those that only say where files go, how long to wait, or how far to go."""
        return {k: v for k, v in self.spec.to_flat().items() if k not in _RESUME_FREE}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the history after a restart (JSON-able)."""
        return {"rounds": self.rounds, "best-round": None if self.best is None else self.best["round"],
                "best-score": self.best_score, "stale": self.stale, "stopped": self.stopped,
                "elapsed": time.perf_counter() - self.start, "identity": self.identity(), "data": self.data}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`; a checkpoint of another run (another model, options,
        seed, data spec, ...), of other data under the same names (the catalogue or a node's
        data fingerprint differs: :attr:`data`, set before this call) or one that went past
        this run's ``rounds`` is a one-line :class:`~fedrec.errors.ConfigError` naming the
        first key that differs, or the data."""
        saved = state.get("identity")
        if saved is not None:  # checkpoints written before identities existed are not checked
            mine = self.identity()
            for key in sorted(set(saved) | set(mine)):
                if saved.get(key) != mine.get(key):
                    raise ConfigError(f"resume: the checkpoint is of another run ({key} = {saved.get(key)!r} there, "
                                      f"{mine.get(key)!r} here)")
        if state.get("data") is not None and self.data is not None:  # older checkpoints carry none
            _check_data(state["data"], self.data)
        trained = max((int(r["round"]) for r in state["rounds"] if "train" in r), default=0)
        if trained > self.spec.federated.rounds:
            raise ConfigError(f"resume: the checkpoint has trained {trained} rounds, more than this run's rounds "
                              f"({self.spec.federated.rounds})")
        self.rounds = state["rounds"]
        self.best = next((r for r in self.rounds if r["round"] == state["best-round"]), None)
        self.best_score = state["best-score"]
        # patience may differ from the saved run's: count the evaluations since the best round
        # again and stop (or not) under this run's patience
        best_round = self.best["round"] if self.best is not None else 0
        self.stale = sum(1 for r in self.rounds if "valid" in r and r["round"] > best_round)
        patience = self.spec.federated.patience
        self.stopped = bool(patience and self.stale >= patience)
        self.start = time.perf_counter() - state["elapsed"]

    def should_evaluate(self, round: int) -> bool:
        """Whether ``round`` is an evaluation round."""
        return round % self.spec.federated.eval_every == 0 or round == self.spec.federated.rounds

    def result(self) -> dict[str, Any]:
        """The run's JSON-ready summary: ``valid``/``test`` at the best round, ``history``
        (closes the experiment log)."""
        self.close()
        best = self.best or {}
        test = dict(best.get("test", {}))
        privacy = None
        if self.spec.federated.dp or self.spec.central_dp:
            # everything the server saw, every round up to the last one trained, not just the best
            trained = [r["train"] for r in self.rounds if "train" in r]
            last = trained[-1] if trained else {}
            eps = last.get("epsilon", 0.0)
            eps = None if eps is None or math.isinf(eps) else eps  # None: no noise, no guarantee
            test["epsilon"] = eps
            privacy = {"epsilon": eps, "delta": last.get("delta"), "noise-multiplier": last.get("noise-multiplier"),
                       "accountant": self.spec.federated.accountant if self.spec.federated.dp else "rdp"}
            from fedrec.federated.privacy import NEIGHBOURING, replace_one_epsilon

            releases = 1
            if self.spec.central_dp:
                privacy.update({"kind": "central (client level)", "clipping-norm": self.spec.central_clipping_norm,
                                "target-epsilon": self.spec.central_target_epsilon or None,
                                "neighbouring": NEIGHBOURING["central"]})
            else:
                from fedrec.federated.registry import ALGORITHMS

                algorithm = ALGORITHMS.create(self.spec.algorithm)
                kind = getattr(algorithm, "dp_kind", "local (user level)")
                releases = int(getattr(algorithm, "RELEASES_PER_ROUND", 1))
                privacy.update({"kind": kind, "max-grad-norm": self.spec.federated.max_grad_norm,
                                "target-epsilon": self.spec.federated.target_epsilon or None,
                                "neighbouring": getattr(algorithm, "dp_neighbouring", NEIGHBOURING["local"])})
            # the same releases under replace-one (twice the sensitivity: noise multiplier / 2)
            sigma, delta = last.get("noise-multiplier"), last.get("delta")
            if sigma and delta:
                eps1 = replace_one_epsilon(noise_multiplier=sigma, steps=len(trained) * releases, delta=delta,
                                           accountant=privacy["accountant"])
                privacy["epsilon-replace-one"] = None if math.isinf(eps1) else round(eps1, 6)
            # data-dependent and unnoised, so the clients do not send them (fedrec.federated.node)
            privacy["train-loss"] = "not reported under DP"
        out = {
            "algorithm": self.spec.algorithm,
            "model": self.spec.model or None,
            "data": self.spec.data,
            "task": self.spec.task,
            "protocol": "pooled" if self.spec.task == "ctr" else self.spec.federated.protocol,
            "selection": f"valid {self.metric}",
            "rounds": len([r for r in self.rounds if "train" in r]),
            "best_round": best.get("round"),
            "valid": best.get("valid", {}),
            "test": test,
            "history": self.rounds,
            "seconds": round(time.perf_counter() - self.start, 2),
            # where the log went is not an option of the run (and would put a path in results)
            "config": {k: v for k, v in self.spec.to_flat().items() if k != "log-dir"},
        }
        if privacy is not None:
            out["privacy"] = privacy
        return out
