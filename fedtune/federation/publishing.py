"""Publishing the global adapter to a registry from inside a run (``publish`` section), on either backend.

Due at the final round (``at_end``) and every ``every_n_rounds``; the published version goes to the run's
events and into the checkpoint (``registry``), so a resumed run knows what it already published.

What the signed manifest says about the data: the run's privacy guarantee (level, ε, δ, mechanism,
accountant, from the mechanisms that ran) and only the round metrics the config allows by name
(``publish.metrics``, default none). Round statistics are computed on users' data and are not covered by
the guarantee, so a product team opts into each one; an unknown name is refused by ``fedtune validate``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

# the numeric fields of a metrics.jsonl record a product team may allow into a manifest (ε and δ are not
# here: they are part of the guarantee, always published)
PUBLISHABLE_METRICS = ("eval_loss", "eval_perplexity", "eval_accuracy", "train_loss", "clients_sampled",
                       "clients_succeeded", "clients_failed", "upload_bytes", "adapter_bytes", "wall_seconds",
                       "sim_round_seconds")


def unknown_metrics(names: Sequence[str]) -> list[str]:
    """The names in ``names`` that are not publishable round metrics (what ``fedtune validate`` refuses)."""
    return [n for n in names if n not in PUBLISHABLE_METRICS]


def publish_due(pub, server_round: int, final_round: int) -> bool:
    if not pub.registry:
        return False
    return (pub.at_end and server_round == final_round) or (
        pub.every_n_rounds is not None and server_round > 0 and server_round % pub.every_n_rounds == 0)


def maybe_publish(cfg, run, server_round: int, final_round: int) -> dict | None:
    """Sign and publish ``adapters/round-N`` if due; returns the registry state (None when not due).

    The manifest carries the allowed ``publish.metrics`` this round has (a metric the round did not produce,
    e.g. ``train_loss`` of a skipped round, is left out and logged, never invented).
    """
    pub = cfg.publish
    if not publish_due(pub, server_round, final_round):
        return None
    from fedtune.registry import Registry, load_signing_key, publish_run

    signed = publish_run(run.root, Registry(Path(pub.registry)), load_signing_key(Path(pub.signing_key)),
                         round=server_round, name=pub.name, metrics=tuple(pub.metrics), missing_ok=True)
    left_out = sorted(set(pub.metrics) - set(signed.manifest.metrics))
    if left_out:
        log.warning("round %d has no finite %s; published v%d without it", server_round, ", ".join(left_out),
                    signed.manifest.version)
    run.append_event({"event": "published", "round": server_round, "version": signed.manifest.version,
                      "registry": pub.registry, "metrics": sorted(signed.manifest.metrics)})
    return {"registry": pub.registry, "version": signed.manifest.version, "round": server_round}
