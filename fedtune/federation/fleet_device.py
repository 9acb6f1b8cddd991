"""A simulated device's side of the fleet: its profile, its dropouts and its simulated time.

Everything is a deterministic function of (device index, seed, round), so the server can predict
what the device will do (its plan) and the device reports what it actually did (its seconds).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from fedtune.fleet import assign_profile, client_seconds, drops_out, load_catalog, slowdown


@functools.lru_cache(maxsize=8)
def catalog(directory: str):
    return load_catalog(directory)


@dataclass(frozen=True)
class FleetDevice:
    index: int
    profile: object  # fedtune.fleet.DeviceProfile
    seed: int
    model_params: int

    def drops_out(self, server_round: int) -> bool:
        return drops_out(self.profile, self.index, server_round, self.seed)

    def seconds(self, server_round: int, download_bytes: int, tokens: int, upload_bytes: int) -> float:
        """Simulated wall time of this round on this device: download + compute + upload."""
        return client_seconds(self.profile, download_bytes=download_bytes, upload_bytes=upload_bytes,
                              tokens=tokens, model_params=self.model_params,
                              slowdown=slowdown(self.profile, self.index, server_round, self.seed))


def fleet_device(cfg, device: int, model_params: int) -> FleetDevice:
    profiles = catalog(cfg.fleet.catalog)
    name = assign_profile(device, cfg.seed, dict(cfg.fleet.mixture))
    return FleetDevice(index=device, profile=profiles[name], seed=cfg.seed, model_params=model_params)
