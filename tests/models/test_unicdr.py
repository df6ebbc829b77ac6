"""UniCDR (centralised): the aggregators by hand, the structures' parameters, cold-start
users, ranking within a domain, per-domain metrics, training that learns, and bad options."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrec.data import load_dataset
from fedrec.data.batching import build_examples, iterate_batches
from fedrec.data.samplers import UniformNegativeSampler
from fedrec.data.split import split_dataset
from fedrec.errors import ConfigError
from fedrec.metrics import domain_ranking_metrics, ranking_metrics
from fedrec.models.base import ModelData
from fedrec.models.registry import create_model
from fedrec.models.unicdr import Aggregator
from fedrec.train import TrainConfig, train

SMALL = {"dim": 16, "max-len": 6, "eval-len": 12}
DATA = "synthetic:users=200,items=150,domains=2,overlap=0.5,groups=2,seed=3"


@pytest.fixture(scope="module")
def split():
    return split_dataset(load_dataset(DATA))


def _batch(split, stage="train", n=4, size=64):
    ex = build_examples(split, task="cdr", stage=stage, max_len=6)
    return next(iterate_batches(ex, batch_size=size, num_negatives=n, sampler=UniformNegativeSampler(split, seed=0)))


def test_mean_aggregator_by_hand():
    torch.manual_seed(0)
    agg = Aggregator(3, "mean", 0.5, 0.0)
    e = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    x = torch.tensor([[[1.0, 1.0, 1.0], [3.0, 3.0, 3.0]], [[5.0, 0.0, 0.0], [9.0, 9.0, 9.0]]])
    mask = torch.tensor([[True, True], [True, False]])
    out = agg(e, x, mask)
    W = agg.proj.weight
    expected = 0.5 * e + 0.5 * torch.stack([W @ torch.tensor([2.0, 2.0, 2.0]), W @ torch.tensor([5.0, 0.0, 0.0])])
    torch.testing.assert_close(out, expected)
    # an empty set contributes nothing: lam * e
    torch.testing.assert_close(agg(e, x, torch.zeros(2, 2, dtype=torch.bool)), 0.5 * e)


def test_attention_aggregator_weights_only_real_entries():
    torch.manual_seed(0)
    agg = Aggregator(4, "user_attention", 0.5, 0.0).eval()
    e, x = torch.randn(2, 4), torch.randn(2, 3, 4)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    out = agg(e, x, mask)
    changed = x.clone()
    changed[0, 1] = 100.0  # a padded entry: no effect
    torch.testing.assert_close(agg(e, changed, mask), out)
    torch.testing.assert_close(out[1], 0.5 * e[1])  # empty set


def test_structures_have_the_parameters_they_name(split):
    data = ModelData.from_split(split)
    full = dict(create_model("unicdr", data, SMALL, task="cdr").named_parameters())
    single = dict(create_model("unicdr", data, {**SMALL, "structure": "single"}, task="cdr").named_parameters())
    pooled = dict(create_model("unicdr", data, {**SMALL, "structure": "pooled"}, task="cdr").named_parameters())
    assert "user_shared.weight" in full and any(n.startswith("disc.") for n in full)
    assert {"user_spec.0.weight", "user_spec.1.weight"} <= set(full)
    assert not any(n.startswith(("user_shared", "agg_shared", "disc")) for n in single)
    assert "user_spec.1.weight" not in pooled and "agg.1.proj.weight" not in pooled
    none = create_model("unicdr", data, {**SMALL, "contrastive": "none"}, task="cdr")
    assert none.disc is None


def test_full_ranking_is_within_the_row_domain(split):
    model = create_model("unicdr", ModelData.from_split(split), SMALL, task="cdr").eval()
    batch = _batch(split, "test")
    with torch.no_grad():
        scores = model.score_all(batch)
    item_domain = torch.from_numpy(split.item_domain)
    other = item_domain.unsqueeze(0) != batch["domain"].unsqueeze(1)
    assert torch.isinf(scores[other]).all() and torch.isfinite(scores[~other]).all()
    # many candidates go through one matmul: the same numbers as the per-candidate path
    cands = batch["candidates"]
    with torch.no_grad():
        fast = model.score_candidates(batch, cands)
        slow = model._score(model.user_vectors(batch)["user"], cands)
    torch.testing.assert_close(fast, slow)


def test_cold_start_users_get_no_domain_specific_part_at_evaluation(split):
    model = create_model("unicdr", ModelData.from_split(split), SMALL, task="cdr").eval()
    batch = dict(_batch(split, "test"))
    batch["own_items"] = torch.zeros_like(batch["own_items"])  # no training item in the domain
    with torch.no_grad():
        vec = model.user_vectors(batch)
    assert torch.all(vec["spec"] == 0)
    torch.testing.assert_close(vec["user"], vec["shared"])


def test_loss_weights_recommendation_and_contrastive_terms(split):
    torch.manual_seed(0)
    data = ModelData.from_split(split)
    batch = _batch(split)
    for contrastive in ("hard", "soft"):
        model = create_model("unicdr", data, {**SMALL, "contrastive": contrastive, "dropout": 0.0, "mask-rate": 0.0},
                             task="cdr")
        torch.manual_seed(1)
        out = model(batch)
        torch.manual_seed(2)
        loss = model.loss(batch, out)
        assert torch.isfinite(loss) and loss.ndim == 0
        loss.backward()
        assert model.disc[0].weight.grad.abs().sum() > 0  # the discriminator learns
    # rec-weight 1: the recommendation loss alone, summed over the domains
    model = create_model("unicdr", data, {**SMALL, "rec-weight": 1.0, "dropout": 0.0, "mask-rate": 0.0}, task="cdr")
    out = model(batch)
    logits = torch.cat([out["logits"], out["neg_logits"]], 1)
    labels = torch.zeros_like(logits)
    labels[:, 0] = 1
    per_row = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1)
    expected = sum(per_row[batch["domain"] == k].mean() for k in (0, 1))
    torch.testing.assert_close(model.loss(batch, out), expected)


def test_bad_options_are_one_line_errors(split):
    data = ModelData.from_split(split)
    for options, needle in [({"aggregator": "max"}, "aggregator"), ({"structure": "x"}, "structure"),
                            ({"rec-weight": 2.0}, "rec-weight"), ({"dim": 0}, "dim"),
                            ({"temperature": 0.0}, "temperature"), ({"shared-context": "both"}, "shared-context")]:
        with pytest.raises(ConfigError, match=needle):
            create_model("unicdr", data, {**SMALL, **options}, task="cdr")
    single = split_dataset(load_dataset("synthetic:users=30,items=40,seed=0"))
    with pytest.raises(ConfigError, match="multi-domain"):
        create_model("unicdr", ModelData.from_split(single), SMALL, task="cdr")
    with pytest.raises(ConfigError, match="does not support task"):
        create_model("unicdr", data, SMALL, task="next_item")


def test_item_similarity_refuses_domains_above_the_dense_limit(split):
    model = create_model("unicdr", ModelData.from_split(split), {**SMALL, "aggregator": "item_similarity",
                                                                   "ease-max-items": 50}, task="cdr")
    with pytest.raises(ConfigError, match=r"domain 'd0' has \d+ items, above ease-max-items 50"):
        model.prepare(split)
    ok = create_model("unicdr", ModelData.from_split(split), {**SMALL, "aggregator": "item_similarity"}, task="cdr")
    ok.prepare(split)
    out = ok(_batch(split))
    assert torch.isfinite(out["logits"]).all()


def test_domain_metrics_by_hand():
    ranks = np.array([0, 20, 3, 50, 1])
    domains = np.array([0, 0, 1, 1, 1])
    cold = np.array([False, True, False, False, True])
    m = domain_ranking_metrics(ranks, domains, ["a", "b"], cold)
    assert m["a/hr@10"] == 0.5 and m["b/hr@10"] == pytest.approx(2 / 3)
    assert m["hr@10"] == pytest.approx((0.5 + 2 / 3) / 2)  # each domain counts once
    assert m["a/cold/hr@10"] == 0.0 and m["b/cold/hr@10"] == 1.0
    assert m["b/ndcg@10"] == pytest.approx(ranking_metrics(ranks[2:])["ndcg@10"])


def test_training_learns_and_reports_each_domain(split):
    cfg = TrainConfig(epochs=6, batch_size=64, lr=0.01, negatives=4, protocol="sampled-99", progress=False, seed=0)
    pop = train("popularity", split, task="cdr", config=cfg)
    res = train("unicdr", split, task="cdr", model_options=SMALL, config=cfg)
    for key in ("d0/hr@10", "d1/ndcg@10", "hr@10", "ndcg@10"):
        assert key in res["test"]
    first, best = res["history"][0]["valid"]["ndcg@10"], max(h["valid"]["ndcg@10"] for h in res["history"])
    assert best > first  # it learns
    assert res["test"]["hr@10"] > 0.1  # 99 negatives: random would be 0.1 +- noise
    assert pop["test"]["hr@10"] is not None


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "fedrec.cli", *args], capture_output=True, text=True)


def test_train_and_recommend_within_a_domain_from_the_cli(tmp_path):
    import json

    import pandas as pd

    ckpt, out = tmp_path / "m.pt", tmp_path / "r.json"
    sets = [x for k, v in {**SMALL, "dim": 8}.items() for x in ("--set", f"{k}={v}")]
    proc = _cli("train", "--model", "unicdr", "--data", DATA, "--task", "cdr", "--epochs", "1", "--protocol", "sampled-99",
                "--checkpoint", str(ckpt), "--out", str(out), "--json", *sets)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["task"] == "cdr" and result["protocol"] == "sampled-99" and "d1/hr@10" in result["test"]
    again = _cli("evaluate", str(ckpt), "--data", DATA, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["by_protocol"]["sampled-99"]["test"] == result["test"]
    recs = tmp_path / "recs.csv"
    proc = _cli("recommend", str(ckpt), "--data", DATA, "--domain", "d1", "--k", "5", "--out", str(recs))
    assert proc.returncode == 0, proc.stderr
    frame = pd.read_csv(recs)
    data = load_dataset(DATA).interactions.frame
    d1_items = set(data.loc[data["domain"] == "d1", "item"])
    assert len(frame) == 5 * data["user"].nunique() and set(frame["item"]) <= d1_items
    seen = set(zip(data.loc[data["domain"] == "d1", "user"], data.loc[data["domain"] == "d1", "item"]))
    assert not any((u, i) in seen for u, i in zip(frame["user"], frame["item"]))
    for args, needle in [((), "choose the domain"), (("--domain", "d7"), "unknown domain 'd7'")]:
        bad = _cli("recommend", str(ckpt), "--data", DATA, "--out", str(tmp_path / "x.csv"), *args)
        assert bad.returncode != 0 and needle in bad.stderr and "Traceback" not in bad.stderr


def test_sequential_aggregator_reads_the_order_and_ignores_padding():
    torch.manual_seed(0)
    agg = Aggregator(4, "sequential", 0.5, 0.0).eval()
    e, x = torch.randn(1, 4), torch.randn(1, 3, 4)
    mask = torch.tensor([[True, True, False]])
    out = agg(e, x, mask)
    swapped = x[:, [1, 0, 2]]
    assert not torch.allclose(agg(e, swapped, mask), out)  # order matters
    padded = x.clone()
    padded[0, 2] = 50.0
    torch.testing.assert_close(agg(e, padded, mask), out)  # padding does not
    torch.testing.assert_close(agg(e, x, torch.zeros_like(mask)), 0.5 * e)


def test_item_neighbours_stay_within_the_domain_and_follow_co_occurrence(split):
    from fedrec.models.unicdr import _item_neighbours

    one, two = _item_neighbours(split, 5, 2)
    assert one.shape == two.shape == (split.n_items + 1, 5)
    dom = torch.from_numpy(split.item_domain)
    real = one > 0
    assert torch.all(dom[one][real] == dom.unsqueeze(1).expand_as(one)[real])
    assert not torch.any((one == torch.arange(split.n_items + 1).unsqueeze(1)) & real)  # never the item itself
    assert real[1:].any(1).float().mean() > 0.5  # most items have neighbours
    model = create_model("unicdr", ModelData.from_split(split), {**SMALL, "item-hops": 2, "item-neighbours": 5},
                         task="cdr")
    model.prepare(split)
    items = torch.tensor([[1, 2]])
    base = model._item_base(items)
    expected = []
    for i in (1, 2):
        parts = [base[0, i - 1]]
        for hop in (one, two):
            nb = hop[i][hop[i] > 0]
            parts.append(model._item_base(nb).mean(0) if len(nb) else torch.zeros(SMALL["dim"]))
        expected.append(torch.stack(parts).mean(0))
    torch.testing.assert_close(model.item_vectors(items)[0], torch.stack(expected))
    model.eval()
    batch = _batch(split, "test")
    with torch.no_grad():  # scoring all items and candidates agree with the item vectors
        all_scores = model.score_all(batch)
        torch.testing.assert_close(model.score_candidates(batch, batch["candidates"]),
                                   torch.gather(all_scores, 1, batch["candidates"]))


def test_side_features_and_item_bias(split):
    import dataclasses

    data = ModelData.from_split(split)
    assert data.item_features is not None and data.user_features is not None  # the synthetic data has both
    torch.manual_seed(0)
    with_features = create_model("unicdr", data, {**SMALL, "side-features": True}, task="cdr")
    assert len(with_features.item_fields) == len(data.item_cardinalities) > 0
    assert len(with_features.user_fields) == len(data.user_cardinalities) > 0
    items = torch.tensor([[1, 2]])
    codes = data.item_features[items].long()
    expected = with_features.items(items) + sum(t(codes[..., f]) for f, t in enumerate(with_features.item_fields))
    torch.testing.assert_close(with_features.item_vectors(items), expected)
    bare = dataclasses.replace(data, item_features=None, user_features=None, item_cardinalities=(),
                               user_cardinalities=())
    with pytest.raises(ConfigError, match="no user or item features"):
        create_model("unicdr", bare, {**SMALL, "side-features": True}, task="cdr")
    model = create_model("unicdr", data, {**SMALL, "item-bias": True}, task="cdr").eval()
    with torch.no_grad():
        model.item_bias.weight[5] = 100.0
    batch = _batch(split, "test")
    with torch.no_grad():
        scores = model.score_all(batch)
    rows = batch["domain"] == int(split.item_domain[5])
    assert torch.all(scores[rows].argmax(1) == 5)


BEHAVIOUR_DATA = DATA.replace("seed=3", "behaviours=2,seed=3")


def test_second_behaviour_leaves_the_rest_of_the_data_unchanged_and_reaches_the_batches():
    plain, rated = load_dataset(DATA).interactions.frame, load_dataset(BEHAVIOUR_DATA).interactions.frame
    assert "rating" not in plain.columns
    assert plain.equals(rated.drop(columns="rating"))  # its own random stream
    assert set(rated["rating"].unique()) <= {1.0, 2.0, 3.0, 4.0, 5.0} and rated["rating"].nunique() == 5
    sp = split_dataset(load_dataset(BEHAVIOUR_DATA))
    assert sp.rating is not None and split_dataset(load_dataset(DATA)).rating is None
    batch = _batch(sp, "test")
    ex = build_examples(sp, task="cdr", stage="test", max_len=6)
    expected = sp.rating[ex.target_rows[:64, 0]]
    np.testing.assert_array_equal(batch["target_ratings"].numpy(), expected)


def test_mmoe_head_by_hand_and_starts_as_the_identity():
    from fedrec.models.unicdr import BehaviourHead

    torch.manual_seed(0)
    head = BehaviourHead(4, experts=3)
    u = torch.randn(5, 4)
    for out in head(u):  # zero-initialised expert outputs: both behaviours start at u
        torch.testing.assert_close(out, u)
    with torch.no_grad():
        for expert in head.experts:
            expert[2].weight.normal_()
    main, like = head(u)
    ex = torch.stack([e(u) for e in head.experts], 1)
    for gate, out in zip(head.gates, (main, like)):
        g = torch.softmax(gate(u), -1)
        torch.testing.assert_close(out, u + torch.einsum("be,bed->bd", g, ex))
    assert not torch.allclose(main, like)  # one gate per behaviour


def test_mmoe_head_trains_the_like_behaviour_and_is_refused_without_ratings(split):
    rated = split_dataset(load_dataset(BEHAVIOUR_DATA))
    opts = {**SMALL, "behaviour-head": "mmoe", "item-bias": True}
    torch.manual_seed(0)
    model = create_model("unicdr", ModelData.from_split(rated), opts, task="cdr")
    model.prepare(rated)
    assert model.behaviours == ("main", "like") and len(model.head) == 2 and model.like_bias is not None
    batch = _batch(rated, "train")
    out = model(batch)
    assert out["like_logits"].shape == (64, 1) and out["like_neg_logits"].shape == (64, 4)
    # the like loss, by hand: the BCE of the like scores with the positive labelled 1 only when
    # liked, per domain, added to the recommendation term with weight behaviour-weight
    liked = (batch["target_ratings"] >= 4).float()
    assert liked.min() == 0 and liked.max() == 1
    without = {k: v for k, v in out.items() if not k.startswith("like_")}
    logits = torch.cat([out["like_logits"], out["like_neg_logits"]], 1)
    labels = torch.zeros_like(logits)
    labels[:, 0] = liked
    row = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1)
    extra = sum(row[batch["domain"] == k].mean() for k in range(2))
    cfg = model.cfg
    torch.manual_seed(1)
    full = model.loss(batch, out)
    torch.manual_seed(1)  # the same contrastive shuffle
    torch.testing.assert_close(full - model.loss(batch, without), cfg.rec_weight * cfg.behaviour_weight * extra)
    model.eval()
    test = _batch(rated, "test")
    with torch.no_grad():  # (untrained, the head is the identity: give its experts weights)
        for head in model.head:
            for expert in head.experts:
                expert[2].weight.normal_(0.0, 0.3)
    with torch.no_grad():  # like scores differ from main ones, and candidates agree with score_all
        main = model.score_candidates(test, test["candidates"])
        like = model.score_candidates(test, test["candidates"], behaviour="like")
        torch.testing.assert_close(like, torch.gather(model.score_all(test, behaviour="like"), 1, test["candidates"]))
    with torch.no_grad():
        model.like_bias.weight[7] = 100.0
        ranked = model.score_all(test, behaviour="like")
    rows = test["domain"] == int(rated.item_domain[7])
    assert torch.all(ranked[rows].argmax(1) == 7)
    assert main.shape == like.shape and not torch.allclose(main, like)
    with pytest.raises(ConfigError, match="unknown behaviour"):
        model.score_all(test, behaviour="buy")
    bare = create_model("unicdr", ModelData.from_split(split), opts, task="cdr")
    with pytest.raises(ConfigError, match="no ratings"):
        bare.prepare(split)
    with pytest.raises(ConfigError, match="behaviour-head"):
        create_model("unicdr", ModelData.from_split(split), {**SMALL, "behaviour-head": "moe"}, task="cdr")


def test_like_metrics_rank_the_liked_held_out_items_with_the_like_score():
    from fedrec.train import _ranks, cdr_metrics, liked_mask

    rated = split_dataset(load_dataset(BEHAVIOUR_DATA))
    ex = build_examples(rated, task="cdr", stage="test", max_len=6)
    liked = liked_mask(ex)
    np.testing.assert_array_equal(liked, rated.rating[ex.target_rows[:, -1]] >= 4)
    assert 0 < liked.mean() < 1

    class ByIndex:  # no score of its own for likes: ranks them with its main score
        def score_candidates(self, batch, candidates):
            return -candidates.float()

    ranks = _ranks(ByIndex(), ex, protocol="sampled-99", batch_size=50, eval_seed=1, behaviours=("main", "like"))
    np.testing.assert_array_equal(ranks["main"], ranks["like"])
    m = cdr_metrics(ex, ranks["main"], ranks["like"])
    by_hand = domain_ranking_metrics(ranks["main"][liked], ex.domains[liked], rated.domains)
    for d in rated.domains:
        assert m[f"{d}/like/hr@10"] == pytest.approx(by_hand[f"{d}/hr@10"])
        assert m[f"{d}/hr@10"] != m[f"{d}/like/hr@10"]  # a subset, not the same examples
    assert "like/hr@10" not in m and m["hr@10"] == pytest.approx(np.mean([m[f"{d}/hr@10"] for d in rated.domains]))
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.01, negatives=4, protocol="sampled-99", progress=False, seed=0)
    res = train("unicdr", rated, task="cdr", model_options={**SMALL, "behaviour-head": "mmoe"}, config=cfg)
    assert {"d0/like/hr@10", "d1/like/ndcg@10", "d0/hr@10"} <= set(res["test"])
    assert res["test"]["d0/like/hr@10"] != res["test"]["d0/hr@10"]
