"""The one data-preparation step servers share (fedtune.data.prepare_run_data)."""

from fedtune.data import prepare_run_data
from fedtune.data.partition import load_client_data, read_index
from tests.conftest import make_config


def test_prepare_run_data_writes_once_and_only_where_told(tmp_path):
    cfg = make_config()
    checked = prepare_run_data(cfg)  # the CLI's check before a run directory exists: nothing written
    assert len(checked.clients) == 3 and not list(tmp_path.iterdir())

    prepared = prepare_run_data(cfg, tmp_path / "data")
    index = read_index(tmp_path / "data")
    assert [e["user_id"] for e in index] == [c.user_id for c in prepared.clients] == [c.user_id for c in checked.clients]
    assert load_client_data(tmp_path / "data", 0).train.equal(prepared.clients[0].train)

    stamp = (tmp_path / "data" / "index.json").stat().st_mtime_ns
    assert prepare_run_data(cfg, tmp_path / "data") is None  # already prepared: not redone
    assert (tmp_path / "data" / "index.json").stat().st_mtime_ns == stamp
