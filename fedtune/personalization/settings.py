"""The benchmark's privacy settings and the comparison of the two DP ones at equal ε.

    off   no DP anywhere;
    on    per-device DP-SGD (opacus), each device's noise calibrated to ``privacy.target_epsilon`` from its own
          sampling rate, its personal steps within ``privacy.device_epsilon_budget`` (else the target);
    user  user-level DP-FedAvg on the server (``privacy.user_level``: each update clipped, Gaussian noise on
          the sum, Poisson-sampled devices), its ε target and δ set to the DP-on setting's device budget and δ,
          so the two are compared at equal (ε, δ); no DP-SGD on the devices.

Under ``user`` the guarantee is the federation's: it covers every adapter the server releases. A device's
personal steps (global + FT, its selected personalized model, local-only) use its own data only and never
leave the device, so they run without DP-SGD and spend no budget; the ε the table shows for the methods that
start from the global adapter is the server ledger's user-level ε (the federation's records), not the config.
"""

from __future__ import annotations

from fedtune.config import ExperimentConfig

SETTINGS = ("off", "on", "user")
DIRS = {"off": "dp-off", "on": "dp-on", "user": "dp-user"}
# methods whose model starts from the federation's global adapter (they inherit its user-level guarantee)
FROM_GLOBAL = ("global", "finetune", "personalized", "split")


def setting_name(setting: bool | str) -> str:
    """``True``/``False`` (the old DP on/off flags) or one of ``SETTINGS``."""
    name = {True: "on", False: "off"}.get(setting, setting) if isinstance(setting, bool) else setting
    if name not in SETTINGS:
        raise ValueError(f"privacy setting {setting!r}: expected one of {', '.join(SETTINGS)}")
    return name


def device_budget(cfg: ExperimentConfig) -> float | None:
    """The per-device ε budget the DP-on setting holds each device to (None: noise set by multiplier)."""
    return cfg.privacy.device_epsilon_budget or cfg.privacy.target_epsilon


def user_level_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The ``user`` setting's config: DP-SGD off on devices, user-level DP-FedAvg on with the DP-on setting's
    device budget as its ε target and the same δ. Raises ValueError when there is no ε to match."""
    p = cfg.privacy
    eps = device_budget(cfg)
    if eps is None:
        raise ValueError("the user-level setting is compared at the DP-on setting's ε: set privacy.target_epsilon "
                         "(or privacy.device_epsilon_budget), e.g. --set privacy.target_epsilon=8")
    user = p.user_level.model_copy(update={"enabled": True, "target_epsilon": eps, "epsilon_budget": None,
                                           "delta": p.delta})
    return cfg.model_copy(update={"privacy": p.model_copy(update={"enabled": False, "user_level": user})})


def user_level_refusal(cfg: ExperimentConfig, population: int) -> str | None:
    """Why user-level DP-FedAvg cannot run this configuration (``plan_user_level``'s own words), else None."""
    from fedtune.privacy.dp_fedavg import plan_user_level

    if cfg.fleet.enabled:
        population = cfg.fleet.population or population
    try:
        plan_user_level(cfg.privacy.user_level, population, cfg.federation.clients_per_round, cfg.federation.rounds)
    except ValueError as err:
        return str(err)
    return None


def _personalized(setting: dict) -> dict | None:
    rows = {m["method"]: m for m in setting.get("methods", [])}
    return rows.get("personalized") or rows.get(setting.get("best_personalized") or "")


def comparison(settings: list[dict]) -> dict | None:
    """Per-device DP-SGD vs user-level DP-FedAvg, from the two settings' personalized rows (None unless both
    ran): which has the lower median per-user change vs its global adapter, and the lower mean perplexity."""
    by = {s.get("setting"): s for s in settings if not s.get("refused")}
    if "on" not in by or "user" not in by:
        return None
    rows = {k: _personalized(by[k]) for k in ("on", "user")}
    if None in rows.values():
        return None
    names = {"on": "per-device DP-SGD", "user": "user-level DP-FedAvg"}

    def winner(key: str) -> str | None:
        a, b = rows["on"][key], rows["user"][key]
        if a is None or b is None or a == b:
            return None
        return names["on"] if a < b else names["user"]

    out = {"method": rows["on"]["method"], "epsilon_device": by["on"].get("max_epsilon"),
           "epsilon_user": by["user"].get("federation_epsilon"),
           "median_change_vs_global": {k: rows[k]["median_change_vs_global"] for k in rows},
           "mean_perplexity": {k: rows[k]["mean_perplexity"] for k in rows},
           "better_median_change": winner("median_change_vs_global"),
           "better_mean_perplexity": winner("mean_perplexity")}
    return out


def comparison_line(c: dict | None) -> str | None:
    if c is None:
        return None
    m, p = c["median_change_vs_global"], c["mean_perplexity"]

    def pct(x):
        return "n/a" if x is None else f"{100 * x:+.1f}%"

    eps_on = "n/a" if c["epsilon_device"] is None else f"{c['epsilon_device']:.2f}"
    eps_user = "n/a" if c["epsilon_user"] is None else f"{c['epsilon_user']:.2f}"
    return (f"**Per-device DP-SGD vs user-level DP-FedAvg** ({c['method']}; max device ε {eps_on}, user-level ε "
            f"{eps_user}): median change vs global {pct(m['on'])} vs {pct(m['user'])}, better: "
            f"**{c['better_median_change'] or 'tie'}**; mean perplexity {p['on']:.2f} vs {p['user']:.2f}, "
            f"better: **{c['better_mean_perplexity'] or 'tie'}**")
