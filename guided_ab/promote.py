"""Phase 3, the two ends of the watch: promote the A/B's winner to production, and revert it.

Why a module of its own: after a `switch` someone has to change production, keep the old
configuration one command away, and open a monitoring window (guided_ab/monitor.py) that ends in
`keep` or `revert`. This module owns that change and its record; the watch itself is monitor.py.

`promote` (only after a `switch`, and after its sign-off when `decision.require_approval`):
- target `modal`: deploys the chosen arm's configuration as the team's serving app
  (`production.app_name`) and the control's configuration as the live control
  (`production.control_app_name`), both through the Modal target's SDK layer (arms/modal.py) and
  the serving app (modal_apps/vllm_arm.py);
- target `external`: changes nothing itself; records the decision and prints what the operator
  must change on the production server; the control endpoint is `production.control_url`.
`revert` re-deploys the control's configuration as the production app (modal) or prints what the
operator must change back (external). Both endings (`end_window`: keep or revert) stop the
endpoint no longer needed, the live control (cost saving), and record it.

promotion.json (run store):
    status      monitoring | revert-recommended | kept | reverted
    serve       the promoted arm; control: the arm it replaces
    to / from   the two arms' configurations (`from` is what a revert deploys)
    changes     field: old -> new (what the dry run prints)
    production  where production and the live control answer (no keys)
    window      opened_at, ends_at, cadence_hours, planned_runs, pairs_per_run, planned_pairs
    deployed    what promote deployed (Modal apps and their backends)
    ended       how (kept | reverted), at, reason, stopped endpoints and their estimated cost
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from guided_ab.arms import external
from guided_ab.arms import modal as modal_target
from guided_ab.arms.base import Endpoint
from guided_ab.arms.vllm_args import SERVED_MODEL_NAME
from guided_ab.config import Arm, ConfigError, ExperimentConfig, Production
from guided_ab.errors import RunStateError
from guided_ab.store import RunStore

Log = Callable[[str], None]
STATE = "promotion.json"
CHANGED_FIELDS = ("backend", "model", "server_args", "target")
CONTROL_MIN_CONTAINERS = 0  # the live control scales to zero between monitoring runs


# -- what the run allows ---------------------------------------------------------------------------
def production_of(cfg: ExperimentConfig, store: RunStore) -> Production:
    if cfg.production is None:
        raise ConfigError(f"run {store.run_id}: its config has no `production` block (app_name or url, control, "
                          "window); add one to the experiment config before the run (it is pre-registered)")
    return cfg.production


def check_promotable(store: RunStore) -> tuple[ExperimentConfig, dict[str, Any]]:
    """The run's config and decision if it may be promoted; RunStateError saying why not."""
    cfg = store.load_config()
    production_of(cfg, store)
    if not store.has("decision.json"):
        raise RunStateError(f"run {store.run_id} has no decision.json: finish the experiment first "
                            f"(`guided-ab decide-teardown --run-id {store.run_id}`)")
    decision = store.read_json("decision.json")
    verdict = decision.get("verdict")
    if verdict != "switch":
        raise RunStateError(f"run {store.run_id}: the verdict is {verdict!r}, not 'switch'; only a switch is promoted")
    approval = decision.get("approval") or {}
    if cfg.decision.require_approval and approval.get("status") != "approved":
        raise RunStateError(f"run {store.run_id}: the config requires a sign-off and decision.json records "
                            f"{approval.get('status') or 'none'}; approve the switch first (the decide step's form)")
    return cfg, decision


def _changes(old: Arm, new: Arm) -> list[dict[str, Any]]:
    out = [{"field": f, "from": getattr(old, f), "to": getattr(new, f)} for f in CHANGED_FIELDS if getattr(old, f) != getattr(new, f)]
    if old.target == new.target == "modal" and old.modal != new.modal:
        out.append({"field": "modal", "from": old.modal.model_dump(), "to": new.modal.model_dump()})
    return out


def _served_model(arm: Arm) -> str:
    """The model name requests to an endpoint serving this arm's configuration carry."""
    return arm.model if arm.target == "external" else SERVED_MODEL_NAME


def _operator_steps(prod: Production, old: Arm, new: Arm) -> list[str]:
    """What an operator changes on an external production server to serve `new` instead of `old`."""
    steps = [f"on the production server ({prod.url}), start vLLM with `--structured-outputs-config.backend {new.backend}` "
             f"(it serves `{old.backend}` now)"]
    if old.server_args != new.server_args:
        steps.append(f"server arguments: {' '.join(new.server_args) or '(none)'} (now: {' '.join(old.server_args) or '(none)'})")
    if old.model != new.model:
        steps.append(f"model: {new.model} (now: {old.model})")
    steps.append(f"keep {prod.control_url} serving `{old.backend}` for the monitoring window (the live control)")
    return steps


def plan(store: RunStore, now: float | None = None) -> dict[str, Any]:
    """What promote would do (nothing done): the promotion.json it would write, before deploying."""
    cfg, decision = check_promotable(store)
    prod = production_of(cfg, store)
    new, old = cfg.arm(decision["serve"]), cfg.control
    now = time.time() if now is None else now
    if prod.target == "modal":
        r = new.modal.replicas  # production serves the team's traffic: the winner's own replicas (min/max, target)
        deploy = [{"app": prod.app_name, "role": "production", "arm": new.name, "backend": new.backend, "model": new.model,
                   "replicas": r.model_dump(mode="json")},
                  {"app": prod.control_app, "role": "control", "arm": old.name, "backend": old.backend, "model": old.model,
                   "min_containers": CONTROL_MIN_CONTAINERS}]
        where = {"target": "modal", "app_name": prod.app_name, "control_app_name": prod.control_app}
        steps: list[str] = []
    else:
        deploy = []
        where = {"target": "external", "url": prod.url, "control_url": prod.control_url}
        steps = _operator_steps(prod, old, new)
    return {
        "status": "monitoring", "run_id": store.run_id, "serve": new.name, "control": old.name,
        "to": new.model_dump(mode="json"), "from": old.model_dump(mode="json"), "changes": _changes(old, new),
        "production": where, "deploy": deploy, "operator_steps": steps,
        "approval": decision.get("approval") or {"required": False},
        "window": {"opened_at": now, "ends_at": now + prod.window_days * 86400, "cadence_hours": prod.cadence_hours,
                   "planned_runs": prod.planned_runs, "pairs_per_run": prod.pairs_per_run, "planned_pairs": prod.window_pairs,
                   "margins": {"success": -cfg.decision.success_margin, "latency_ratio": 1 + cfg.decision.latency_margin}},
    }


def _replicas_text(r: dict[str, Any]) -> str:
    target = f", autoscaler target {r['target_inputs']} requests each" if r.get("target_inputs") else ""
    return f", {r['min_containers']}-{r['max_containers']} container(s) (modal.replicas{target})"


def describe(p: dict[str, Any], *, dry_run: bool) -> str:
    """The plan as text (the dry run prints exactly this)."""
    w = p["window"]
    appr = p["approval"]
    lines = [f"promote run {p['run_id']}: switch '{p['control']}' -> '{p['serve']}' "
             f"(decision.json; sign-off: {appr.get('status', 'not required') if appr.get('required') else 'not required'})"]
    lines += [f"  change {c['field']}: {c['from']} -> {c['to']}" for c in p["changes"] if c["field"] != "modal"]
    for d in p["deploy"]:
        lines.append(f"  deploy Modal app '{d['app']}' ({d['role']}): arm '{d['arm']}', backend {d['backend']}, model {d['model']}"
                     + (", scaled to zero between monitoring runs" if d.get("min_containers") == 0 else "")
                     + (_replicas_text(d["replicas"]) if d.get("replicas") else ""))
    for s in p["operator_steps"]:
        lines.append(f"  operator: {s}")
    lines.append(f"  monitoring window: {w['planned_runs']} run(s) every {w['cadence_hours']:g} h, {w['pairs_per_run']} pairs each "
                 f"({w['planned_pairs']} planned pairs), margins: success {w['margins']['success']:+.1%}, "
                 f"latency ratio {w['margins']['latency_ratio']:.3f}")
    lines.append(f"  revert: `guided-ab revert --run-id {p['run_id']}` re-deploys '{p['control']}' (backend {p['from']['backend']})")
    if dry_run:
        lines.append("dry run: nothing was deployed or recorded")
    return "\n".join(lines)


# -- deploying -------------------------------------------------------------------------------------
def _deploy_modal(arm: Arm, app: str, run_id: str, role: str) -> str:
    """Deploy (or redeploy) `arm`'s configuration as the Modal app `app`; its URL. The live
    control is scaled to zero between monitoring runs (CONTROL_MIN_CONTAINERS): it is paid for
    while a monitoring run sends, plus its scale-down window. The production app runs the arm's
    own `modal.replicas` (min/max containers, autoscaler target): a production rate may need several."""
    modal_target.check_arm(arm)
    from modal_apps.vllm_arm import ArmSpec, build_app

    tags = {**modal_target.app_tags(run_id, arm.name), "guided-ab-role": role}
    warm = CONTROL_MIN_CONTAINERS if role == "control" else None  # None: the arm's replicas.min_containers
    try:
        url = modal_target.sdk().deploy_app(build_app(ArmSpec(arm=arm, app_name=app, tags=tags, min_containers=warm)), app)
    except (ConfigError, modal_target.ModalTargetError):
        raise
    except Exception as err:  # the SDK's own errors (auth, build, quota) carry their detail
        raise modal_target.ModalTargetError(f"deploying '{arm.name}' (backend {arm.backend}) as Modal app {app!r} failed: "
                                            f"{type(err).__name__}: {err} (check `modal token info` and the secret)") from err
    return url.rstrip("/").removesuffix("/v1")


def promote(store: RunStore, *, dry_run: bool = False, log: Log = print) -> dict[str, Any]:
    """Promote the run's winner (see the module docstring). Idempotent: a promoted run is not
    promoted again. Returns the promotion record (with `text`: what was done)."""
    if store.has(STATE):
        done = store.read_json(STATE)
        log(f"run {store.run_id} was promoted already (status {done.get('status')}); nothing to do")
        return {**done, "text": f"already promoted (status {done.get('status')})"}
    p = plan(store)
    text = describe(p, dry_run=dry_run)
    if dry_run:
        return {**p, "text": text, "dry_run": True}
    cfg = store.load_config()
    deployed = []
    for d in p["deploy"]:
        url = _deploy_modal(cfg.arm(d["arm"]), d["app"], store.run_id, d["role"])
        deployed.append({**d, "url": url, "at": time.time()})
        log(f"deployed Modal app '{d['app']}' ({d['role']}): backend {d['backend']} at {url}")
    for s in p["operator_steps"]:
        log(f"operator: {s}")
    rec = {**p, "deployed": deployed, "promoted_at": time.time()}
    rec.pop("deploy")
    store.write_json(STATE, rec)
    return {**rec, "text": text}


def load(store: RunStore) -> dict[str, Any]:
    if not store.has(STATE):
        raise RunStateError(f"run {store.run_id} was never promoted (no {STATE}): `guided-ab promote --run-id {store.run_id}`")
    return dict(store.read_json(STATE))


def monitor_endpoints(store: RunStore, rec: dict[str, Any]) -> dict[str, Endpoint]:
    """The live production endpoint (the new configuration) and the control (the old one), by arm name."""
    cfg = store.load_config()
    prod = production_of(cfg, store)
    new, old = Arm.model_validate(rec["to"]), Arm.model_validate(rec["from"])
    if prod.target == "external":
        assert prod.url and prod.control_url  # the config requires both
        return {
            new.name: external.endpoint(run_id=store.run_id, arm=new.name, url=prod.url, model=_served_model(new),
                                        backend=new.backend, api_key_env=prod.api_key_env),
            old.name: external.endpoint(run_id=store.run_id, arm=old.name, url=prod.control_url, model=_served_model(old),
                                        backend=old.backend, api_key_env=prod.control_api_key_env, cost_per_hour=old.cost_per_hour),
        }
    out = {}
    for arm, app in ((new, prod.app_name), (old, prod.control_app)):
        assert app
        url = modal_target.sdk().web_url(app)
        if not url:
            raise RunStateError(f"Modal app {app!r} is not deployed: `guided-ab revert --run-id {store.run_id}` or promote again")
        out[arm.name] = Endpoint(run_id=store.run_id, arm=arm.name, target="modal", base_url=url.rstrip("/").removesuffix("/v1"),
                                 model=SERVED_MODEL_NAME, backend=arm.backend, key_ref=f"env:{modal_target.API_KEY_ENV}",
                                 app_name=app, cost_per_hour=modal_target.cost_per_hour(arm))
    return out


# -- the endings -----------------------------------------------------------------------------------
def _stop_control(store: RunStore, rec: dict[str, Any], log: Log) -> list[dict[str, Any]]:
    """Stop the live control (no longer needed once the window ends); its estimated cost."""
    held_s = time.time() - rec["window"]["opened_at"]
    old = Arm.model_validate(rec["from"])
    if rec["production"]["target"] == "modal":
        app = rec["production"]["control_app_name"]
        stopped = modal_target.sdk().stop_app(app)
        cost = _control_cost(store)
        log(f"stopped Modal app '{app}' (the live control): {stopped}; ~${cost:.2f} over the window (scaled to zero between runs)")
        return [{"what": f"Modal app {app}", "role": "control", "stopped": stopped, "held_s": held_s, "cost_usd": cost}]
    url = rec["production"]["control_url"]
    log(f"operator: the control endpoint {url} is no longer needed: stop it to save its cost")
    return [{"what": url, "role": "control", "stopped": False, "held_s": held_s, "cost_usd": held_s / 3600 * old.cost_per_hour,
             "note": "external: not ours to stop; the operator stops it"}]


def _control_cost(store: RunStore) -> float:
    """The live control's estimated cost over the window: each monitoring run's (monitoring.json)."""
    runs = store.read_json("monitoring.json", default={}).get("runs", [])
    return float(sum(r.get("control_cost_usd", 0.0) for r in runs))


def end_window(store: RunStore, how: str, reason: str, *, log: Log = print, stopped: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Close the window: `kept` (production keeps the new configuration) or `reverted`; the live
    control is stopped either way."""
    rec = load(store)
    if rec.get("ended"):
        return rec
    stops = [*(stopped or []), *_stop_control(store, rec, log)]
    rec = {**rec, "status": how, "ended": {"how": how, "at": time.time(), "reason": reason, "stopped": stops}}
    store.write_json(STATE, rec)
    return rec


def revert_plan(store: RunStore) -> tuple[dict[str, Any], list[str]]:
    rec = load(store)
    if rec.get("status") in ("reverted", "kept"):
        raise RunStateError(f"run {store.run_id}: the monitoring window has ended ({rec['status']}); nothing to revert"
                            + (" — a kept configuration is changed by a new experiment" if rec["status"] == "kept" else ""))
    old, new = Arm.model_validate(rec["from"]), Arm.model_validate(rec["to"])
    p = rec["production"]
    if p["target"] == "modal":
        lines = [f"  deploy Modal app '{p['app_name']}' (production) with arm '{old.name}': backend {old.backend} (now {new.backend})",
                 f"  stop Modal app '{p['control_app_name']}' (the live control, no longer needed)"]
    else:
        lines = [f"  operator: on {p['url']}, start vLLM with `--structured-outputs-config.backend {old.backend}` again (now {new.backend})",
                 f"  operator: stop {p['control_url']} (the live control) once production serves {old.backend}"]
    return rec, [f"revert run {store.run_id}: production back to '{old.name}' (backend {old.backend})", *lines]


def revert(store: RunStore, *, reason: str = "", dry_run: bool = False, log: Log = print) -> dict[str, Any]:
    """Re-deploy the control's configuration as production and stop the live control."""
    rec, lines = revert_plan(store)
    if dry_run:
        return {**rec, "text": "\n".join([*lines, "dry run: nothing was deployed or recorded"]), "dry_run": True}
    old = Arm.model_validate(rec["from"])
    p = rec["production"]
    redeployed: list[dict[str, Any]] = []
    if p["target"] == "modal":
        url = _deploy_modal(old, p["app_name"], store.run_id, "production")
        redeployed.append({"what": f"Modal app {p['app_name']}", "role": "production", "arm": old.name, "backend": old.backend, "url": url})
        log(f"re-deployed Modal app '{p['app_name']}' with backend {old.backend}")
    else:
        for line in lines[1:]:
            log(line.strip())
    rec = end_window(store, "reverted", reason or "revert requested", log=log)
    rec = {**rec, "reverted": redeployed}
    store.write_json(STATE, rec)
    return {**rec, "text": "\n".join(lines)}
