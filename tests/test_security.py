"""Security: every endpoint needs an API key, keys never reach what a run writes, no shell.

- The fault server stands in for a local vLLM server's auth (401 without `Bearer <key>` on every
  /v1 path); the local target is checked to start every server with a fresh per-run key that is
  in the environment only (never argv, never the run store); Modal containers refuse to start
  without the key from their modal.Secret.
- A whole run against key-protected endpoints (deploy, observe, A/B, teardown, evaluate, decide,
  reports) is searched, file by file and inside parquet, for the key; so are its logs.
- The source tree passes no shell flag to subprocess, calls no os.system/os.popen, and every
  subprocess call gets an argument list (AST check).
"""

from __future__ import annotations

import ast
import logging
import re
import secrets
import stat
from pathlib import Path

import httpx
import pytest

from guided_ab import phases
from guided_ab.config import parse_config
from guided_ab.selfcheck import scenarios as sc
from guided_ab.selfcheck.fault_server import FaultServer
from guided_ab.store import RunStore

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("guided_ab", "flows", "tasks", "modal_apps", "bench", "tests", "scripts")
pytestmark = pytest.mark.timeout(120)


def _python_files() -> list[Path]:
    files = []
    for d in SOURCE_DIRS:
        files += sorted((REPO / d).rglob("*.py")) if (REPO / d).is_dir() else []
    return [f for f in files if "/." not in str(f.relative_to(REPO))]


# -- every endpoint needs a key ----------------------------------------------------------------
@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("POST", "/v1/chat/completions")])
def test_every_v1_endpoint_refuses_requests_without_the_right_key(method, path):
    key = "gab-" + secrets.token_urlsafe(16)
    wrong = "gab-" + secrets.token_urlsafe(16)
    with FaultServer("healthy", api_key=key) as srv:
        def call(headers):
            return httpx.request(method, srv.url + path, headers=headers, json={"messages": []}, timeout=5)

        for headers in ({}, {"Authorization": f"Bearer {wrong}"}, {"Authorization": key},
                        {"Authorization": f"bearer {key}x"}, {"Authorization": f"Basic {key}"}):
            r = call(headers)
            assert r.status_code == 401, headers
            assert key not in r.text and wrong not in r.text  # the answer never echoes a key
        assert call({"Authorization": f"Bearer {key}"}).status_code == 200
        assert httpx.get(srv.url + "/health", timeout=5).status_code == 200  # as in vLLM: no key for /health


def test_local_servers_get_a_fresh_key_in_the_environment_only(tmp_path, monkeypatch):
    """targets.local.start: VLLM_API_KEY in the server's environment, never in argv or the run store."""
    from guided_ab.arms import local

    started = []

    class FakePopen:
        def __init__(self, cmd, env=None, **kw):
            assert isinstance(cmd, list) and not kw.get("shell")
            started.append((cmd, env))
            self.pid = 10**6 + len(started)

    monkeypatch.setattr(local.subprocess, "Popen", FakePopen)
    monkeypatch.setenv("GUIDED_AB_STATE_DIR", str(tmp_path / "state"))
    cfg = parse_config({"name": "sec", "store": str(tmp_path / "runs"), "arms": [
        {"name": "a", "role": "control", "backend": "guidance"}, {"name": "b", "role": "candidate", "backend": "auto"}]})
    store = RunStore.create(cfg, "sec-run")
    eps = [local.start(arm, store, python="python", model="m", version="0") for arm in cfg.arms]
    keys = [env["VLLM_API_KEY"] for _, env in started]
    assert len(set(keys)) == 2 and all(len(k) >= 24 for k in keys)  # one fresh key per arm and run
    for (cmd, _), key, ep in zip(started, keys, eps):
        assert key not in " ".join(cmd) and "--api-key" not in cmd  # `ps` shows argv
        assert ep.key_ref.startswith("file:")
        path = Path(ep.key_ref.removeprefix("file:"))
        assert path.read_text() == key and stat.S_IMODE(path.stat().st_mode) == 0o600
        assert store.dir not in path.parents  # keys live outside the run store
    phases.save_endpoints(store, dict(zip("ab", eps)))
    assert sc.leaked_files(store.dir, keys) == []
    for ep in eps:  # forget the fake servers (nothing to stop)
        local._record_path(ep.run_id, ep.arm).unlink()


def test_modal_containers_refuse_to_start_without_the_secret_key():
    from modal_apps.vllm_arm import container_command, container_env

    cfg = parse_config({"name": "m", "arms": [
        {"name": "a", "role": "control", "target": "modal", "backend": "guidance", "model": "Qwen/Qwen2.5-0.5B-Instruct"},
        {"name": "b", "role": "candidate", "target": "modal", "backend": "auto", "model": "Qwen/Qwen2.5-0.5B-Instruct"}]})
    with pytest.raises(RuntimeError, match="VLLM_API_KEY"):
        container_env(cfg.arms[0], {})
    assert container_env(cfg.arms[0], {"VLLM_API_KEY": "k-123"})["VLLM_API_KEY"] == "k-123"
    assert "k-123" not in container_command(cfg.arms[0])


# -- keys never appear in anything a run wrote -------------------------------------------------------
def test_a_whole_run_never_writes_the_key(tmp_path, monkeypatch, caplog, capsys):
    key = "gab-secret-" + secrets.token_urlsafe(24)
    monkeypatch.setenv(sc.KEY_ENV, key)
    sb = sc.Sandbox(tmp_path / "sandbox", key)
    logged: list[str] = []
    caplog.set_level(logging.DEBUG)
    with FaultServer("healthy", api_key=key) as control, FaultServer("storm", api_key=key, storm_requests=2) as cand:
        data = sb.config_data("leak", control.url, cand.url, observe_size=2, size=4)
        cfg = parse_config(data, "leak")
        store = RunStore.create(cfg, "leak-run")
        phases.start_endpoints(cfg, store, log=logged.append)
        phases.wait_endpoints(cfg, store, phases.load_endpoints(store), log=logged.append)
        for phase in ("observe", "ab"):
            phases.run_requests(cfg, store, phase)
        phases.teardown(store, log=logged.append)
    phases.evaluate_run(store)
    phases.decide_run(store)
    written = sorted(p.name for p in store.dir.rglob("*") if p.is_file())
    for name in ("endpoints.json", "observe.parquet", "ab.parquet", "evaluation.json", "decision.json", "report.md"):
        assert name in written, written
    (sb.logs / "captured.log").write_text("\n".join(logged) + caplog.text + "".join(capsys.readouterr()))
    assert sc.leaked_files(sb.root, [key]) == []
    # the search has teeth: a key planted in a text file and inside a (compressed) parquet is found
    import pandas as pd

    (sb.logs / "planted.txt").write_text(f"Authorization: Bearer {key}\n")
    pd.DataFrame({"error": [f"header was Bearer {key}"] * 50}).to_parquet(sb.logs / "planted.parquet", compression="snappy")
    found = {Path(p).name for p in sc.leaked_files(sb.root, [key])}
    assert found == {"planted.txt", "planted.parquet"}


def test_selfcheck_run_dirs_hold_no_key(tmp_path, monkeypatch):
    """A run directory produced by a fault-server scenario (records, plans, logs) is clean."""
    key = "gab-secret-" + secrets.token_urlsafe(24)
    monkeypatch.setenv(sc.KEY_ENV, key)
    sb = sc.Sandbox(tmp_path / "sandbox", key)
    assert sc.run_scenario(sb, "reset", "fault", sc.fault_reset).held
    runs = [d for d in sb.store.iterdir() if d.is_dir()]
    assert runs and all((d / "records" / "ab.jsonl").is_file() for d in runs)
    assert sc.leaked_files(sb.root, [key]) == []


# -- no shell, argument lists only ---------------------------------------------------------------
SHELL_TRUE = re.compile(r"shell\s*=\s*" + "True")  # split so this file does not match itself


def test_no_shell_true_anywhere_in_the_source_tree():
    hits = []
    for f in _python_files():
        for i, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if SHELL_TRUE.search(line) and not (f.name == Path(__file__).name and "SHELL_TRUE" in line):
                hits.append(f"{f.relative_to(REPO)}:{i}: {line.strip()}")
    assert hits == []


SUBPROCESS_FUNCS = {"run", "Popen", "call", "check_call", "check_output", "getoutput", "getstatusoutput"}


def _is_string_expr(node: ast.AST | None) -> bool:
    """A str literal, an f-string, or a + / % of them: a command line, not an argument list."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp):
        return _is_string_expr(node.left) or _is_string_expr(node.right)
    return False


def _subprocess_problems(tree: ast.AST, where: str) -> list[str]:
    imported = set()  # names imported from subprocess (`from subprocess import run`)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "subprocess":
            imported |= {a.asname or a.name for a in node.names}
    problems = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = None
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
            if f.value.id == "subprocess" and f.attr in SUBPROCESS_FUNCS:
                name = f"subprocess.{f.attr}"
            elif f.value.id == "os" and f.attr in ("system", "popen"):
                problems.append(f"{where}:{node.lineno}: os.{f.attr} runs a shell command line")
                continue
        elif isinstance(f, ast.Name) and f.id in imported and f.id in SUBPROCESS_FUNCS:
            name = f.id
        if name is None:
            continue
        if name.endswith(("getoutput", "getstatusoutput")):
            problems.append(f"{where}:{node.lineno}: {name} always uses a shell")
            continue
        args = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "args"), None)
        if _is_string_expr(args):
            problems.append(f"{where}:{node.lineno}: {name} with a string command, not an argument list")
        for k in node.keywords:
            if k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False):
                problems.append(f"{where}:{node.lineno}: {name} with shell=...")
    return problems


def test_subprocess_calls_use_argument_lists():
    problems = []
    for f in _python_files():
        problems += _subprocess_problems(ast.parse(f.read_text(encoding="utf-8"), str(f)), str(f.relative_to(REPO)))
    assert problems == []


def test_the_ast_check_catches_string_commands():
    bad = ast.parse(
        "import subprocess, os\nfrom subprocess import run\n"
        "subprocess.run('ls -l')\nsubprocess.Popen(f'kill {pid}')\nrun('x' + y)\nos.system('rm x')\n"
        "subprocess.check_output(['ls'], shell=flag)\nsubprocess.getoutput('ls')\n"
    )
    assert len(_subprocess_problems(bad, "x")) == 6
    good = ast.parse("import subprocess\nsubprocess.run(['ls', '-l'], check=True)\nsubprocess.Popen(cmd)\n"
                     "subprocess.run(cmd + reqs)\n")
    assert _subprocess_problems(good, "x") == []


def test_the_searched_tree_holds_the_code_that_starts_processes():
    files = {str(f.relative_to(REPO)) for f in _python_files()}
    assert {"guided_ab/arms/local.py", "guided_ab/selfcheck/fault_server.py", "modal_apps/vllm_arm.py"} <= files
    assert any(f.startswith("flows/") for f in files) and any(f.startswith("tasks/") for f in files)
