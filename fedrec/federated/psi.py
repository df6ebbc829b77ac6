"""Private set intersection of two nodes' users (Diffie-Hellman style, over NIST P-256).

Cross-domain transfer shares rows of a user table between domains, so the domains must agree
on which users they have in common, without either revealing its other users to the other
domain or to the server. This is the classic commutative-blinding protocol (Meadows 1986;
Huberman, Franklin, Hogg 1999), semi-honest, run through the server, which only relays:

1. each node ``d`` draws a secret scalar ``k_d`` and sends ``X_d = {H(u)^k_d : u in U_d}``
   (``H`` hashes a raw user id onto the curve by try-and-increment over SHA-256), shuffled;
2. each node raises the other node's ``X_e`` to its own key: ``X_e^k_d``, in ``e``'s order;
3. node ``e`` receives ``X_e^k_d`` (its own users, doubly blinded, in its own order) and keeps
   ``X_d^k_e`` from step 2: its users whose doubly blinded value occurs in ``X_d^k_e`` are
   the intersection (``H(u)^(k_d k_e)`` is the same value on both sides).

Points are written as 33-byte compressed encodings; "raising" is elliptic-curve scalar
multiplication, done with the ``cryptography`` package's ECDH (which returns the x
coordinate; ``x(k P) = x(k (-P))``, so working on x coordinates keeps the maps commutative).

**What each party learns** (semi-honest parties, that is parties that follow the protocol;
P-256's decisional Diffie-Hellman assumption): each node learns the size of the other's user
set and which of its own users the other holds, i.e. the intersection, and nothing about the
other's remaining users. The server learns the two set sizes and the size of the
intersection (it relays both doubly blinded sets and can match them), not who is in them.
Not covered: a dishonest node can probe for chosen users by putting them in its own set
(inherent to any PSI whose inputs are unchecked; the set sizes are visible to the server);
a dishonest *server* could ask a node to raise points of its own choosing (e.g. the hashes
of every possible id) and so recover the node's users — a node raises one set per key, but
nothing authenticates that set as the other node's (authenticated channels between the
domains are not implemented). Keys are fresh per run and never leave their node.

The shared rows are then numbered the same way on both sides without exchanging anything
more: the common users in the order of their doubly blinded values, which both nodes hold
and which the server cannot link to users (numbering by raw id would let it, on dense id
spaces). A new run draws new keys and so a new numbering; a resumed run keeps each node's
numbering from its checkpointed private state.
"""

from __future__ import annotations

import hashlib
import secrets

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec

from fedrec.errors import ConfigError

__all__ = ["new_key", "key_to_int", "key_from_int", "hash_users", "blind", "intersect", "shared_rows",
           "POINT_BYTES", "run_two_party"]

_CURVE = ec.SECP256R1()
POINT_BYTES = 33
_DOMAIN_TAG = b"fedrec-psi/1|"


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh secret scalar (an ECDH private key on P-256)."""
    return ec.generate_private_key(_CURVE)


def key_to_int(key: ec.EllipticCurvePrivateKey) -> int:
    """The key's scalar (to persist it in a node's own state between protocol steps)."""
    return key.private_numbers().private_value


def key_from_int(value: int) -> ec.EllipticCurvePrivateKey:
    """Inverse of :func:`key_to_int`."""
    return ec.derive_private_key(int(value), _CURVE)


def _to_point(x: bytes) -> ec.EllipticCurvePublicKey:
    return ec.EllipticCurvePublicKey.from_encoded_point(_CURVE, b"\x02" + x)


def _hash_one(raw: int) -> bytes:
    for counter in range(1 << 16):
        x = hashlib.sha256(_DOMAIN_TAG + counter.to_bytes(2, "big") + str(int(raw)).encode()).digest()
        try:
            _to_point(x)
        except ValueError:  # not the x coordinate of a curve point: try the next counter
            continue
        return x
    raise RuntimeError("hash to curve failed")  # pragma: no cover - probability 2^-65536


def hash_users(raw_users: np.ndarray) -> list[bytes]:
    """``H(u)`` for every raw user id: x coordinates of curve points (32 bytes each)."""
    return [_hash_one(int(u)) for u in np.asarray(raw_users).reshape(-1)]


def blind(points: list[bytes], key: ec.EllipticCurvePrivateKey) -> list[bytes]:
    """Every point raised to ``key`` (scalar multiplication), as x coordinates. A value that
    is not a curve point is a :class:`~fedrec.errors.ConfigError` (a corrupt or forged set)."""
    out = []
    for i, x in enumerate(points):
        try:
            out.append(key.exchange(ec.ECDH(), _to_point(bytes(x))))
        except ValueError:
            raise ConfigError(f"private set intersection: value {i} of the other party's set is not a point of "
                              "the curve") from None
    return out


def to_array(values: list[bytes]) -> np.ndarray:
    """``(n, 32)`` uint8 array of x coordinates (how sets travel in Flower records)."""
    if not values:
        return np.zeros((0, 32), dtype=np.uint8)
    return np.frombuffer(b"".join(values), dtype=np.uint8).reshape(len(values), 32).copy()


def from_array(array: np.ndarray) -> list[bytes]:
    """Inverse of :func:`to_array` (checks the shape)."""
    a = np.asarray(array, dtype=np.uint8)
    if a.ndim != 2 or a.shape[1] != 32:
        raise ConfigError(f"private set intersection: expected an (n, 32) array of points (got shape {a.shape})")
    return [bytes(row) for row in a]


def intersect(own_double: list[bytes], other_double: list[bytes]) -> np.ndarray:
    """Positions (into the node's own, unshuffled order) of its users in the intersection:
    ``own_double`` its users' doubly blinded values in its own order, ``other_double`` the
    other node's doubly blinded values."""
    other = set(other_double)
    return np.flatnonzero(np.fromiter((x in other for x in own_double), dtype=bool, count=len(own_double)))


def shared_rows(n_users: int, common: np.ndarray, double: list[bytes]) -> np.ndarray:
    """Row of every one of ``n_users`` users in the shared table: ``0`` for users outside the
    intersection, ``1..m`` for the ``m`` common users (positions ``common``) in the order of
    their doubly blinded values ``double`` (aligned with ``common``): the same numbering on
    both sides, and one the server, which sees those values but cannot link them to users,
    learns nothing from."""
    rows = np.zeros(int(n_users), dtype=np.int64)
    order = np.asarray(common, dtype=np.int64)[np.argsort(np.array(double, dtype=object), kind="stable")]
    rows[order] = np.arange(1, len(order) + 1)
    return rows


def shuffle(n: int) -> np.ndarray:
    """A secret random permutation of ``n`` positions (the order a node sends its set in)."""
    rng = np.random.default_rng(secrets.randbits(128))
    return rng.permutation(n)


def run_two_party(raw_a: np.ndarray, raw_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The whole protocol in one process (tests, in-process algorithms): the shared row of
    every user of ``a`` and of ``b`` (see :func:`shared_rows`)."""
    ka, kb = new_key(), new_key()
    pa, pb = shuffle(len(raw_a)), shuffle(len(raw_b))
    xa = blind(hash_users(np.asarray(raw_a)[pa]), ka)
    xb = blind(hash_users(np.asarray(raw_b)[pb]), kb)
    xb_a, xa_b = blind(xb, ka), blind(xa, kb)  # step 2 at a and at b
    hit_a, hit_b = intersect(xa_b, xb_a), intersect(xb_a, xa_b)
    return (shared_rows(len(raw_a), pa[hit_a], [xa_b[i] for i in hit_a]),
            shared_rows(len(raw_b), pb[hit_b], [xb_a[i] for i in hit_b]))
