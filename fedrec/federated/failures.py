"""Simulated client failures and stragglers: the run options ``client-failure``,
``stragglers`` and ``straggler-delay`` (:class:`~fedrec.federated.spec.RunSpec`).

Each training round the server draws, from the run's ``seed`` and the round alone, an exact
number of clients:

* ``floor(client-failure * clients)`` **failing** clients: told (in their train message) to
  fail, each answers with an error reply without training — what a crashed ClientApp looks
  like to the server. Its private state stays as it was (and is checkpointed as this
  round's, so kill-and-resume stays exact). The history records them under ``train.failed`` with the reason
  ``simulated failure (client-failure F)``.
* then, among the others, ``floor(stragglers * clients)`` **stragglers**: each trains (its
  private state moves on, as a real slow device's would) and replies ``straggler-delay``
  seconds late. With a ``round-timeout`` below the delay the server aggregates without
  them; ``train.failed`` says ``straggler: no reply before round-timeout T s (simulated
  delay D s)``, and ``train.stragglers`` lists every straggler of the round.

``clients`` is the number of nodes asked that round (``shards`` when all are connected). The
draw ranks the clients by a SHA-256 hash of ``(kind, seed, round, client id)`` and takes the
first ones, so it is the same in every runtime (``fedrec simulate`` in process, ``flwr run``
on Ray, a deployment) and independent of node ids, which differ between runtimes.

Failures and stragglers apply to **training replies only**: every client is still asked to
evaluate and answers, so validation and test metrics cover all users.

Where delay is real (``flwr run``, a deployment) the straggler sleeps in its ClientApp's mod
(:func:`simulated_failure_mod`); the in-process runner (:class:`fedrec.federated.runner.InProcessGrid`,
synchronous delivery) does not sleep: it runs the ClientApp under :func:`virtual_clock`,
which adds the delay to a simulated clock, and drops a reply whose simulated delay exceeds
the round's timeout (only the simulated delay counts against the timeout there, not compute
time). On a real runtime a straggler's evaluate message waits behind its late train reply,
so keep ``straggler-delay`` below twice ``round-timeout`` (minus the evaluation's own time),
or evaluation rounds time out for it too.

Unless ``min-nodes`` is set, a training round goes on when the clients not drawn reply
(``clients - failing - stragglers``); evaluation still needs all of them.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import math
import time
from dataclasses import dataclass
from typing import Iterator

from flwr.app import ConfigRecord, Error, Message, RecordDict

from fedrec.errors import ConfigError

__all__ = ["FailurePlan", "drawn_count", "draw_clients", "simulated_failure_mod", "virtual_clock", "wait",
           "check_failure_counts"]

FAILURE_KEY = "simulate-failure"
DELAY_KEY = "simulate-delay"
_ERROR_CODE = 2  # flwr's ErrorCode.CLIENT_APP_RAISED_EXCEPTION: what a crashed ClientApp reports
_clock: contextvars.ContextVar[list[float] | None] = contextvars.ContextVar("fedrec_virtual_clock", default=None)


def drawn_count(fraction: float, clients: int) -> int:
    """``floor(fraction * clients)`` (robust to the float error of e.g. ``0.29 * 100``)."""
    return int(math.floor(fraction * clients + 1e-9))


def _rank(kind: str, seed: int, round: int, client: int) -> bytes:
    return hashlib.sha256(f"fedrec/{kind}/seed={seed}/round={round}/client={client}".encode()).digest()


def draw_clients(clients: list[int], *, fraction: float, seed: int, round: int, kind: str) -> list[int]:
    """The ``floor(fraction * len(clients))`` clients of ``clients`` (client ids) drawn for
    ``kind`` in ``round``: those with the smallest hash of ``(kind, seed, round, id)``;
    sorted."""
    k = drawn_count(fraction, len(clients))
    return sorted(sorted(clients, key=lambda c: _rank(kind, seed, round, c))[:k])


def check_failure_counts(*, client_failure: float, stragglers: float, clients: int, min_nodes: int = 0) -> None:
    """Refuse failure options that do nothing or leave no client: a fraction > 0 that draws
    no client of ``clients``, failures and stragglers that draw every client, or a
    ``min-nodes`` no round could reach."""
    failing, slow = drawn_count(client_failure, clients), drawn_count(stragglers, clients)
    for key, fraction, n in (("client-failure", client_failure, failing), ("stragglers", stragglers, slow)):
        if fraction > 0 and n == 0:
            raise ConfigError(f"run config '{key}' {fraction:g} of {clients} client(s) draws floor({fraction * clients:.3g}) "
                              f"= 0 clients per round (raise it to at least 1/{clients})")
    if failing + slow >= clients:
        raise ConfigError(f"run config 'client-failure' {client_failure:g} and 'stragglers' {stragglers:g} draw "
                          f"{failing} + {slow} of {clients} client(s) per round: no client would reply")
    if min_nodes and min_nodes > clients - failing - slow:
        raise ConfigError(f"run config 'min-nodes' {min_nodes} is more than the {clients - failing - slow} of {clients} "
                          f"client(s) that reply in a round with 'client-failure' {client_failure:g} and "
                          f"'stragglers' {stragglers:g}: every round would stop the run")


@dataclass(frozen=True)
class FailurePlan:
    """The server's side of the simulated failures: draws the clients of a round and marks
    their train messages; explains the missing replies (for the history)."""

    client_failure: float = 0.0
    stragglers: float = 0.0
    delay: float = 0.0
    seed: int = 0
    timeout: float = 0.0  #: the round's timeout (0: Flower's default), for the history's reasons

    @property
    def active(self) -> bool:
        """Whether any client is ever drawn."""
        return self.client_failure > 0 or self.stragglers > 0

    def missing(self, clients: int) -> int:
        """Clients of ``clients`` drawn each round (failing + stragglers)."""
        return drawn_count(self.client_failure, clients) + drawn_count(self.stragglers, clients)

    def draw(self, clients: list[int], round: int) -> tuple[list[int], list[int]]:
        """``(failing, stragglers)`` client ids of ``round`` among ``clients``; stragglers
        are drawn from the clients that do not fail, their number from all ``clients``."""
        failing = draw_clients(clients, fraction=self.client_failure, seed=self.seed, round=round, kind="failure")
        rest = [c for c in clients if c not in set(failing)]
        k = drawn_count(self.stragglers, len(clients))
        slow = sorted(sorted(rest, key=lambda c: _rank("straggler", self.seed, round, c))[:k])
        return failing, slow

    def mark(self, messages: list[Message], node_clients: dict[int, int], round: int
             ) -> tuple[list[Message], dict[int, str], list[dict]]:
        """Mark this round's train ``messages``: the failing clients' with
        ``simulate-failure``, the stragglers' with ``simulate-delay``. Returns the messages,
        per node the reason its reply may be missing, and the stragglers (client, delay)."""
        ids = {m.metadata.dst_node_id: (c if (c := node_clients.get(m.metadata.dst_node_id, -1)) >= 0
                                        else int(m.metadata.dst_node_id)) for m in messages}
        failing, slow = self.draw(sorted(set(ids.values())), round)
        wait_s = f"{self.timeout:g} s" if self.timeout else "its default"
        reasons: dict[int, str] = {}
        out = []
        for msg in messages:
            node, client = msg.metadata.dst_node_id, ids[msg.metadata.dst_node_id]
            extra = {}
            if client in failing:
                extra[FAILURE_KEY] = f"simulated failure (client-failure {self.client_failure:g})"
                reasons[node] = extra[FAILURE_KEY]
            elif client in slow:
                extra[DELAY_KEY] = float(self.delay)
                reasons[node] = (f"straggler: no reply before round-timeout {wait_s} "
                                 f"(simulated delay {self.delay:g} s)")
            if extra:  # Flower builds one content for all messages: give this one its own
                content = RecordDict(dict(msg.content.items()))
                content["config"] = ConfigRecord({**dict(msg.content["config"]), **extra})
                msg.content = content
            out.append(msg)
        return out, reasons, [{"client": int(c), "delay": float(self.delay)} for c in slow]


# -- client side ---------------------------------------------------------------------------
@contextlib.contextmanager
def virtual_clock() -> Iterator[list[float]]:
    """Within this block :func:`wait` adds to the yielded clock (``clock[0]``, seconds)
    instead of sleeping: the in-process runner's simulated time."""
    clock = [0.0]
    token = _clock.set(clock)
    try:
        yield clock
    finally:
        _clock.reset(token)


def wait(seconds: float) -> None:
    """Sleep ``seconds``, or advance the :func:`virtual_clock` when one is running."""
    clock = _clock.get()
    if clock is not None:
        clock[0] += seconds
    else:
        time.sleep(seconds)


def simulated_failure_mod(msg: Message, context, call_next) -> Message:
    """The ClientApp mod of simulated failures: a train message marked ``simulate-failure``
    gets an error reply without any training (as from a crashed ClientApp; its unchanged
    private state still counts as this round's, for checkpoints and the saved model:
    :func:`fedrec.federated.node.client_skip_round`); one marked
    ``simulate-delay`` is trained and its reply is held back that many seconds
    (:func:`wait`). Other messages pass through."""
    config = msg.content.config_records.get("config") if msg.metadata.message_type == "train" else None
    if config is None:
        return call_next(msg, context)
    reason = config.get(FAILURE_KEY)
    if reason:
        from fedrec.federated.node import client_skip_round

        client_skip_round(msg, context)  # no training; the state of this round is the last one
        return Message(Error(code=_ERROR_CODE, reason=str(reason)), reply_to=msg)
    reply = call_next(msg, context)
    delay = float(config.get(DELAY_KEY, 0.0))
    if delay > 0:
        wait(delay)
    return reply
