"""Adapters from the registry: the same verified pull as `fedtune device pull`, polled, hot-swapped.

Each ``Subscription`` is one served adapter: a registry channel (e.g. ``stable``, or one channel per
user such as ``user-42``) pulled into its own device state directory by ``fedtune.registry.device``
(signature, base-model hash, every file's sha256, rollout bucket, rollback block). The watcher:
1. ``poll_once``: pull every subscription; a pull that installs a newer version registers it in the pool
   (the scheduler switches to it between batches). A pull that fails verification changes nothing: the
   device pointer still names the previous version and the pool keeps serving it.
2. ``start``: poll every ``interval_s`` in a daemon thread until ``stop``.
Every load re-verifies the version directory (``DeviceState.verify_version``), so files altered on disk
after the pull are refused too.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from fedtune.registry.device import DeviceClient, DeviceConfig
from fedtune.registry.device_state import DeviceState
from fedtune.registry.errors import NotFoundError, RegistryError
from fedtune.registry.manifest import Manifest
from fedtune.registry.signing import VerifyKey
from fedtune.serve.pool import AdapterPool, AdapterSource, check_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Subscription:
    name: str  # the model id clients send
    channel: str


@dataclass(frozen=True)
class PollOutcome:
    name: str
    status: str  # updated | unchanged | none | blocked | refused | unreachable
    active: int | None
    detail: str = ""


def parse_subscription(text: str) -> Subscription:
    """``CHANNEL`` or ``NAME=CHANNEL`` (``--channel``)."""
    name, _, channel = text.rpartition("=")
    return Subscription(check_name(name or channel), channel)


def registry_source(name: str, channel: str, state: DeviceState, key: VerifyKey, version: int,
                    manifest: Manifest) -> AdapterSource:
    m = manifest
    return AdapterSource(
        name=name, path=state.version_dir(version), version=version, origin="registry",
        privacy=m.privacy.model_dump(),
        info={"channel": channel, "artifact": m.name, "base_model": m.base_model.id, "run": m.source.run,
              "round": m.source.round, "metrics": dict(m.metrics), "created_at": m.created_at, "verified": True},
        verify=lambda: state.verify_version(version, key) and None)


class RegistryWatcher:
    def __init__(self, pool: AdapterPool, server: str, key: VerifyKey, base_model_id: str, state_root: Path,
                 subscriptions: list[Subscription], base_model_sha256: str | None = None,
                 device_id: str | None = None, interval_s: float = 30.0, http=None):
        if not subscriptions:
            raise ValueError("registry: expected at least one channel to serve (--channel stable)")
        self.pool, self.key, self.interval_s = pool, key, interval_s
        self.clients: dict[str, tuple[Subscription, DeviceClient]] = {}
        for sub in subscriptions:
            cfg = DeviceConfig(server=server, base_model_id=base_model_id, trusted_key=key, channel=sub.channel,
                               base_model_sha256=base_model_sha256)
            self.clients[sub.name] = (sub, DeviceClient(Path(state_root) / sub.name, cfg, device_id, http=http))
        self.last: dict[str, PollOutcome] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self) -> list[PollOutcome]:
        return [self._poll(sub, client) for sub, client in self.clients.values()]

    def _poll(self, sub: Subscription, client: DeviceClient) -> PollOutcome:
        try:
            r = client.pull()
            outcome = PollOutcome(sub.name, r.status, r.active)
        except RegistryError as err:  # bad signature / hash / base model: refused, nothing switched
            outcome = PollOutcome(sub.name, "refused", client.state.pointer().active, str(err))
            log.warning("%s: refused the registry's offer, still serving v%s: %s", sub.name, outcome.active, err)
        except Exception as err:  # noqa: BLE001 - registry down, network: keep serving what we have
            outcome = PollOutcome(sub.name, "unreachable", client.state.pointer().active, str(err))
            log.warning("%s: registry unreachable, still serving v%s: %s", sub.name, outcome.active, err)
        self._register_active(sub, client)
        self.last[sub.name] = outcome
        return outcome

    def _register_active(self, sub: Subscription, client: DeviceClient) -> None:
        current = self.pool.source(sub.name)
        active = client.state.pointer().active
        if active is None or (current is not None and current.version == active):
            return
        try:
            _, manifest = client.state.active(self.key)  # verified now
        except (RegistryError, NotFoundError) as err:
            log.warning("%s: local v%s failed verification, not served: %s", sub.name, active, err)
            return
        self.pool.register(registry_source(sub.name, sub.channel, client.state, self.key, active, manifest))

    def start(self) -> "RegistryWatcher":
        self._thread = threading.Thread(target=self._loop, name="fedtune-serve-watcher", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll_once()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        for _, client in self.clients.values():
            client.close()
