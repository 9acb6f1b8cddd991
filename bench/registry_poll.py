"""Registry delivery figures on loopback: metadata sizes, first pull, poll time when nothing changed (tiny adapter).

Run: PYTHONPATH=. python bench/registry_poll.py  (figures in docs/registry.md)
"""
import time, tempfile, statistics
from pathlib import Path
from tests.unit.registry.conftest import write_run, LiveServer
from fedtune.registry import Registry, publish_run
from fedtune.registry.signing import generate_keypair, load_verify_key
from fedtune.registry.service import create_app
from fedtune.registry.device import DeviceClient, DeviceConfig
d = Path(tempfile.mkdtemp())
run = write_run(d / "run", rounds=(1, 2))
key = generate_keypair(d / "k.key"); vk = load_verify_key(d / "k.pub")
reg = Registry(d / "reg")
m = publish_run(run, reg, key, round=1).manifest; reg.promote(1, keys=key)
print("root bytes", len(reg.root_envelope(1)), "timestamp bytes", len(reg.role_envelope("timestamp")),
      "snapshot bytes", len(reg.role_envelope("snapshot")),
      "channel metadata bytes", len(reg.channel_envelope("tiny-llama", "stable")), "manifest bytes", len(reg.row(1).envelope), "adapter bytes", m.total_bytes)
with LiveServer(create_app(reg)) as srv:
    dev = DeviceClient(d / "dev", DeviceConfig(server=srv.url, base_model_id="tiny-llama", trusted_key=vk), device_id="x")
    t = time.perf_counter(); r = dev.pull(); print("first pull", r.status, f"{time.perf_counter()-t:.3f}s", r.downloaded_bytes)
    ts = []
    for _ in range(20):
        t = time.perf_counter(); r = dev.pull(); ts.append(time.perf_counter() - t)
    print("poll", r.status, r.http_status, f"median {statistics.median(ts)*1000:.1f} ms")
