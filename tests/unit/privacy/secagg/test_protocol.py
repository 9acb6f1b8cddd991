"""SecAgg+ end to end in process: the server's sum equals plain FedAvg's within the rounding bound, survives
dropouts below the threshold, aborts with a clear error above it, and never holds an individual update."""

import numpy as np
import pytest
import torch
from scipy import stats

from fedtune.aggregation.fedavg import weighted_average
from fedtune.privacy.secagg import (
    Dropouts,
    FieldQuantizer,
    SecAggAbort,
    SecAggClient,
    SecAggServer,
    SecAggSetup,
    UnmaskRequest,
    make_setup,
    run_secure_aggregation,
)
from fedtune.privacy.secagg.payload import weighted_mean_from_sum, weighted_payload
from tests.unit.privacy.stats import ALPHA

P, CLIP = 3000, 0.5
IDS = [11, 23, 35, 47, 59, 61, 73, 85, 97, 109]


def _updates(seed=0, ids=IDS):
    rng = np.random.default_rng(seed)
    return {c: rng.normal(0, 0.1, P) for c in ids}


def _spy(server_cls=SecAggServer):
    """A server class that records every masked vector it is handed (what a curious server could keep)."""
    seen = []

    class Spy(server_cls):
        def collect_masked(self, inputs):
            seen.extend(m.vector.copy() for m in inputs)
            return super().collect_masked(inputs)

    return Spy, seen


@pytest.mark.parametrize("neighbours", [None, 4])  # SecAgg (everyone) and SecAgg+ (a 4-regular ring)
def test_sum_equals_fedavg_within_the_rounding_bound(neighbours):
    ups = _updates()
    weights = {c: (i + 1) / len(IDS) for i, c in enumerate(IDS)}  # capped, normalised example counts
    setup = make_setup(IDS, P + 1, CLIP, num_neighbours=neighbours, context=b"test/1")
    payloads = {c: weighted_payload(ups[c], weights[c], CLIP) for c in IDS}
    out = run_secure_aggregation(setup, payloads)
    assert out.survivors == tuple(IDS) and out.dropped == ()
    plain = weighted_average([{"w": torch.from_numpy(ups[c])} for c in IDS], [weights[c] for c in IDS])["w"]
    secure = weighted_mean_from_sum(out.total, CLIP)
    bound = setup.quantizer.max_error(len(IDS)) / sum(weights.values()) * 1.01  # + the weight's own rounding
    assert np.abs(secure - plain.double().numpy()).max() < bound
    assert np.abs(out.total[:-1] - sum(weights[c] * ups[c] for c in IDS)).max() <= setup.quantizer.max_error(10)


@pytest.mark.parametrize("neighbours", [None, 6])  # ring: k = 6, t = 4, so 2 droppers per neighbourhood
def test_survives_dropouts_at_every_stage_below_the_threshold(neighbours):
    ups = _updates(1)
    setup = make_setup(IDS, P, CLIP, num_neighbours=neighbours, context=b"test/2")
    drops = Dropouts(before_share_keys=frozenset({11}), before_masked_input=frozenset({59}),
                     before_unmask=frozenset({85}))  # ring positions 0, 4, 7: at most 2 in any neighbourhood
    out = run_secure_aggregation(setup, ups, drops)
    expected = [c for c in IDS if c not in (11, 59)]  # 85 sent its input, then vanished: still summed
    assert out.survivors == tuple(expected) and out.dropped == (59,)
    assert np.abs(out.total - sum(ups[c] for c in expected)).max() <= setup.quantizer.max_error(len(expected))


def test_too_many_dropouts_abort_cleanly_at_each_stage():
    ups = _updates(2)
    full = make_setup(IDS, P, CLIP, context=b"test/3")  # k = 9, t = 5
    assert full.threshold == 5
    cases = [
        (Dropouts(before_share_keys=frozenset(IDS[:6])), "stage 'share keys': 4 clients left"),
        (Dropouts(before_masked_input=frozenset(IDS[:6])), "stage 'masked input': 4 clients left"),
        (Dropouts(before_unmask=frozenset(IDS[:6])), "stage 'unmask': 4 clients left"),
    ]
    for drops, message in cases:
        with pytest.raises(SecAggAbort, match=message) as info:
            run_secure_aggregation(full, ups, drops)
        assert "no partial sum is revealed" in str(info.value)
    ring = make_setup(IDS, P, CLIP, num_neighbours=4, context=b"test/4")  # t = 3 of 4 neighbours
    with pytest.raises(SecAggAbort, match=r"2 shares of client 35's self-mask seed arrived, the threshold is 3"):
        run_secure_aggregation(ring, ups, Dropouts(before_masked_input=frozenset({23}),
                                                   before_unmask=frozenset({47})))


def test_the_server_never_holds_an_individual_update(monkeypatch):
    ups = _updates(3)
    setup = make_setup(IDS, P, CLIP, context=b"test/5")
    spy, seen = _spy()
    monkeypatch.setattr("fedtune.privacy.secagg.driver.SecAggServer", spy)
    out = run_secure_aggregation(setup, ups, Dropouts(before_masked_input=frozenset({23})))
    assert len(seen) == len(IDS) - 1
    q = setup.quantizer
    for y in seen:  # each masked input on its own is uniform in the ring, whatever the update
        assert y.dtype == q.dtype
        assert stats.chisquare(np.bincount(y >> 8, minlength=256)).pvalue > ALPHA
        for c in IDS:  # and far from every client's (quantized) update: |y - q(x)| is not small anywhere
            close = np.abs(q.dequantize_sum(y - q.quantize(ups[c], np.random.default_rng(0)))) < 0.01
            assert close.mean() < 0.05
    # what the server keeps: the sum of masked inputs, the public keys, and the final sum
    server = out.server
    assert set(vars(server)) == {"setup", "adverts", "shared", "survivors", "dropped", "masked_sum"}
    assert np.abs(out.total - sum(ups[c] for c in out.survivors)).max() <= q.max_error(len(out.survivors))


def test_a_client_refuses_to_reveal_both_secrets_of_one_peer_or_too_small_a_sum():
    ups = _updates(4)
    setup = make_setup(IDS, P, CLIP, context=b"test/6")
    server = SecAggServer(setup)
    clients = {c: SecAggClient(c, setup) for c in IDS}
    peers = server.collect_adverts([c.advertise() for c in clients.values()])
    inbox = server.route_shares([clients[c].share_keys(peers[c]) for c in IDS])
    for c in IDS:
        clients[c].masked_input(ups[c], inbox[c])
    greedy = UnmaskRequest(survivors=tuple(IDS), dropped=(23,))  # a curious server: 23's seed AND key
    with pytest.raises(SecAggAbort, match=r"both secrets of \[23\]"):
        clients[11].unmask(greedy)
    with pytest.raises(SecAggAbort, match="only 2 clients survived"):
        clients[35].unmask(UnmaskRequest(survivors=(35, 47), dropped=()))
    with pytest.raises(SecAggAbort, match="asked for stage 3 while at stage 4"):
        clients[11].unmask(UnmaskRequest(survivors=tuple(IDS), dropped=()))  # one reply per round


def test_setup_rejects_thresholds_that_would_let_the_server_unmask():
    quantizer = make_setup(IDS, P, CLIP).quantizer
    with pytest.raises(ValueError, match="threshold must lie in 5..9"):
        SecAggSetup(b"", tuple(IDS), 9, 4, P, quantizer)  # t <= k/2: two disjoint sets of t shares exist
    with pytest.raises(ValueError, match="num_neighbours must be even"):
        make_setup(IDS, P, CLIP, num_neighbours=3)
    with pytest.raises(ValueError, match="the quantizer sums at most 4 clients"):
        SecAggSetup(b"", tuple(IDS), 9, 5, P, FieldQuantizer(CLIP, 8, 4))


def test_keys_and_masks_are_fresh_each_round(monkeypatch):
    ups = _updates(5, IDS[:4])
    setup = make_setup(IDS[:4], P, CLIP, context=b"test/7")
    spy, seen = _spy()
    monkeypatch.setattr("fedtune.privacy.secagg.driver.SecAggServer", spy)
    run_secure_aggregation(setup, ups)
    run_secure_aggregation(setup, ups)  # same updates, same setup: new keys, new seeds, new masks
    assert len(seen) == 8 and not np.array_equal(seen[0], seen[4])


def _connected(nodes: set[int], setup) -> bool:
    seen, todo = set(), [min(nodes)]
    while todo:
        u = todo.pop()
        if u not in seen:
            seen.add(u)
            todo += [v for v in setup.neighbours(u) if v in nodes and v not in seen]
    return seen == nodes


def test_a_completed_sparse_round_leaves_the_survivors_connected():
    """Masks between survivors cancel only over a connected component: were the survivors' graph split, the
    server would learn each part's sum. With t > k/2 a round completes only if every survivor keeps more than
    k/2 live neighbours, which leaves no gap of k/2 on the ring: random dropout patterns either abort or sum
    over one connected set."""
    ids = list(range(1, 17))
    setup = make_setup(ids, 8, CLIP, num_neighbours=4, context=b"test/8")
    rng = np.random.default_rng(6)
    completed = aborted = 0
    for _ in range(40):
        drops = [frozenset(int(c) for c in ids if rng.random() < p) for p in (0.05, 0.1, 0.1)]
        try:
            out = run_secure_aggregation(setup, {c: np.zeros(8) for c in ids}, Dropouts(*drops))
        except SecAggAbort:
            aborted += 1
            continue
        completed += 1
        assert _connected(set(out.survivors), setup), out.survivors
    assert completed >= 5 and aborted >= 5  # both outcomes were exercised


def _through_masked_input(setup, ups):
    server = SecAggServer(setup)
    clients = {c: SecAggClient(c, setup) for c in setup.cohort}
    peers = server.collect_adverts([c.advertise() for c in clients.values()])
    inbox = server.route_shares([clients[c].share_keys(peers[c]) for c in setup.cohort])
    inputs = {c: clients[c].masked_input(ups[c], inbox[c]) for c in setup.cohort}
    server.collect_masked(list(inputs.values()))
    return server, clients, {c: m.vector for c, m in inputs.items()}


def _looks_masked(y, x, q) -> bool:
    uniform = stats.chisquare(np.bincount(y >> 8, minlength=256)).pvalue > ALPHA
    far = (np.abs(q.dequantize_sum(y - q.quantize(x, np.random.default_rng(0)))) < 0.01).mean() < 0.05
    return uniform and far


def test_what_a_curious_server_can_strip_from_one_input_leaves_it_masked():
    """Each input carries two layers: the pairwise masks and the self mask. A server that gets a survivor's
    seed (it survived) is left with the pairwise masks; one that falsely calls it dropped and gets its mask key
    is left with the self mask. Either way the input stays uniform in the ring."""
    from fedtune.privacy.secagg import crypto, shamir
    from fedtune.privacy.secagg.client import pairwise_mask

    ups = _updates(7)
    target, others = IDS[0], tuple(IDS[1:])
    for claim_dropped in (False, True):
        setup = make_setup(IDS, P, CLIP, context=b"test/9/%d" % claim_dropped)
        server, clients, y = _through_masked_input(setup, ups)
        q = setup.quantizer
        if claim_dropped:
            request = UnmaskRequest(survivors=others, dropped=(target,))
        else:
            request = UnmaskRequest(survivors=tuple(IDS), dropped=())
        replies = [clients[c].unmask(request) for c in others]
        if claim_dropped:
            key = crypto.private_from_bytes(shamir.combine(
                [shamir.Share.from_bytes(r.key_shares[target]) for r in replies], setup.threshold))
            stripped = y[target].copy()
            for v in setup.neighbours(target):
                stripped -= pairwise_mask(key, v, server.adverts[v].mask_public, target, setup)
        else:
            seed = shamir.combine([shamir.Share.from_bytes(r.seed_shares[target]) for r in replies], setup.threshold)
            stripped = y[target] - crypto.prg(seed, P, q.dtype)
        assert _looks_masked(stripped, ups[target], q), claim_dropped
