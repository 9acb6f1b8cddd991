"""The fleet: device profiles, fleet mixtures, capability plans, availability / dropout, the simulated clock.

Pure logic over configs and seeds; nothing here loads a model, touches data or imports Flower.

1. ``load_catalog`` reads the device profiles (``configs/devices/*.yaml``).
2. ``assign_profile(i, seed, mixture)`` gives virtual device i its profile, without a population table.
3. ``sample_cohort`` draws the round's cohort among devices that ``is_available`` at the clock's time.
4. ``plan_device`` turns a profile into a round plan: quantization, rank, batch, steps before the deadline.
5. ``slowdown`` / ``drops_out`` / ``client_seconds`` give each device's simulated round time;
   the server advances its ``SimClock`` by the round's duration.
"""

from fedtune.fleet.capability import DevicePlan, choose_quantization, plan_device, transfer_seconds
from fedtune.fleet.clock import (
    SimClock,
    client_seconds,
    drops_out,
    is_available,
    local_hour,
    slowdown,
    timezone_offset,
)
from fedtune.fleet.mixture import MixtureError, assign_profile, tier_counts, validate_mixture
from fedtune.fleet.profiles import (
    DEFAULT_CATALOG_DIR,
    REFERENCE_PARAMS,
    Availability,
    AvailabilityWindow,
    CatalogError,
    DeviceProfile,
    load_catalog,
    load_profile,
)
from fedtune.fleet.sampler import sample_cohort

__all__ = [
    "DEFAULT_CATALOG_DIR",
    "REFERENCE_PARAMS",
    "Availability",
    "AvailabilityWindow",
    "CatalogError",
    "DevicePlan",
    "DeviceProfile",
    "MixtureError",
    "SimClock",
    "assign_profile",
    "choose_quantization",
    "client_seconds",
    "drops_out",
    "is_available",
    "load_catalog",
    "load_profile",
    "local_hour",
    "plan_device",
    "sample_cohort",
    "slowdown",
    "tier_counts",
    "timezone_offset",
    "transfer_seconds",
    "validate_mixture",
]
