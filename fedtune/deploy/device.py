"""A real device's side of a round, Flower-free: its settings, its own data, its eligibility, its micro-batch cap.

A SuperNode started by ``fedtune device join`` carries in its node config:

    data-path     the device's own JSONL / CSV / Parquet file (every row is this device's)
    profile       a device profile name from the catalog (configs/devices); its batch size caps the micro-batch
    eligibility   an eligibility policy spec (fedtune/deploy/eligibility.py), default "always"
    device-id     a stable name for this device (its privacy ledger's key), default the SuperNode's node id
    state-dir     where the device keeps its privacy ledger (default: ~/.fedtune/device)

A node config without ``data-path`` is a simulation's virtual node (``partition-id``) and none of this applies.
``fedtune.flower.device`` reads the node config from Flower's context and answers a decline as a message.
"""

from __future__ import annotations

import functools
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

from fedtune.deploy.eligibility import HostSignals, Verdict, create_policy
from fedtune.fleet.profiles import DeviceProfile, load_catalog
from fedtune.types import ClientData


@dataclass(frozen=True)
class DeviceSettings:
    data_path: str
    profile: str
    eligibility: str
    device_id: str
    state_dir: str

    @property
    def index(self) -> int:
        """A stable integer for this device (its training seed stream and its ``device`` metric)."""
        return zlib.crc32(self.device_id.encode()) % 2**31


def settings_from_node_config(nc, node_id) -> DeviceSettings | None:
    """A SuperNode's deployment settings, or None for a simulation's virtual node (no ``data-path``)."""
    if "data-path" not in nc:
        return None
    return DeviceSettings(
        data_path=str(nc["data-path"]), profile=str(nc.get("profile", "")),
        eligibility=str(nc.get("eligibility", "always")),
        device_id=str(nc.get("device-id", "") or f"node-{node_id}"),
        state_dir=str(nc.get("state-dir", "") or Path.home() / ".fedtune" / "device"))


def check_eligibility(settings: DeviceSettings, signals=None) -> Verdict:
    return create_policy(settings.eligibility)(signals or HostSignals())


@functools.lru_cache(maxsize=4)
def device_profile(name: str, catalog: str) -> DeviceProfile | None:
    if not name:
        return None
    profiles = load_catalog(catalog)
    if name not in profiles:
        raise ValueError(f"device profile {name!r} is not in {catalog}; available: {sorted(profiles)}")
    return profiles[name]


@functools.lru_cache(maxsize=4)
def _device_data(path: str, data_json: str, model_json: str, seed: int, user_id: str, version: tuple = ()
                 ) -> ClientData:
    from fedtune.config import DataConfig, ModelConfig
    from fedtune.data.local_file import load_device_data
    from fedtune.models import load_encoder

    encoder = load_encoder(ModelConfig.model_validate_json(model_json))
    return load_device_data(path, DataConfig.model_validate_json(data_json), encoder, seed, user_id)


def device_data(cfg, settings: DeviceSettings) -> ClientData:
    """The device's own file, tokenized once per process and again when the file changes (a warm ClientApp
    process serves many rounds: fedtune/flower/warm_runtime.py)."""
    try:
        st = os.stat(settings.data_path)
        version = (st.st_mtime_ns, st.st_size)
    except OSError:
        version = ()  # load_device_data names the missing file
    return _device_data(settings.data_path, cfg.data.model_dump_json(), cfg.model.model_dump_json(), cfg.seed,
                        settings.device_id, version)


def device_micro_batch(cfg, settings: DeviceSettings) -> int | None:
    """The most sequences one forward/backward of this device holds (``train_local``'s micro-batch): its
    profile's ``batch_size`` (the step its memory tier holds, configs/devices), or the run's
    ``train.physical_batch_size`` if that is smaller; None (whole logical batches) with neither.

    The memory cap bounds the micro-batch, not the logical batch the server planned: the device still
    trains that batch (under DP its Poisson rate, hence its noise calibration and its sit-out check, are
    the server's plan), accumulated over micro-batches, and the cap holds for every forward, a Poisson
    batch above its expected size included."""
    from fedtune.fleet.profiles import DEFAULT_CATALOG_DIR

    catalog = cfg.fleet.catalog if Path(cfg.fleet.catalog).is_dir() else str(DEFAULT_CATALOG_DIR)
    profile = device_profile(settings.profile, catalog)
    caps = [c for c in (cfg.train.physical_batch_size, profile.batch_size if profile else None) if c is not None]
    return min(caps) if caps else None
