"""Top-K evaluation end to end: the K list, the set-based next-item evaluation of a ratio
split (by hand, with a fixed scorer), the federated summaries equal to the centralised
metrics of the same model, and ``fedrec train`` with a ratio split on real data."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from fedrec.data import Dataset, Interactions, load_dataset
from fedrec.data.batching import build_examples, target_groups
from fedrec.data.split import SplitConfig, split_dataset
from fedrec.train import evaluate, selection_metric

# user 1: times 1..8, items 9 8 7 6 | 5 4 | 2 3 ; user 2: 1 2 3 4 | 5 6 | 9 9 (a repeated test item)
ROWS = {"user": [1] * 8 + [2] * 8, "item": [9, 8, 7, 6, 5, 4, 2, 3, 1, 2, 3, 4, 5, 6, 9, 9],
        "time": list(range(1, 9)) * 2}


class _Fixed(torch.nn.Module):
    """Scores item i as 10 - i (item 1 best) for every user."""

    def score_all(self, batch):
        return torch.arange(10, 0, -1, dtype=torch.float64).expand(len(batch["user"]), -1)


def _ratio_split():
    ds = Dataset("t", Interactions.from_frame(pd.DataFrame(ROWS), source="t"))
    return split_dataset(ds, SplitConfig(method="ratio", ratios=[0.5, 0.25, 0.25]))


def test_ratio_split_scores_each_users_held_out_set_by_hand():
    sp = _ratio_split()
    test = build_examples(sp, task="next_item", stage="test", max_len=5)
    assert len(test) == 4  # two test rows per user, user 2's twice the same item
    seq, keep = target_groups(test)
    assert keep.sum() == 3 and sorted(seq.tolist()) == [0, 0, 1]
    out = evaluate(_Fixed(), test, task="next_item", topk=(1, 2))
    # user 1: train + valid items 4..9 excluded, candidates 1 2 3: its items 2, 3 at positions 1, 2
    # user 2: items 1..6 excluded, candidates 7 8 9: its item 9 at position 2
    assert out["hr@1"] == 0 and out["recall@1"] == 0 and out["map@1"] == 0
    assert out["hr@2"] == 0.5  # user 1 hits at position 1
    assert out["recall@2"] == pytest.approx((1 / 2 + 0) / 2, abs=1e-6)
    assert out["precision@2"] == pytest.approx((1 / 2 + 0) / 2, abs=1e-6)
    ndcg_1 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))  # ideal: min(2, 2) items at the top
    assert out["ndcg@2"] == pytest.approx(ndcg_1 / 2, abs=1e-6)
    assert out["map@2"] == pytest.approx(((1 / 2) / 2 + 0) / 2, abs=1e-6)  # P@2 at the hit / min(2, 2)
    assert out["mrr"] == pytest.approx((1 / 2 + 1 / 3) / 2, abs=1e-6)
    # top-1 lists: item 1 (user 1), item 7 (user 2); top-2 adds 2 and 8: of 9 items
    assert out["coverage@1"] == pytest.approx(2 / 9, abs=1e-6)
    assert out["coverage@2"] == pytest.approx(4 / 9, abs=1e-6)


def test_leave_last_two_out_has_no_groups_and_selection_follows_the_k_list():
    sp = split_dataset(Dataset("t", Interactions.from_frame(pd.DataFrame(ROWS), source="t")))
    test = build_examples(sp, task="next_item", stage="test", max_len=5)
    assert target_groups(test) is None
    assert selection_metric("next_item") == "ndcg@10" and selection_metric("next_item", (5, 20)) == "ndcg@5"
    assert selection_metric("ctr", (5,)) == "auc"


def test_federated_summaries_pool_to_the_centralised_metrics():
    """Two clients' summaries of the same model pool to what the centralised evaluation gives:
    the same keys (coverage included) and the same values."""
    from fedrec.federated.config import FederatedConfig
    from fedrec.federated.registry import create_algorithm

    split = split_dataset(load_dataset("synthetic:users=16,items=200,seed=1"))
    for protocol in ("full", "sampled-99"):
        alg = create_algorithm("fedavg", split, task="next_item",
                               config=FederatedConfig(protocol=protocol, topk="1,5,10"))
        users = np.arange(1, split.n_users + 1)
        g, st = alg.initial_global(), alg.initial_local(users)
        parts = [alg.client_evaluate(g, st, alg.make_shard(u), stage="test") for u in np.array_split(users, 2)]
        pooled = alg.combine(parts)
        model = alg.model
        model.eval()
        test = build_examples(split, task="next_item", stage="test", max_len=alg.max_len)
        central = evaluate(model, test, task="next_item", protocol=protocol, topk=(1, 5, 10))
        assert pooled.pop("n") == len(test)  # labelled data: the users whose test item is a positive
        assert list(pooled) == list(central)
        assert ("coverage@5" in central) == (protocol == "full")
        for key, value in central.items():
            assert pooled[key] == pytest.approx(value, abs=1e-6), (protocol, key)


def test_federated_topk_summary_pools_several_items_per_user_and_coverage():
    from fedrec.federated.evaluation import combine_ranking, topk_summary
    from fedrec.metrics import top_k_items, topk_metrics

    rng = np.random.default_rng(0)
    ranks = rng.integers(0, 30, size=40).astype(float)
    groups = np.sort(rng.integers(0, 12, size=40))
    top = top_k_items(rng.random((40, 31)), 10)
    exact = topk_metrics(ranks, (3, 10), groups=groups, top_items=top, n_items=30)
    cut = np.flatnonzero(np.diff(groups))[5] + 1  # clients hold whole users
    parts = [topk_summary(ranks[s], (3, 10), groups=groups[s], top_items=top[s], n_items=30)
             for s in (slice(0, cut), slice(cut, None))]
    pooled = combine_ranking(parts)
    assert pooled.pop("n") == len(np.unique(groups))
    assert list(pooled) == list(exact)
    for key, value in exact.items():
        assert pooled[key] == pytest.approx(value, abs=1e-12), key


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fedrec.cli", *args], capture_output=True, text=True, check=False,
                          timeout=600)


def test_topk_flags_and_bad_k_are_one_line():
    from typer.testing import CliRunner

    from fedrec.cli import app
    for args, needle in ((["train", "--model", "popularity", "--data", "synthetic:users=30", "--task", "next_item",
                           "--topk", "5,0"], "train option 'topk': K must be a positive integer (got 0)"),
                         (["train", "--model", "user_ctr", "--data", "synthetic:users=30", "--topk", "5"],
                          "topk applies to the ranking tasks"),
                         (["simulate", "--data", "synthetic:users=30", "--task", "next_item", "--topk", "x"],
                          "federated option 'topk': K must be a positive integer (got 'x')")):
        run = CliRunner().invoke(app, args)
        assert run.exit_code == 2 and needle in run.stderr, run.output
        assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.output


@pytest.mark.realdata
@pytest.mark.slow
def test_train_next_item_with_a_ratio_split_on_ml100k(shared_data, tmp_path):
    cfg = tmp_path / "ratio.toml"
    cfg.write_text('[split]\nmethod = "ratio"\nratios = [0.8, 0.1, 0.1]\norder = "user"\n')
    run = _cli("train", "--model", "sasrec", "--data", f"atomic:{shared_data}/ml-100k/recbole", "--task", "next_item",
               "--epochs", "1", "--set", "dim=16", "--set", "max-len=20", "--config", str(cfg), "--topk", "10,50",
               "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert list(result["test"]) == ["hr@10", "ndcg@10", "recall@10", "precision@10", "map@10", "coverage@10",
                                    "hr@50", "ndcg@50", "recall@50", "precision@50", "map@50", "coverage@50", "mrr"]
    assert result["train"]["topk"] == [10, 50] and result["selection"] == "valid ndcg@10"
    assert result["population"]["test"]["users"] == 943 and result["population"]["test"]["examples"] > 943
    t = result["test"]
    assert 0 < t["recall@10"] < t["hr@10"] and 0 < t["precision@10"] < t["hr@10"]
    assert 0 < t["coverage@10"] < t["coverage@50"] <= 1


def test_a_saved_federated_model_is_scored_again_at_another_k_list(tmp_path):
    from fedrec.errors import ConfigError
    from fedrec.federated.model import evaluate_federated
    from fedrec.federated.runner import run_in_process
    from fedrec.federated.spec import parse_run_config

    run = run_in_process(parse_run_config({"data": "synthetic:users=40,items=60,seed=2", "task": "next_item",
                                           "algorithm": "fedavg", "shards": 2, "rounds": 1, "topk": "5,10",
                                           "model.dim": 16, "model-dir": str(tmp_path / "m")}))
    assert [k for k in run["test"] if k.endswith("@5")] == ["hr@5", "ndcg@5", "recall@5", "precision@5", "map@5",
                                                           "coverage@5"]
    again = evaluate_federated(tmp_path / "m")
    assert again["test"] == run["test"]
    three = evaluate_federated(tmp_path / "m", topk="3")
    assert [k for k in three["test"] if k != "n"] == ["hr@3", "ndcg@3", "recall@3", "precision@3", "map@3",
                                                     "coverage@3", "mrr"]
    assert three["test"]["mrr"] == run["test"]["mrr"]  # no cut-off: the same model's same ranks
    with pytest.raises(ConfigError, match="federated option 'topk': K must be a positive integer"):
        evaluate_federated(tmp_path / "m", topk="0")


class _FiveFirst(torch.nn.Module):
    """Scores raw item 5 highest, then raw item i as 10 - i (by the split's raw ids)."""

    def __init__(self, item_raw):
        super().__init__()
        raw = torch.as_tensor(item_raw, dtype=torch.float64)
        self.scores = torch.where(raw == 5, torch.tensor(100.0, dtype=torch.float64), 10 - raw)
        self.scores[0] = -1e9  # padding

    def score_all(self, batch):
        return self.scores.expand(len(batch["user"]), -1)


def test_a_held_out_item_that_is_also_in_the_history_is_ranked_in_the_same_list():
    """User 1: items 5 6 7 8 | 4 3 | 1 5 (item 5 again in test). Its two test items are ranked
    in one list from which only the history items that are not held out are removed
    (RecBole's history_item = used_item - positive_item): 5 first, 1 second."""
    rows = pd.DataFrame({"user": [1] * 8, "item": [5, 6, 7, 8, 4, 3, 1, 5], "time": list(range(1, 9))})
    sp = split_dataset(Dataset("t", Interactions.from_frame(rows, source="t")),
                       SplitConfig(method="ratio", ratios=[0.5, 0.25, 0.25]))
    test = build_examples(sp, task="next_item", stage="test", max_len=5)
    indptr, items = test.exclusions()
    raw = set(sp.item_raw[items].tolist())
    assert raw == {6, 7, 8, 4, 3}  # 5 is held out: rankable although it is in the history
    out = evaluate(_FiveFirst(sp.item_raw), test, task="next_item", topk=(1, 2))
    assert all(v <= 1 + 1e-9 for k, v in out.items() if v is not None and not k.startswith("coverage")), out
    assert out["hr@1"] == 1 and out["precision@1"] == 1 and out["recall@1"] == pytest.approx(0.5)
    assert out["ndcg@1"] == pytest.approx(1) and out["map@1"] == pytest.approx(1)
    assert out["precision@2"] == 1 and out["recall@2"] == 1 and out["ndcg@2"] == pytest.approx(1)
    assert out["map@2"] == pytest.approx(1)
