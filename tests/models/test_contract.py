"""One contract, run over every registered model and every task it supports: forward, loss,
backward, state_dict round trip, parameter roles, and same seed -> same result."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedrec.data import load_dataset
from fedrec.data.batching import build_examples, iterate_batches
from fedrec.data.samplers import UniformNegativeSampler
from fedrec.data.split import split_dataset
from fedrec.models.base import ModelData
from fedrec.models.registry import MODELS, create_model
from fedrec.train import TrainConfig, train

SMALL = {"dim": 16, "field-dim": 4, "layers": 2, "max-len": 8, "dropout": 0.1}


@pytest.fixture(scope="module")
def single_domain():
    return split_dataset(load_dataset("synthetic:users=40,items=60,groups=2,min_len=6,max_len=12,seed=1"))


@pytest.fixture(scope="module")
def two_domains():
    return split_dataset(load_dataset("synthetic:users=40,items=60,groups=2,min_len=6,max_len=12,seed=1,"
                                      "domains=2,overlap=0.5"))


@pytest.fixture(scope="module")
def rated():
    """Single-domain data whose rows carry a rating (``behaviours=2``): CRM's condition."""
    return split_dataset(load_dataset("synthetic:users=40,items=60,groups=2,min_len=6,max_len=12,seed=1,behaviours=2"))


#: models that need a per-row value (rating) in the data, and multi-domain data
NEEDS_RATING = ("crm",)
NEEDS_DOMAINS = ("moment_cross",)


@pytest.fixture()
def split(request, single_domain, two_domains, rated):
    """The data of the case's task: cross-domain (``cdr``) needs two domains, CRM a rating."""
    params = request.node.callspec.params
    if params.get("task") == "cdr" or params.get("name") in NEEDS_DOMAINS:
        return two_domains
    return rated if params.get("name") in NEEDS_RATING else single_domain


#: options that select another architecture of a registered model: each is a case of its own
VARIANTS = {"crm": ({"tower": "dt"},)}


def _variants(name):
    """``(options, id suffix)`` of the model's default and of each of its VARIANTS."""
    yield {}, ""
    for options in VARIANTS.get(name, ()):
        yield options, "[" + ",".join(f"{k}={v}" for k, v in options.items()) + "]"


def cases():
    for name in MODELS.names():
        for task in MODELS.create(name).model.tasks:
            for variant, suffix in _variants(name):
                yield pytest.param(name, task, variant, id=f"{name}{suffix}-{task}")


def _options(name, variant=None):
    """The SMALL options the model's config knows (None for models without options), with
    the case's variant options."""
    config = MODELS.create(name).config
    if config is None:
        return None
    known = {f.name.replace("_", "-") for f in dataclasses.fields(config)}
    return {**{k: v for k, v in SMALL.items() if k in known}, **(variant or {})}


def _batch(split, task, stage="train"):
    ex = build_examples(split, task=task, stage=stage, max_len=8)
    sampler = UniformNegativeSampler(split, seed=0)
    negatives = 2 if task in ("next_item", "cdr") else 0
    return next(iterate_batches(ex, batch_size=16, num_negatives=negatives, sampler=sampler))


@pytest.mark.parametrize("name, task, variant", list(cases()))
def test_model_contract(split, name, task, variant):
    torch.manual_seed(0)
    data = ModelData.from_split(split)
    model = create_model(name, data, _options(name, variant), task=task)
    if not getattr(model, "trainable", True):
        model.fit(split)
    batch = _batch(split, task)
    model.train()
    out = model(batch)
    assert out["logits"].shape == batch["target_items"].shape
    if getattr(model, "trainable", True):
        loss = model.loss(batch, out)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
        roles = model.parameter_roles()
        assert set(roles) == {n for n, _ in model.named_parameters()}
    # evaluation outputs and a state_dict round trip into a fresh model
    model.eval()
    evaluation = _batch(split, task, stage="test")
    clone = create_model(name, data, _options(name, variant), task=task)
    clone.load_state_dict(model.state_dict())
    clone.eval()
    with torch.no_grad():
        if task == "ctr":
            p = model.predict_ctr(evaluation)
            assert ((p > 0) & (p < 1)).all()
            torch.testing.assert_close(p, clone.predict_ctr(evaluation))
        else:
            cand = torch.arange(1, 6).expand(evaluation["user"].shape[0], -1)
            torch.testing.assert_close(model.score_candidates(evaluation, cand), clone.score_candidates(evaluation, cand))
            assert model.score_all(evaluation).shape == (evaluation["user"].shape[0], data.n_items + 1)


@pytest.mark.parametrize("name, task, variant", list(cases()))
def test_same_seed_same_result(split, name, task, variant):
    # full ranking: sampled-99 needs 99 distinct unseen items per user, this catalogue has 60
    cfg = TrainConfig(epochs=2, batch_size=16, seed=3, progress=False, protocol="full")
    a = train(name, split, task=task, model_options=_options(name, variant), config=cfg)
    b = train(name, split, task=task, model_options=_options(name, variant), config=cfg)
    assert a["test"] == b["test"] and a["valid"] == b["valid"]
    assert all(np.isfinite(v) for v in a["test"].values() if v is not None)


def test_id_embeddings_start_small_so_first_scores_are_order_one(single_domain):
    split = single_domain
    # PyTorch's default N(0, 1) ids made initial next-item logits ~dim and stalled SASRec at
    # popularity level on LastFM; ids start at N(0, 1/dim) with a zero padding row
    torch.manual_seed(0)
    model = create_model("sasrec", ModelData.from_split(split), {"dim": 64, "item-repr": "id", "max-len": 8},
                         task="next_item")
    weight = model.items.id_embedding.weight.detach()
    assert torch.all(weight[0] == 0)
    assert abs(float(weight[1:].std()) - 64**-0.5) < 0.02
    batch = _batch(split, "next_item")
    model.eval()
    with torch.no_grad():
        logits = model(batch)["logits"][batch["target_mask"]]
    assert float(logits.abs().mean()) < 3.0


def _federated_cases():
    for name in MODELS.names():
        spec = MODELS.create(name)
        if name in ("popularity", "user_ctr"):  # nothing to train
            continue
        for task in spec.model.tasks:
            if task == "cdr":  # one client per domain, rows aligned by PSI: tests/federated/test_unicdr_federated.py
                continue
            for variant, suffix in _variants(name):
                yield pytest.param(name, task, variant, id=f"{name}{suffix}-{task}")


@pytest.mark.parametrize("name, task, variant", list(_federated_cases()))
def test_one_federated_round(split, single_domain, name, task, variant):
    """Every trainable model also federates: one round of the vectorised engine (``fedrec
    simulate --algorithm fedavg --model NAME``), an upload
    that moves the global parameters and stays finite, then each user's own model scores
    its test item. Moment&Cross's cross branch reads other domains, which no client may:
    it federates without it, on one domain."""
    from fedrec.federated import FederatedConfig, create_algorithm

    cfg = FederatedConfig(lr=0.01, negatives=2, chunk_size=16, seed=0)
    options = _options(name, variant)
    if name in NEEDS_DOMAINS:
        split, options = single_domain, {**options, "cross": False}
    alg = create_algorithm("fedavg", split, task=task, model=name, model_options=options, config=cfg)
    users = np.arange(1, split.n_users + 1)
    g = alg.initial_global()
    state = alg.initial_local(users)
    shard = alg.make_shard(users)
    upload, state, metrics = alg.client_update(g, state, shard, round=1)
    assert np.isfinite(metrics["loss"])
    g2, _, _ = alg.aggregate(g, [upload])
    assert all(torch.isfinite(v).all() for v in g2.values())
    assert max(float((g2[n] - g[n]).abs().max()) for n in g) > 0
    out = alg.predict(g2, state, shard.test)
    key = "probs" if task == "ctr" else "ranks"
    assert len(out[key]) == len(shard.test) and np.isfinite(out[key]).all()
