"""Which features compose: one table in code, checked by ``fedtune validate`` and rendered as docs/composition.md.

Every pair of features either runs (a smoke test trains it end to end) or is refused here, at validate
time, with the field to change, the reason and the fix. Runtime code may assume that what reaches it is
allowed by this table. One exception is not (yet) in the table: ``privacy.clipping: ghost`` is an option of
sample-level DP, not a feature here, and ``config.py`` refuses it with prompt tuning and with the packed engine
(adding it as a feature would add its pairs to the Flower composition matrix).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations


@dataclass(frozen=True)
class Feature:
    name: str
    setting: str  # how a config turns it on
    active: Callable[[object, bool], bool]  # (cfg, deployment) -> on?


def _f(name: str, setting: str, active: Callable[[object, bool], bool]) -> Feature:
    return Feature(name, setting, active)


FEATURES: tuple[Feature, ...] = (
    _f("sample-dp", "privacy.enabled=true", lambda c, d: c.privacy.enabled),
    _f("user-dp", "privacy.user_level.enabled=true", lambda c, d: c.privacy.user_level.enabled),
    _f("fleet-zeropad", "fleet.enabled=true, fleet.rank_aggregation=zeropad",
       lambda c, d: c.fleet.enabled and c.fleet.rank_aggregation == "zeropad"),
    _f("fleet-flexlora", "fleet.enabled=true, fleet.rank_aggregation=flexlora",
       lambda c, d: c.fleet.enabled and c.fleet.rank_aggregation == "flexlora"),
    _f("fedsa-split", "personalization.split=fedsa", lambda c, d: c.personalization.split == "fedsa"),
    _f("ffa-lora", "adapter.method=ffa_lora", lambda c, d: c.adapter.method == "ffa_lora"),
    _f("prompt-tuning", "adapter.method=prompt_tuning", lambda c, d: c.adapter.method == "prompt_tuning"),
    _f("packed", "simulation.packed_group_size>1", lambda c, d: c.simulation.packed_group_size > 1),
    _f("int8-upload", "federation.upload=int8", lambda c, d: c.federation.upload == "int8"),
    _f("fp16-upload", "federation.upload=fp16", lambda c, d: c.federation.upload == "fp16"),
    _f("robust", "federation.aggregation=median or trimmed_mean", lambda c, d: c.federation.aggregation != "fedavg"),
    _f("secure-agg", "privacy.secure_aggregation.enabled=true", lambda c, d: c.privacy.secure_aggregation.enabled),
    _f("deployment", "`fedtune server start` (real devices)", lambda c, d: d),
)
NAMES = tuple(f.name for f in FEATURES)

# pairs that one setting cannot hold at once: nothing to run, nothing to refuse
EXCLUSIVE = {frozenset(p) for p in (("fleet-zeropad", "fleet-flexlora"), ("ffa-lora", "prompt-tuning"),
                                     ("int8-upload", "fp16-upload"))}


@dataclass(frozen=True)
class Refusal:
    field: str  # the config field to change
    reason: str
    fix: str

    def message(self, a: str, b: str) -> str:
        return f"{self.field}: {a} cannot be combined with {b}: {self.reason}; {self.fix}"


_LORA_TIERS = Refusal("fleet.enabled", "device tiers set LoRA ranks, which only LoRA has",
                      "use adapter.method=lora with fleet.enabled, or fleet.enabled=false")
_FEDSA_LORA = Refusal("personalization.split", "fedsa shares lora_A and keeps lora_B private, so it needs plain LoRA",
                      "use adapter.method=lora, or split=none")
_PACKED_LORA = Refusal("simulation.packed_group_size", "the packed engine trains plain LoRA adapters (no frozen A, "
                       "no soft prompt)", "use adapter.method=lora, or packed_group_size=1")
_USER_FLEET = Refusal("privacy.user_level.enabled", "a fleet samples online devices (availability), not the Poisson "
                      "sampling with a known rate the user-level accountant assumes, so its epsilon would not hold",
                      "turn fleet.enabled off for user-level DP, or keep sample-level DP only in a fleet")
_USER_ROBUST = Refusal("federation.aggregation", "DP-FedAvg's guarantee needs its own clipped, noised sum over "
                       "every sampled device", "use aggregation=fedavg, or turn user-level DP off")
_ROBUST_FLEET = Refusal("federation.aggregation", "median and trimmed mean work on same-shape tensors, so every "
                        "tier of the mixture must train the same LoRA rank (min(profile lora_rank, adapter.rank))",
                        "give the tiers one rank (lower adapter.rank to the smallest tier's lora_rank), or use "
                        "aggregation=fedavg")
_SPLIT_FLEXLORA = Refusal("personalization.split", "FlexLoRA aggregates the products B·A, and with fedsa each device "
                          "keeps its B private", "use fleet.rank_aggregation=zeropad (zero-pads the shared A), or "
                          "split=none")
_DEPLOY_FLEET = Refusal("fleet.enabled", "the fleet simulator's devices are virtual",
                        "for real devices set fleet.enabled=false")
_DEPLOY_PACKED = Refusal("simulation.packed_group_size", "packing trains many virtual devices in one process; a "
                         "real device trains only itself", "set packed_group_size=1 for `fedtune server start`")

_SECURE_FLEET = Refusal("privacy.secure_aggregation.enabled", "one SecAgg+ round sums vectors of one layout, and "
                        "fleet tiers upload different LoRA ranks (zero-padding on the device and a per-rank weight "
                        "column would fit; not built yet)", "turn fleet.enabled off, or secure aggregation off")
_SECURE_ROBUST = Refusal("federation.aggregation", "median and trimmed mean need every individual update, which secure "
                         "aggregation hides from the server (it learns only the sum)",
                         "use aggregation=fedavg with secure aggregation, or turn it off")
REFUSED: dict[frozenset, Refusal] = {
    frozenset(("fleet-zeropad", "ffa-lora")): _LORA_TIERS, frozenset(("fleet-flexlora", "ffa-lora")): _LORA_TIERS,
    frozenset(("fleet-zeropad", "prompt-tuning")): _LORA_TIERS,
    frozenset(("fleet-flexlora", "prompt-tuning")): _LORA_TIERS,
    frozenset(("fedsa-split", "ffa-lora")): _FEDSA_LORA, frozenset(("fedsa-split", "prompt-tuning")): _FEDSA_LORA,
    frozenset(("packed", "ffa-lora")): _PACKED_LORA, frozenset(("packed", "prompt-tuning")): _PACKED_LORA,
    frozenset(("user-dp", "fleet-zeropad")): _USER_FLEET, frozenset(("user-dp", "fleet-flexlora")): _USER_FLEET,
    frozenset(("user-dp", "robust")): _USER_ROBUST,
    frozenset(("fedsa-split", "fleet-flexlora")): _SPLIT_FLEXLORA,
    frozenset(("deployment", "fleet-zeropad")): _DEPLOY_FLEET, frozenset(("deployment", "fleet-flexlora")): _DEPLOY_FLEET,
    frozenset(("deployment", "packed")): _DEPLOY_PACKED,
    frozenset(("secure-agg", "fleet-zeropad")): _SECURE_FLEET,
    frozenset(("secure-agg", "fleet-flexlora")): _SECURE_FLEET,
    frozenset(("secure-agg", "robust")): _SECURE_ROBUST,
}


def _tier_ranks(cfg) -> set[int] | None:
    """The LoRA ranks the fleet's tiers train (None when the catalog cannot be read; config reports that)."""
    from fedtune.fleet import load_catalog

    try:
        catalog = load_catalog(cfg.fleet.catalog)
        return {min(catalog[name].lora_rank, cfg.adapter.rank) for name in cfg.fleet.mixture}
    except (OSError, KeyError, ValueError):
        return None


def _same_rank_tiers(cfg) -> bool:
    ranks = _tier_ranks(cfg)
    return ranks is None or len(ranks) <= 1


# pairs that run when a condition on the config holds, and are refused (with this refusal) otherwise
CONDITIONAL: dict[frozenset, tuple[Callable[[object], bool], Refusal, str]] = {
    frozenset(("robust", "fleet-zeropad")): (_same_rank_tiers, _ROBUST_FLEET, "same-rank tiers"),
    frozenset(("robust", "fleet-flexlora")): (_same_rank_tiers, _ROBUST_FLEET, "same-rank tiers"),
}


def status(a: str, b: str) -> str:
    """``runs``, ``conditional`` (runs when its condition holds), ``refused`` or ``exclusive``."""
    key = frozenset((a, b))
    if key in EXCLUSIVE:
        return "exclusive"
    if key in CONDITIONAL:
        return "conditional"
    return "refused" if key in REFUSED else "runs"


def active_features(cfg, deployment: bool = False) -> list[str]:
    return [f.name for f in FEATURES if f.active(cfg, deployment)]


def refusals(cfg, deployment: bool = False) -> list[str]:
    """One message per refused pair the config turns on (field first, then the reason and the fix)."""
    on = active_features(cfg, deployment)
    out = []
    for a, b in combinations(on, 2):
        key = frozenset((a, b))
        refusal = REFUSED.get(key)
        if key in CONDITIONAL and not CONDITIONAL[key][0](cfg):
            refusal = CONDITIONAL[key][1]
        if refusal is not None:
            out.append(refusal.message(a, b))
    return out


def allowed_pairs() -> list[tuple[str, str]]:
    """Pairs that run (conditional ones included: they run when their condition holds)."""
    return [(a, b) for a, b in combinations(NAMES, 2) if status(a, b) in ("runs", "conditional")]


def refused_pairs() -> list[tuple[str, str]]:
    return [(a, b) for a, b in combinations(NAMES, 2) if status(a, b) == "refused"]


def render_markdown() -> str:
    """docs/composition.md: the matrix, then every refusal with its field, reason and fix."""
    mark = {"runs": "✓", "conditional": "✓*", "refused": "✗", "exclusive": "–"}
    lines = ["# Feature composition", "",
             "Generated from `fedtune/federation/capabilities.py` (`python -m fedtune.federation.capabilities "
             "> docs/composition.md`); a test keeps the two equal.", "",
             "✓ runs (`tests/unit/federation/test_matrix.py` trains every ✓ pair one round through the in-process "
             "backend and checks its privacy label; `tests/integration/test_flower_matrix.py` trains them through "
             "the Flower engine, several features per run: 10 runs cover every pair under `-m slow`, 2 of them "
             "(22 pairs) in the default suite; packed × secure-agg runs in process only, as on Flower each device "
             "trains in its own secure-aggregation message; pairs with deployment need real devices and are not "
             "in these smokes (secure-agg × deployment runs in `tests/integration/test_deployment.py`), ✓* runs when a condition holds and is refused otherwise, "
             "✗ refused by `fedtune validate` (reason and fix below), – one setting cannot hold both.", "",
             "| feature | how to turn it on |", "|---|---|"]
    lines += [f"| {f.name} | {f.setting} |" for f in FEATURES]
    lines += ["", "| | " + " | ".join(NAMES) + " |", "|---" * (len(NAMES) + 1) + "|"]
    for a in NAMES:
        cells = ["" if a == b else mark[status(a, b)] for b in NAMES]
        lines.append(f"| **{a}** | " + " | ".join(cells) + " |")
    lines += ["", "## Refused pairs", "", "| pair | field | reason | fix |", "|---|---|---|---|"]
    for a, b in refused_pairs():
        r = REFUSED[frozenset((a, b))]
        lines.append(f"| {a} × {b} | `{r.field}` | {r.reason} | {r.fix} |")
    lines += ["", "## Conditional pairs", "", "| pair | runs with | otherwise refused: field | reason | fix |",
              "|---|---|---|---|---|"]
    for key, (_, r, condition) in CONDITIONAL.items():
        a, b = sorted(key, key=NAMES.index)
        lines.append(f"| {a} × {b} | {condition} | `{r.field}` | {r.reason} | {r.fix} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_markdown(), end="")
