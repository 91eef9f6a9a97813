"""The Grafana dashboard queries only metrics (and labels) that the code exports, and shows every one of them."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "cluster" / "grafana" / "trprompt_dashboard.json"
RAY_LABELS = {"SessionName", "NodeAddress", "Component", "WorkerId", "JobId", "instance", "job", "le"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def exported_metrics() -> dict[str, tuple[str, set[str]]]:
    """``{name: (Gauge|Counter|Histogram, tag keys)}`` of every Ray metric created under cluster/ and trprompt/."""
    out: dict[str, tuple[str, set[str]]] = {}
    for path in [*ROOT.glob("cluster/**/*.py"), *ROOT.glob("trprompt/**/*.py"), *ROOT.glob("actors/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("Gauge", "Counter", "Histogram") and node.args):
                continue
            name = node.args[0]
            if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                continue
            tags: set[str] = set()
            for kw in node.keywords:
                if kw.arg == "tag_keys" and isinstance(kw.value, (ast.Tuple, ast.List)):
                    tags = {e.value for e in kw.value.elts if isinstance(e, ast.Constant)}
            out[name.value] = (node.func.id, tags)
    return out


def dashboard_queries() -> list[str]:
    d = json.loads(DASHBOARD.read_text())
    exprs = []

    def walk(panels: list[dict]) -> None:
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))

    walk(d["panels"])
    for var in d.get("templating", {}).get("list", []):
        q = var.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if var.get("type") == "query" and q:
            exprs.append(q)
    return exprs


def metric_of(prom_name: str, exported: dict[str, tuple[str, set[str]]]) -> str | None:
    """The code's metric name behind a Prometheus series name (``ray_`` prefix, histogram suffixes)."""
    if not prom_name.startswith("ray_"):
        return None
    name = prom_name[len("ray_"):]
    if name in exported:
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        base = name[: -len(suffix)]
        if name.endswith(suffix) and exported.get(base, ("",))[0] == "Histogram":
            return base
    return None


def test_code_exports_the_expected_metric_families():
    exported = exported_metrics()
    assert {"trprompt_iteration", "trprompt_validation_accuracy", "trprompt_tokens_total",
            "trprompt_serve_request_latency_s"} <= set(exported)
    assert exported["trprompt_serve_request_latency_s"][0] == "Histogram"


def test_every_dashboard_query_uses_exported_metrics_and_labels():
    exported = exported_metrics()
    exprs = dashboard_queries()
    assert len(exprs) >= 10
    used: set[str] = set()
    for expr in exprs:
        names = set(re.findall(r"\b(ray_[A-Za-z0-9_]+)", expr))
        assert names, f"query names no metric: {expr}"
        metrics = set()
        for n in names:
            m = metric_of(n, exported)
            assert m is not None, f"dashboard queries {n}, which the code does not export (query: {expr})"
            metrics.add(m)
        used |= metrics
        allowed = RAY_LABELS | set().union(*(exported[m][1] for m in metrics))
        labels = set()
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            labels |= {x.strip() for x in group.split(",") if x.strip()}
        labels |= set(re.findall(r"[{,]\s*([A-Za-z_][A-Za-z0-9_]*)\s*=~?", expr))
        labels |= set(re.findall(r"\{\{\s*([A-Za-z_]+)\s*\}\}", expr))
        assert labels <= allowed, f"labels {sorted(labels - allowed)} are not tags of {sorted(metrics)}: {expr}"
    missing = {m for m in exported if m.startswith("trprompt_")} - used
    assert not missing, f"exported metrics with no panel: {sorted(missing)}"


def test_legends_use_only_grouped_labels():
    d = json.loads(DASHBOARD.read_text())
    for p in d["panels"]:
        for t in p.get("targets", []):
            legend = set(re.findall(r"\{\{\s*([A-Za-z_]+)\s*\}\}", t.get("legendFormat", "")))
            grouped = set()
            for group in re.findall(r"\bby\s*\(([^)]*)\)", t["expr"]):
                grouped |= {x.strip() for x in group.split(",")}
            assert legend <= grouped, f"{p['title']}: legend {legend} not in by(...) {grouped}"
