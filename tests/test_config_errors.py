"""Bad config -> exit status 2, a message naming the field or file, and nothing started."""

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
GOOD = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())


def run_cli(*args, env_extra=None):
    """The real CLI, in-process (a subprocess per case would spend most of its time importing)."""
    from typer.testing import CliRunner

    from guided_ab.cli import app

    result = CliRunner().invoke(app, list(args), env=env_extra)
    result.returncode = result.exit_code
    return result


def write(tmp_path, data, name="bad.yaml"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def variant(**changes):
    import copy

    d = copy.deepcopy(GOOD)
    for path, value in changes.items():
        node = d
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[int(k)] if k.isdigit() else node[k]
        last = keys[-1]
        if value is KeyError:
            del node[last]
        else:
            node[int(last) if last.isdigit() else last] = value
    return d


@pytest.mark.parametrize(
    "data, expected",
    [
        (variant(arms__1__backend="llguidance-turbo"), "arms.1.backend"),
        (variant(arms__0__role=KeyError), "arms.0.role"),
        (variant(workload__sise=10), "workload.sise"),
        (variant(workload__size="thirty"), "workload.size"),
        (variant(workload__size=0), "workload.size"),
        (variant(workload__concurrency=-1), "workload.concurrency"),
        (variant(name=KeyError), "name"),
        ("arms: [unclosed\n", "not valid YAML"),
        (variant(workload__suite="/nonexistent/schemas"), "/nonexistent/schemas"),
    ],
)
def test_bad_config_exits_2_naming_the_field_and_starts_nothing(tmp_path, data, expected):
    state = tmp_path / "state"
    cfg = write(tmp_path, data)
    r = run_cli("run", str(cfg), env_extra={"GUIDED_AB_STATE_DIR": str(state)})
    assert r.returncode == 2, r.stderr + r.stdout
    assert expected in r.stderr
    assert not (state / "servers").exists() or not any((state / "servers").iterdir())
    assert not (REPO / "runs").exists() or not any(p.name.startswith(GOOD["name"]) and p.stat().st_mtime > cfg.stat().st_mtime for p in (REPO / "runs").iterdir())


def test_missing_config_file_is_named(tmp_path):
    r = run_cli("run", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "nope.yaml" in r.stderr


def test_unreadable_schema_file_is_named(tmp_path):
    d = tmp_path / "schemas"
    d.mkdir()
    (d / "a.json").write_text('{"type": "object"}')
    (d / "b.json").write_text("{not json")
    cfg = write(tmp_path, variant(workload__suite=str(d), workload__size=1, workload__observe_size=0))
    r = run_cli("run", str(cfg))
    assert r.returncode == 2 and "b.json" in r.stderr


def test_all_shipped_configs_are_valid():
    from guided_ab.config import load_config

    for p in sorted((REPO / "configs").glob("*.yaml")):
        load_config(p)
