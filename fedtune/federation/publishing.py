"""Publishing the global adapter to a registry from inside a run (``publish`` section), on either backend.

Due at the final round (``at_end``) and every ``every_n_rounds``; the published version goes to the run's
events and into the checkpoint (``registry``), so a resumed run knows what it already published.
"""

from __future__ import annotations

from pathlib import Path


def publish_due(pub, server_round: int, final_round: int) -> bool:
    if not pub.registry:
        return False
    return (pub.at_end and server_round == final_round) or (
        pub.every_n_rounds is not None and server_round > 0 and server_round % pub.every_n_rounds == 0)


def maybe_publish(cfg, run, server_round: int, final_round: int) -> dict | None:
    """Sign and publish ``adapters/round-N`` if due; returns the registry state (None when not due)."""
    pub = cfg.publish
    if not publish_due(pub, server_round, final_round):
        return None
    from fedtune.registry import Registry, load_signing_key, publish_run

    signed = publish_run(run.root, Registry(Path(pub.registry)), load_signing_key(Path(pub.signing_key)),
                         round=server_round, name=pub.name)
    run.append_event({"event": "published", "round": server_round, "version": signed.manifest.version,
                      "registry": pub.registry})
    return {"registry": pub.registry, "version": signed.manifest.version, "round": server_round}
