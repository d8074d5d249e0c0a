"""``mmbalance rebalance --plan``: what a run would do, from the stage objects and what is verifiably
done in OUT, without running anything. The units, their rows and their identity values come from
the same ``keys``/``unit_rows``/``identity_values`` the run's ``tasks()`` are built from."""

from __future__ import annotations

from typing import Any

from mmbalance.io.store import UnitCheck
from mmbalance.pipeline import resume
from mmbalance.pipeline.runner import RunState
from mmbalance.pipeline.stage import GlobalStage, UnitStage


def plan_run(state: RunState, status: str, previous, fresh: bool) -> dict[str, Any]:
    """Damaged outputs (listed first: their units and what read them are redone), then per stage the
    units done and to do, the resources, and the expected output size (from the outputs of the units
    already done). ``previous``: rebalance.PreviousRun (the changes --update would follow)."""
    store = state.store
    state.checks = {}
    if not fresh:
        for declared in state.stages:  # in order: a stage's identity values come from the stages before it
            if isinstance(declared, UnitStage):
                state.checks[declared.name] = declared.plan_checks(state)
            elif declared.done_key and not declared.rerun:
                state.checks[declared.name] = {declared.done_key: store.check_unit(declared.name, declared.done_key)}
    damaged = [d for name, found in state.checks.items() for d in resume.damages(name, found)]
    units = sorted({(d.stage, d.key) for d in damaged})
    if previous.changes:
        units += resume.update_units(previous.previous_shards, state.shards, previous.changes)[1]
    closure = resume.affected(units, state.recipe)
    for name, keys in closure.items():  # what the run redoes is not done
        found = state.checks.get(name, {})
        state.checks[name] = {k: UnitCheck("changed") if resume.ALL in keys or k in keys else c for k, c in found.items()}
    state.clear_memo()
    rows = []
    for declared in state.stages:
        entry: dict[str, Any] = {"stage": declared.name, "unit": declared.unit, "resources": declared.resources.text()}
        if isinstance(declared, GlobalStage):
            kept = bool(declared.done_key) and not declared.rerun
            done = kept and state.finished(declared.name)
            entry.update(units=1, done=int(done), to_do=int(not done), rows_to_do=None,
                         note="" if kept else "rewritten by every run")
        else:
            keys, unit_rows = declared.keys(state), declared.unit_rows(state)
            found = state.checks.get(declared.name, {})
            done = {k for k in keys if k in found and found[k].status == "done"}
            entry.update(units=len(keys), done=len(done), to_do=len(keys) - len(done),
                         rows_to_do=sum(r for k, r in zip(keys, unit_rows) if k not in done), note="")
            entry["expected_output_bytes"] = expected_bytes(state, declared.name, keys, unit_rows, done)
        rows.append(entry)
    return {"out": store.uri, "input": state.run["input"], "status": status, "shards": len(state.shards),
            "input_rows": state.run["input_rows"], "stages": rows,
            "damaged": [{"stage": d.stage, "unit": d.key, "file": store.path(d.file), "reason": d.reason} for d in damaged]}


def expected_bytes(state: RunState, stage: str, keys: list[str], unit_rows: list[int], done: set[str]) -> int | None:
    """The stage's output size: the recorded outputs of the units done, scaled by rows to the rest."""
    written = rows_done = 0
    for key, n in zip(keys, unit_rows):
        if key in done:
            marker = state.store.read_marker(stage, key) or {}
            written += sum(r["size"] for r in marker.get("_outputs", {}).values() if r)
            rows_done += n
    if not done:
        return None
    total_rows = sum(unit_rows)
    return int(written * total_rows / rows_done) if rows_done else written


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)


def render_plan(planned: dict[str, Any], console) -> None:
    """``mmbalance rebalance --plan``: the damaged outputs first (to do, with what read them), then
    one line per active stage."""
    from rich.markup import escape
    from rich.table import Table

    for d in planned.get("damaged", []):
        console.print(f"[yellow]to do: {d['stage']} {escape(d['unit'])}[/yellow]: {escape(d['file'])} is damaged "
                      f"({escape(d['reason'])}); redone with what read it", soft_wrap=True, highlight=False)
    console.print(f"[bold]{planned['out']}[/bold]: {planned['status']}; {planned['shards']:,} shards, "
                  f"{planned['input_rows']:,} rows from {planned['input']}", soft_wrap=True, highlight=False)
    table = Table(box=None, pad_edge=False)
    for name in ("stage", "unit", "units", "done", "to do", "rows to do", "resources", "expected output"):
        table.add_column(name, justify="right" if name in ("units", "done", "to do", "rows to do", "expected output") else "left")
    for row in planned["stages"]:
        expected = row.get("note") or _size(row.get("expected_output_bytes"))
        table.add_row(row["stage"], row["unit"], f"{row['units']:,}", f"{row['done']:,}", f"{row['to_do']:,}",
                      "" if row["rows_to_do"] is None else f"{row['rows_to_do']:,}", row["resources"], expected)
    console.print(table)
