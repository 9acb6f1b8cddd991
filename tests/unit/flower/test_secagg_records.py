"""The secure-aggregation protocol survives Flower records: every message encoded and decoded on the way."""

import numpy as np

from fedtune.flower.secagg_records import from_record, record_bytes, to_record
from fedtune.privacy.secagg import Dropouts, MaskedInput, make_setup, run_secure_aggregation


def test_a_round_through_flower_records_gives_the_same_sum():
    ids = [3, 5, 8, 13, 21, 34]
    rng = np.random.default_rng(0)
    ups = {c: rng.normal(0, 0.05, 500) for c in ids}
    setup = make_setup(ids, 500, 0.5, num_neighbours=4, context=b"flower/1")
    seen, sizes = [], []

    def through_flower(msg):
        record = to_record(msg)
        sizes.append(record_bytes(record))
        back = from_record(record)
        seen.append(type(back).__name__)
        return back

    out = run_secure_aggregation(setup, ups, Dropouts(before_masked_input=frozenset({8})), transport=through_flower)
    assert np.abs(out.total - sum(ups[c] for c in out.survivors)).max() <= setup.quantizer.max_error(5)
    assert {"KeyAdvert", "list", "MaskedInput", "UnmaskRequest", "UnmaskReply"} <= set(seen)
    masked = to_record(MaskedInput(1, np.arange(500, dtype=np.uint16)))
    assert 1000 <= record_bytes(masked) < 1300  # 2 bytes per value plus framing
    assert from_record(masked).vector.dtype == np.uint16
