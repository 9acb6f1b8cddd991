"""The aggregation pipeline: every user-level round is noised and charged whatever arrived, the masked-sum
hook sees only clipped deltas, and the privacy label is what the applied mechanisms report."""

import pytest
import torch

from fedtune.config import UserLevelPrivacyConfig
from fedtune.federation.aggregate import FedAvgRule, Pipeline, Reply, RobustRule, UserLevelDP
from fedtune.federation.labels import PrivacyTrail
from fedtune.federation.seeds import Seeds
from fedtune.privacy.dp_fedavg import DPFedAvg, plan_user_level

G = {"a": torch.zeros(64, 64)}


def _reply(v, eps=None, n=10):
    return Reply(device=0, state={"a": torch.full((64, 64), v)}, num_examples=n, train_loss=1.0,
                 epsilon=eps, delta=1e-5 if eps is not None else None)


def _user_dp(sigma=1.0, summer=None):
    cfg = UserLevelPrivacyConfig(enabled=True, noise_multiplier=sigma, clip_norm=1.0)
    return UserLevelDP(DPFedAvg(cfg, plan_user_level(cfg, 100, 10, 5), 100, Seeds.simulated(0)), summer=summer)


def test_without_user_level_dp_too_few_replies_skip_the_round():
    out = Pipeline(FedAvgRule(), min_replies=2).aggregate(G, [_reply(0.1)], 1)
    assert out.skipped and out.state is None and out.applied == []


@pytest.mark.parametrize("n_replies", [0, 1, 3])
def test_user_level_rounds_are_always_noised_and_charged(n_replies):
    """main@ac4911b returned before DP-FedAvg when replies < min_clients: one user decided whether ε was charged."""
    wrapper = _user_dp(sigma=1.0)
    out = Pipeline(FedAvgRule(), min_replies=5, user_dp=wrapper).aggregate(G, [_reply(1e-3)] * n_replies, 1)
    assert not out.skipped and [m.name for m in out.applied] == ["user_level_dp"]
    assert len(wrapper.dp.ledger.history) == 1 and out.applied[0].report["epsilon"] > 0
    # the noise std of the mean is σC / (qN) = 1 / 10; a zeroed or halved noise fails this
    std = float(out.state["a"].std())
    assert 0.09 < std < 0.11, std


def test_masked_sum_hook_receives_only_clipped_deltas_and_gives_the_same_result():
    seen = []

    def masked_sum(clipped, template):  # a secure-aggregation summer would return only this sum
        seen.extend(clipped)
        return {k: sum(c[k] for c in clipped) + 0 * template[k] for k in template}

    replies = [_reply(0.5), _reply(-0.2)]
    plain = Pipeline(FedAvgRule(), user_dp=_user_dp()).aggregate(G, replies, 2).state
    hooked = Pipeline(FedAvgRule(), user_dp=_user_dp(summer=masked_sum)).aggregate(G, replies, 2).state
    assert len(seen) == 2 and all(float(torch.linalg.vector_norm(c["a"])) <= 1.0 + 1e-5 for c in seen)
    torch.testing.assert_close(plain["a"], hooked["a"])


CASES = [  # (user-level DP applied, device replies' ε, rule) -> the label
    (True, [0.5, 0.7], FedAvgRule(), "user"),
    (True, [None, None], FedAvgRule(), "user"),
    (False, [0.5, 0.7], FedAvgRule(), "sample"),
    (False, [0.5, 0.7], RobustRule("median"), "sample"),
    (False, [0.5, None], FedAvgRule(), "none"),
    (False, [None, None], FedAvgRule(), "none"),
]


@pytest.mark.parametrize("user,eps,rule,level", CASES)
def test_label_is_the_applied_mechanism(user, eps, rule, level):
    wrapper = _user_dp() if user else None
    pipe = Pipeline(rule, min_replies=1, user_dp=wrapper)
    trail = PrivacyTrail(sample_accountant="rdp", planned_level="user")  # a config's plan never decides
    for r in (1, 2):
        replies = [_reply(0.01, e) for e in eps]
        trail.observe(pipe.aggregate(G, replies, r).applied, replies)
    g = trail.guarantee(2)
    assert g["level"] == level
    if level == "user":
        assert g["epsilon"] == wrapper.dp.ledger.epsilon() and g["sampler"] == "poisson"
    if level == "sample":
        assert g["epsilon"] == max(eps) and g["delta"] == 1e-5
    if level == "none":
        assert g["epsilon"] is None


def test_one_round_without_the_mechanism_drops_the_level_for_good():
    trail = PrivacyTrail()
    trail.observe([], [_reply(0.1, 0.5)])
    trail.observe([], [_reply(0.1, None)])  # a device that trained without DP-SGD
    trail.observe([], [_reply(0.1, 0.9)])
    assert trail.level == "none"
