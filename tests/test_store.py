import pytest

from guided_ab.config import ConfigError, parse_config
from guided_ab.records import RequestRecord
from guided_ab.store import RunStore, check_run_id

CFG = {
    "name": "t",
    "arms": [
        {"name": "a", "role": "control", "backend": "guidance"},
        {"name": "b", "role": "candidate", "backend": "auto"},
    ],
}


def rec(i, phase="ab"):
    return RequestRecord(run_id="r1", phase=phase, arm="a", request_id=f"{phase}-{i}", schema_id="s", subset="x",
                         order_index=i, pair_index=i, warmup=False, first_for_schema=True, stream=True, attempt=1,
                         sent_at=0.0, outcome="success")


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", "", "/abs", "a\x00b", "x/../../y"])
def test_run_ids_with_path_characters_are_refused(bad):
    with pytest.raises(ConfigError, match="run id"):
        check_run_id(bad)


def test_journal_survives_a_torn_last_line_and_parquet_round_trips(tmp_path):
    cfg = parse_config({**CFG, "store": str(tmp_path)})
    store = RunStore.create(cfg, "r1")
    for i in range(3):
        store.append_record(rec(i))
    with open(store.journal_path("ab"), "a") as f:
        f.write('{"run_id": "r1", "pha')  # killed mid-write
    assert [r.request_id for r in store.journal("ab")] == ["ab-0", "ab-1", "ab-2"]
    store.finalize_records("ab")
    df = store.records(("ab",))
    assert list(df.request_id) == ["ab-0", "ab-1", "ab-2"]
    assert store.load_config() == cfg


def test_unwritable_store_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"  # root ignores permission bits: a file in the path blocks even root
    blocker.write_text("")
    cfg = parse_config({**CFG, "store": str(blocker / "runs")})
    with pytest.raises(ConfigError, match="store"):
        RunStore.create(cfg, "r1")


def test_open_unknown_run_says_how_to_list_runs(tmp_path):
    with pytest.raises(ConfigError, match="guided-ab runs"):
        RunStore.open(tmp_path, "nope")
