"""A fleet's server side: each rank gets its share, and FedSA's shared A (B stays private) aggregates across
tiers of different ranks by zero-padding rows."""

import torch

from fedtune.federation.aggregate import HeteroRule, Reply
from fedtune.federation.fleet_server import FleetServer, rank_of, truncate

A = {"m.lora_A.weight": torch.arange(8 * 3, dtype=torch.float32).view(8, 3)}  # FedSA's shared part, rank 8


def _reply(state, rank, n):
    return Reply(device=0, state=state, num_examples=n, train_loss=1.0, rank=rank)


def test_fedsa_shared_a_is_sent_per_rank_and_zero_padded_back():
    server = FleetServer(A, HeteroRule("zeropad", A), "zeropad")
    assert server.r_max == 8 == rank_of(A)
    sent4 = server.sent_for(4)
    assert sent4["m.lora_A.weight"].shape == (4, 3)
    torch.testing.assert_close(sent4["m.lora_A.weight"], A["m.lora_A.weight"][:4])
    low = {"m.lora_A.weight": torch.ones(4, 3)}
    high = {"m.lora_A.weight": torch.full((8, 3), 3.0)}
    out = server.rule(server.global_adapter(), [_reply(low, 4, 1), _reply(high, 8, 3)])
    a = out["m.lora_A.weight"]
    torch.testing.assert_close(a[:4], torch.full((4, 3), (1 * 1 + 3 * 3) / 4))  # both tiers' rows
    torch.testing.assert_close(a[4:], torch.full((4, 3), 3 * 3 / 4))  # only the rank-8 tier has these rows
    assert truncate(out, 2)["m.lora_A.weight"].shape == (2, 3)
