"""Device profiles: what one tier of devices can do (memory, speed, network, LoRA rank, daily availability).

A catalog is a directory of YAML files, one profile each (``configs/devices/``). ``load_catalog`` validates
every file and reports every problem at once, each naming its file and field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Throughputs in a profile are for a model of this many parameters; tokens/s scale as 1/params.
REFERENCE_PARAMS = 135_000_000

# configs/devices/ of the source tree this package lives in
DEFAULT_CATALOG_DIR = Path(__file__).resolve().parents[2] / "configs" / "devices"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AvailabilityWindow(_Frozen):
    """Local hours [start_hour, end_hour) in which the device is available with ``probability``.

    A window with start_hour > end_hour wraps midnight: {22, 7} covers 22:00-24:00 and 00:00-07:00.
    """

    start_hour: float = Field(ge=0, le=24)
    end_hour: float = Field(ge=0, le=24)
    probability: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _not_empty(self) -> AvailabilityWindow:
        if self.start_hour % 24 == self.end_hour % 24:
            raise ValueError(
                f"window {self.start_hour}->{self.end_hour} is empty or ambiguous; for the whole day use "
                "default_probability, otherwise give distinct start and end hours")
        return self

    def segments(self) -> list[tuple[float, float]]:
        """The window as non-wrapping [a, b) intervals within [0, 24)."""
        if self.start_hour < self.end_hour:
            return [(self.start_hour, self.end_hour)]
        return [(self.start_hour, 24.0), (0.0, self.end_hour)]

    def contains(self, hour: float) -> bool:
        """Whether local ``hour`` in [0, 24) lies in the window."""
        return any(a <= hour < b for a, b in self.segments())


class Availability(_Frozen):
    """A daily pattern: per-window probabilities, ``default_probability`` outside every window."""

    default_probability: float = Field(ge=0, le=1)
    windows: list[AvailabilityWindow] = []

    @model_validator(mode="after")
    def _no_overlap(self) -> Availability:
        ws = self.windows
        for i in range(len(ws)):
            for j in range(i + 1, len(ws)):
                pairs = ((a, b) for a in ws[i].segments() for b in ws[j].segments())
                if any(max(a[0], b[0]) < min(a[1], b[1]) for a, b in pairs):
                    raise ValueError(
                        f"windows {i} ({ws[i].start_hour}->{ws[i].end_hour}) and {j} "
                        f"({ws[j].start_hour}->{ws[j].end_hour}) overlap; make them disjoint")
        return self

    def probability_at(self, hour: float) -> float:
        """Probability of being available at local ``hour`` (taken mod 24)."""
        h = hour % 24.0
        for w in self.windows:
            if w.contains(h):
                return w.probability
        return self.default_probability


class DeviceProfile(_Frozen):
    """One device tier. Throughput is for a REFERENCE_PARAMS (135M) model with LoRA; see ``tokens_per_s``."""

    name: str = Field(min_length=1)
    memory_gb: float = Field(gt=0, description="GiB available for the model (VRAM when gpu, else RAM)")
    gpu: bool
    train_tokens_per_s: float = Field(gt=0, description="training tokens/s for a 135M-parameter model")
    upload_mbps: float = Field(gt=0)
    download_mbps: float = Field(gt=0)
    lora_rank: int = Field(gt=0, description="largest LoRA rank this tier trains")
    batch_size: int = Field(gt=0)
    availability: Availability
    dropout_probability: float = Field(ge=0, le=1, description="chance of dropping out mid-round")
    speed_jitter: float = Field(ge=0, description="sigma of the per-round lognormal slowdown")

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * 2**30)

    def tokens_per_s(self, model_params: int) -> float:
        """Training throughput for a model of ``model_params``: train_tokens_per_s * 135e6 / params."""
        if model_params <= 0:
            raise ValueError(f"model_params must be positive, got {model_params}")
        return self.train_tokens_per_s * REFERENCE_PARAMS / model_params


class CatalogError(ValueError):
    """Every problem found in a device catalog, each naming its file."""

    def __init__(self, problems: list[str], source: str):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"device catalog {source} has {len(problems)} problem(s):\n{lines}")


def _format_errors(fname: str, err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<profile>"
        got = e.get("input")
        got_s = "" if isinstance(got, dict | list) else f" (got {got!r})"
        if e["type"] == "extra_forbidden":
            out.append(f"{fname}: {loc}: unknown key; expected one of the DeviceProfile fields")
        else:
            out.append(f"{fname}: {loc}: {e['msg']}{got_s}")
    return out


def load_profile(path: str | Path) -> DeviceProfile:
    """One profile file; raises CatalogError naming the file."""
    path = Path(path)
    problems: list[str] = []
    profile = _load_one(path, problems)
    if problems or profile is None:
        raise CatalogError(problems, str(path))
    return profile


def _load_one(path: Path, problems: list[str]) -> DeviceProfile | None:
    try:
        raw: Any = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        problems.append(f"{path.name}: cannot read YAML: {exc}")
        return None
    if not isinstance(raw, dict):
        problems.append(f"{path.name}: expected a mapping of profile fields, got {type(raw).__name__}")
        return None
    try:
        return DeviceProfile.model_validate(raw)
    except ValidationError as err:
        problems.extend(_format_errors(path.name, err))
        return None


def load_catalog(directory: str | Path = DEFAULT_CATALOG_DIR) -> dict[str, DeviceProfile]:
    """All ``*.yaml`` / ``*.yml`` profiles of ``directory``, by name (sorted).

    Raises CatalogError (a ValueError) listing every bad file, every bad field and every duplicate name.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CatalogError([f"not a directory: {directory}"], str(directory))
    files = sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    if not files:
        raise CatalogError([f"no *.yaml profiles in {directory}"], str(directory))
    problems: list[str] = []
    found: dict[str, tuple[DeviceProfile, str]] = {}
    for path in files:
        profile = _load_one(path, problems)
        if profile is None:
            continue
        if profile.name in found:
            problems.append(f"{path.name}: duplicate profile name {profile.name!r}, already defined in "
                            f"{found[profile.name][1]}; give each profile a unique name")
            continue
        found[profile.name] = (profile, path.name)
    if problems:
        raise CatalogError(problems, str(directory))
    return {name: found[name][0] for name in sorted(found)}
