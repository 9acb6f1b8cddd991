"""The composition matrix through the real Flower engine (`fedtune simulate`: ServerApp, ClientApps, Ray).

``tests/unit/federation/test_matrix.py`` trains every allowed pair through the in-process backend; this runs
them through Flower, where the message translation (typed tasks, per-rank adapters, packed groups, int8
deltas against what each device was sent, split private parts kept by the ClientApp) is what could break.
One Flower run costs ~40 s here, so one run trains several features at once: every pair inside a feature
set runs in it. ``COVER`` is computed from the capability table and holds every allowed pair (a test checks
that); it runs under ``-m slow``. The default suite runs two sets (22 of the 47 pairs) chosen for what only
Flower exercises: user-level DP-FedAvg × sample-level DP × int8 × FedSA split × packed (``PackedGrid``, int8
deltas, private parts), and a fleet (zero-pad, same-rank tiers) × median × FedSA split × packed × fp16 ×
sample-level DP (per-rank messages, the coordinator's settling, packed tiers).
"""

import json
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest

from fedtune.config import config_from_dict, dump_config
from fedtune.federation import capabilities as cap
from tests.unit.federation.test_matrix import IN_PROCESS, _config, assert_labelled_by_what_ran

ROOT = Path(__file__).resolve().parents[2]
SIMULATION = {"num_cpus_per_client": 1, "max_concurrent_clients": 2}


# under secure aggregation the Flower backend trains each device in its own masked-input message (no
# PackedGrid), so a run with both would not exercise packing: they never share a Flower run, and their pair
# is trained by the in-process matrix only
APART = frozenset(("packed", "secure-agg"))


def _runs_together(features: tuple[str, ...]) -> bool:
    return not APART <= set(features) and all(cap.status(a, b) in ("runs", "conditional") for a, b in combinations(features, 2))


def cover(pairs: list[tuple[str, str]]) -> list[tuple[str, ...]]:
    """Feature sets in which every pair runs, that between them hold every pair of ``pairs`` (greedy:
    start from the first uncovered pair, add the feature that covers most uncovered pairs, repeat)."""
    left = {frozenset(p) for p in pairs}
    names = [n for n in cap.NAMES if any(n in p for p in left)]
    sets = []
    while left:
        current = list(min(left, key=lambda p: sorted(cap.NAMES.index(n) for n in p)))
        while True:
            gain = {n: sum(frozenset((n, m)) in left for m in current) for n in names
                    if n not in current and _runs_together((*current, n))}
            best = max(gain, key=gain.get, default=None)
            if best is None or gain[best] == 0:
                break
            current.append(best)
        features = tuple(sorted(current, key=cap.NAMES.index))
        left -= {frozenset(p) for p in combinations(features, 2)}
        sets.append(features)
    return sets


# every pair the in-process matrix trains; secure aggregation's stages run as Flower messages (secagg_grid)
FLOWER_PAIRS = [p for p in IN_PROCESS if frozenset(p) != APART]
COVER = cover(FLOWER_PAIRS)
DEFAULT = [("sample-dp", "user-dp", "fedsa-split", "packed", "int8-upload"),
           ("sample-dp", "fleet-zeropad", "fedsa-split", "packed", "fp16-upload", "robust")]


def test_the_cover_holds_every_allowed_pair_and_only_sets_that_run():
    covered = {frozenset(p) for s in COVER for p in combinations(s, 2)}
    assert covered >= {frozenset(p) for p in FLOWER_PAIRS}
    assert all(_runs_together(s) for s in COVER + DEFAULT)
    assert len(COVER) < len(FLOWER_PAIRS) / 3  # the point of covering: far fewer Flower runs than pairs


def _simulate(features: tuple[str, ...], tmp_path: Path) -> tuple[dict, dict, object]:
    raw = _config(features).to_dict()
    raw["simulation"] = {**raw["simulation"], **SIMULATION}
    cfg = config_from_dict(raw)
    assert cap.refusals(cfg) == [] and set(cap.active_features(cfg)) == set(features)
    path, out = tmp_path / "config.yaml", tmp_path / "run"
    dump_config(cfg, path)
    proc = subprocess.run([sys.executable, "-m", "fedtune.cli", "simulate", str(path), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    meta = json.loads((out / "adapters" / "round-1" / "fedtune.json").read_text())
    assert last["engine"] == "flower"
    return last, meta, cfg


@pytest.mark.parametrize("features", DEFAULT, ids="×".join)
def test_feature_sets_run_through_flower_labelled_by_what_ran(features, tmp_path):
    last, meta, cfg = _simulate(features, tmp_path)
    assert_labelled_by_what_ran(last, meta, features, cfg)
    if "packed" in features:  # the devices' own DP-SGD ran on each packed device
        assert all(c.get("epsilon", 0) > 0 for c in last["clients"]) == ("sample-dp" in features)


@pytest.mark.slow
@pytest.mark.parametrize("features", COVER, ids="×".join)
def test_every_allowed_pair_runs_through_flower(features, tmp_path):
    last, meta, cfg = _simulate(features, tmp_path)
    assert_labelled_by_what_ran(last, meta, features, cfg)
