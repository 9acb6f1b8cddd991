"""Device catalog: the shipped profiles load; bad catalogs report every problem at once, by file."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from fedtune.fleet import DEFAULT_CATALOG_DIR, AvailabilityWindow, CatalogError, DeviceProfile, load_catalog

REQUIRED = {"phone-low", "phone-high", "laptop-8gb", "edge-cpu", "desktop-24gb"}


def _profile(**over):
    raw = {
        "name": "p", "memory_gb": 2, "gpu": False, "train_tokens_per_s": 100, "upload_mbps": 5,
        "download_mbps": 20, "lora_rank": 4, "batch_size": 2,
        "availability": {"default_probability": 0.1,
                         "windows": [{"start_hour": 22, "end_hour": 7, "probability": 0.8}]},
        "dropout_probability": 0.1, "speed_jitter": 0.2,
    }
    raw.update(over)
    return raw


def test_shipped_catalog_loads():
    catalog = load_catalog(DEFAULT_CATALOG_DIR)
    assert len(catalog) >= 5
    assert REQUIRED <= set(catalog)
    assert all(isinstance(p, DeviceProfile) and p.name == n for n, p in catalog.items())
    assert catalog["phone-low"].lora_rank <= catalog["laptop-8gb"].lora_rank <= catalog["desktop-24gb"].lora_rank
    assert catalog["desktop-24gb"].gpu and not catalog["edge-cpu"].gpu
    # phones are night-chargers
    phone = catalog["phone-high"].availability
    assert phone.probability_at(2) > phone.probability_at(14)


def test_profile_is_frozen_and_scales_throughput():
    p = DeviceProfile.model_validate(_profile(train_tokens_per_s=170))
    with pytest.raises(ValidationError):
        p.lora_rank = 8  # type: ignore[misc]
    assert p.tokens_per_s(135_000_000) == pytest.approx(170)
    assert p.tokens_per_s(1_350_000_000) == pytest.approx(17)


def test_window_wraps_midnight():
    w = AvailabilityWindow(start_hour=22, end_hour=7, probability=0.5)
    assert w.contains(23) and w.contains(0) and w.contains(6.9)
    assert not w.contains(7) and not w.contains(12) and not w.contains(21.9)


def test_bad_catalog_reports_every_problem_with_file_names(tmp_path):
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(_profile(name="good")))
    (tmp_path / "bad1.yaml").write_text(yaml.safe_dump(_profile(name="bad1", memory_gb=-1, dropout_probability=1.5)))
    bad2 = _profile(name="bad2", upload_mbps=0, colour="red")
    bad2["availability"]["windows"][0]["end_hour"] = 25
    (tmp_path / "bad2.yaml").write_text(yaml.safe_dump(bad2))
    with pytest.raises(CatalogError) as exc:
        load_catalog(tmp_path)
    msg = str(exc.value)
    assert len(exc.value.problems) == 5, msg
    for needle in ("bad1.yaml: memory_gb", "bad1.yaml: dropout_probability", "bad2.yaml: upload_mbps",
                   "bad2.yaml: colour", "bad2.yaml: availability.windows.0.end_hour"):
        assert needle in msg, msg
    assert "good.yaml" not in msg
    assert isinstance(exc.value, ValueError)


def test_unreadable_and_non_mapping_files_are_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("name: [unclosed")
    (tmp_path / "b.yaml").write_text("- just\n- a list\n")
    with pytest.raises(CatalogError) as exc:
        load_catalog(tmp_path)
    assert len(exc.value.problems) == 2
    assert "a.yaml" in str(exc.value) and "b.yaml" in str(exc.value)


def test_duplicate_names_refused(tmp_path):
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(_profile(name="same")))
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(_profile(name="same")))
    with pytest.raises(CatalogError, match=r"two.yaml: duplicate profile name 'same', already defined in one.yaml"):
        load_catalog(tmp_path)


def test_empty_or_missing_directory(tmp_path):
    with pytest.raises(CatalogError, match="no \\*.yaml"):
        load_catalog(tmp_path)
    with pytest.raises(CatalogError, match="not a directory"):
        load_catalog(tmp_path / "nope")


@pytest.mark.parametrize("windows", [
    [{"start_hour": 5, "end_hour": 5, "probability": 0.5}],
    [{"start_hour": 22, "end_hour": 7, "probability": 0.5}, {"start_hour": 6, "end_hour": 9, "probability": 0.1}],
])
def test_empty_or_overlapping_windows_refused(windows):
    with pytest.raises(ValidationError):
        DeviceProfile.model_validate(_profile(availability={"default_probability": 0.1, "windows": windows}))
