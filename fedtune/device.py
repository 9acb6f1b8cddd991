"""fedtune for device apps: join training, check eligibility, pull and use the published adapter, from Python.

The same operations as ``fedtune device join|pull|status``, as plain functions that return values and raise
:class:`~fedtune.errors.UserError` on bad input (nothing here prints)::

    import fedtune.device as fd

    if fd.eligibility("charging+idle").eligible:
        session = fd.join("fl.example.com:9092", data="me.jsonl", root_certificates="ca.crt",
                          auth_key="me.key", state_dir="~/.myapp/fedtune")   # runs in the background
        ...
        session.stop()
    fd.pull("https://registry.example.com", base_model="smollm2-135m", public_key="fedtune.pub",
            state_dir="~/.myapp/fedtune")
    adapter = fd.current_adapter("~/.myapp/fedtune", public_key="fedtune.pub")  # verified now; None if none
    if adapter is not None:
        model = adapter.load(base_model)

Training rounds run in one long-lived ClientApp process per device (the base model loads once); joining,
eligibility and the registry pull are thin wrappers over fedtune.deploy and fedtune.registry.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from fedtune.deploy.device_runner import DeviceRunner, checked_join
from fedtune.deploy.eligibility import DeviceSignals, HostSignals, Verdict, create_policy
from fedtune.deploy.supernode import DeviceJoin
from fedtune.errors import UserError

DEFAULT_STATE = Path.home() / ".fedtune" / "device"


def _path(p: str | Path | None) -> Path | None:
    return None if p is None else Path(p).expanduser()


def eligibility(policy: str = "always", signals: DeviceSignals | None = None) -> Verdict:
    """Whether this device may train now under ``policy`` (``always``, ``charging``, ``idle``, ``unmetered``,
    ``memory:GB``, ``never``; combine with ``+``). ``signals`` defaults to this host's."""
    try:
        rule = create_policy(policy)
    except ValueError as err:
        raise UserError(f"eligibility {policy!r}: {err}") from None
    return rule(signals or HostSignals())


class DeviceSession:
    """A device that has joined: its SuperNode and warm ClientApp process, kept up in a background thread."""

    def __init__(self, runner: DeviceRunner):
        self.runner, self.error = runner, None
        self._thread = threading.Thread(target=self._run, name="fedtune-device", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.runner.run()
        except Exception as err:  # kept for the app: a refused key is a UserError
            self.error = err

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def state_dir(self) -> Path:
        return self.runner.state

    def rounds(self) -> list[dict]:
        """The rounds this device trained in (its ``client_done`` events: round, loss, ε, seconds)."""
        from fedtune.workspace import read_jsonl

        return [e for p in sorted(self.state_dir.glob("runs/*/events.jsonl")) for e in read_jsonl(p)
                if e.get("event") == "client_done"]

    def stop(self, timeout: float = 30.0) -> None:
        self.runner.stop()
        self._thread.join(timeout)

    def wait(self, timeout: float | None = None) -> None:
        """Block until the session ends (stop(), or a refusal: then raise it)."""
        self._thread.join(timeout)
        if self.error is not None:
            raise self.error


def join(superlink: str, data: str | Path, *, root_certificates: str | Path | None = None,
         auth_key: str | Path | None = None, profile: str = "", eligibility: str = "always", device_id: str = "",
         state_dir: str | Path = DEFAULT_STATE, insecure: bool = False, warm: bool = True) -> DeviceSession:
    """Join the federation at ``superlink`` (HOST:PORT) and train in the rounds this device is picked for,
    in the background. Raises UserError on a bad argument or an unreachable SuperLink."""
    if not insecure and root_certificates is None:
        raise UserError("root_certificates: TLS needs the CA certificate (ca.crt from the server operator), or "
                        "pass insecure=True for a loopback trial")
    data = Path(data).expanduser()
    spec = DeviceJoin(superlink=superlink, data_path=data, profile=profile,
                      root_certificates=_path(root_certificates), auth_key=_path(auth_key), eligibility=eligibility,
                      device_id=device_id or data.stem, state_dir=_path(state_dir), insecure=insecure, warm=warm)
    return DeviceSession(DeviceRunner(checked_join(spec)))


@dataclass(frozen=True)
class ActiveAdapter:
    """The adapter this device uses now, verified (signature and file hashes) when it was returned."""

    path: Path
    version: int
    name: str
    epsilon: float | None
    privacy_level: str
    base_model: str
    state_dir: Path
    public_key: Path

    def load(self, base_model):
        """``base_model`` with this adapter attached (verified again while loading)."""
        from fedtune.registry.device import load_active_adapter
        from fedtune.registry.metadata import load_anchor

        return load_active_adapter(base_model, self.state_dir, load_anchor(self.public_key))


@dataclass(frozen=True)
class DeviceStatus:
    device_id: str
    active: int | None
    previous: int | None
    blocked: tuple[int, ...]
    adapter: ActiveAdapter | None  # None: no active version, or it failed verification (``problem`` says why)
    problem: str | None = None


def _existing_state(state_dir: str | Path) -> Path:
    state = Path(state_dir).expanduser()
    if not state.is_dir():
        raise UserError(f"state_dir {state}: no device state there (not a directory); pass the state_dir this "
                        "device pulled into")
    return state


def current_adapter(state_dir: str | Path = DEFAULT_STATE, public_key: str | Path = "fedtune-signing.pub"
                    ) -> ActiveAdapter | None:
    """The active adapter, verified now; None when this device has none yet."""
    from fedtune.registry.device_state import DeviceState
    from fedtune.registry.metadata import load_anchor

    state, key = _existing_state(state_dir), Path(public_key).expanduser()
    ds = DeviceState(state)
    if ds.pointer().active is None:
        return None
    path, m = ds.active(load_anchor(key))
    return ActiveAdapter(path=Path(path), version=int(m.version), name=m.name, epsilon=m.privacy.epsilon,
                         privacy_level=m.privacy.level, base_model=m.base_model.id, state_dir=state, public_key=key)


def status(state_dir: str | Path = DEFAULT_STATE, public_key: str | Path = "fedtune-signing.pub") -> DeviceStatus:
    """What this device keeps: its id, active / previous / blocked versions, and the verified active adapter."""
    from fedtune.registry.device_state import DeviceState
    from fedtune.registry.errors import RegistryError

    ds = DeviceState(_existing_state(state_dir))
    ptr = ds.pointer()
    adapter, problem = None, None
    try:
        adapter = current_adapter(state_dir, public_key)
    except RegistryError as err:  # e.g. a corrupted active version: report it, as `fedtune device status` does
        problem = " ".join(str(err).split())
    return DeviceStatus(device_id=ds.device_id(), active=ptr.active, previous=ptr.previous,
                        blocked=tuple(ptr.blocked), adapter=adapter, problem=problem)


def pull(server: str, base_model: str, public_key: str | Path, state_dir: str | Path = DEFAULT_STATE, *,
         channel: str = "stable", base_sha256: str | None = None, device_id: str | None = None,
         force: bool = False, deadline_s: float = 600.0, artifact: str | None = None):
    """Fetch the adapter the channel's signed metadata names for this device, verify it and switch to it
    atomically; returns the registry's PullResult (status ``updated`` / ``unchanged`` / ``none`` / ``blocked``
    / ``repaired``, versions, bytes). ``public_key``: the publisher's .pub or a root metadata file."""
    import httpx

    from fedtune.registry.device import DeviceClient, DeviceConfig
    from fedtune.registry.metadata import load_anchor

    cfg = DeviceConfig(server=server, base_model_id=base_model, trusted_key=load_anchor(Path(public_key)),
                       channel=channel, base_model_sha256=base_sha256, deadline_s=deadline_s, artifact=artifact)
    try:
        with DeviceClient(Path(state_dir).expanduser(), cfg, device_id=device_id) as dev:
            return dev.pull(force=force)
    except httpx.HTTPError as err:
        raise UserError(f"cannot reach the registry at {server}: {err}; check the address") from None
