"""The stages of a rebalance run, declared once.

Each stage names its unit of work (one shard, one uid-hash bucket, or the whole run), the function
that does one unit, what it reads and writes under OUT, the resources a unit asks for, and the task
fields its done marker records and a resume compares (``identity``). The runner, the resume check,
``stats/stages.json``, the progress bars, ``mmbalance inspect``, ``mmbalance rebalance --plan`` and
the stage table in docs/architecture.md all read this declaration.

Every unit returns one accounting schema (``ACCOUNTING``): ``rows_in``, ``rows_out``, ``rejected``,
``reasons`` (rejected rows by reason) and ``seconds``; the done marker refuses a summary without
them, so a renamed key fails loudly instead of reporting 0. Stage statistics merge by summing
(like datatrove's mergeable ``MetricStats``) plus per-unit distributions (p50/p95 seconds and rows/s,
the slowest units).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from mmbalance.schemas.contract import add_reasons
from mmbalance.schemas.recipe import Recipe

ACCOUNTING = ("rows_in", "rows_out", "rejected", "reasons", "seconds")
Unit = Literal["shard", "bucket", "global"]


def _always(recipe: Recipe) -> bool:
    return True


def _one_cpu(recipe: Recipe) -> dict[str, Any]:
    return {}


def _embed_pool(recipe: Recipe) -> dict[str, Any]:
    spec = recipe.embed
    if spec is None or not spec.uses_model:
        return {}
    return {"actors": spec.actors, "num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus}


@dataclass(frozen=True)
class Stage:
    name: str
    unit: Unit
    summary: str  # one line: what a unit does
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    function: str | None = None  # name in mmbalance.pipeline.stages of the per-unit function
    when: Callable[[Recipe], bool] = _always
    resources: Callable[[Recipe], dict[str, Any]] = _one_cpu
    resources_text: str = "1 CPU per task"
    identity: tuple[str, ...] = ()  # task fields a done marker records; a change redoes the unit
    key: str = "shard_id"  # the summary field that names the unit
    done_key: str | None = None  # a global stage's done marker: _done/<name>/<done_key>.json

    def describe(self, recipe: Recipe | None = None) -> dict[str, Any]:
        """The declaration as data (for --plan, inspect and the docs)."""
        out = {"name": self.name, "unit": self.unit, "summary": self.summary, "reads": list(self.reads),
               "writes": list(self.writes), "function": self.function, "resources": self.resources_text,
               "identity": list(self.identity)}
        if recipe is not None:
            out["active"] = self.when(recipe)
            if self.unit != "global":
                out["resources_now"] = self.resources(recipe) or {"num_cpus": 1}
        return out


STAGES: tuple[Stage, ...] = (
    Stage("scan", "shard", "validate rows, tag (columns, caption lexicons), hash uids, keep sample candidates",
          reads=("input shard",),
          writes=("tags/{shard}.parquet", "uids/{shard}.parquet", "rejects/validate/{shard}.parquet", "sample/{shard}.parquet"),
          function="scan_shard", identity=("sample_threshold",)),
    Stage("embed", "shard", "open_clip on an actor pool (model loaded once per actor; on CUDA nvJPEG decode and resize on the GPU) or DataComp .npz",
          reads=("input shard", "tags/{shard}.parquet"),
          writes=("embeddings/{shard}.parquet", "rejects/embed/{shard}.parquet"),
          function="embed_shard_stage", when=lambda r: r.embed is not None, resources=_embed_pool,
          resources_text="embed.actors actors, embed.num_cpus / num_gpus each"),
    Stage("dedup", "bucket", "duplicate uids across the corpus in one uid-hash range, confirmed on the strings",
          reads=("uids/*.parquet", "tags/*.parquet"), writes=("dedup/bucket-{bucket}.parquet",),
          function="dedup_bucket", key="bucket"),
    Stage("fit", "global", "the uniform fit sample; prompt embeddings, faiss k-means, SBCL subclasses",
          reads=("sample/*.parquet", "embeddings/*.parquet", "dedup/*.parquet"), writes=("fit/sample.parquet", "models/*"),
          when=lambda r: r.needs_sample(), resources_text="the driver", done_key="models"),
    Stage("assign", "shard", "zero-shot, cluster and subclass tags of every valid row",
          reads=("input shard or embeddings/{shard}.parquet", "tags/{shard}.parquet", "models/*"),
          writes=("assign/{shard}.parquet",), function="assign_shard", when=lambda r: r.needs_derive(),
          identity=("models_digest",)),
    Stage("signatures", "shard", "counts per tag combination of valid, first-occurrence rows",
          reads=("tags/{shard}.parquet", "assign/{shard}.parquet", "rejects/embed/{shard}.parquet", "dedup/*.parquet"),
          writes=("signatures/{shard}.parquet", "rejects/dedup/{shard}.parquet", "entries/{label}/{shard}.parquet"),
          function="signatures_shard"),
    Stage("solve", "global", "merged signatures -> solution (cap | waterfill | reweigh | rake | m4 | rnb, composable)",
          reads=("signatures/*.parquet", "fit/sample.parquet"), writes=("signatures/merged.parquet", "solve/solution.json"),
          resources_text="the driver (m4 utility: a task per shard per evaluation)", done_key="solution"),
    Stage("weigh", "shard", "weights from the solution, seeded stochastic rounding",
          reads=("tags/{shard}.parquet", "assign/{shard}.parquet", "solve/solution.json"),
          writes=("manifest/{shard}.parquet", "after/{shard}.parquet", "after_entries/{label}/{shard}.parquet"),
          function="weigh_shard", identity=("solution_digest",)),
    Stage("report", "global", "metrics before/after, M4 constraint families, leakage probes, tagging audit and caption coverage, stage statistics",
          reads=("after/*.parquet", "signatures/merged.parquet", "fit/sample.parquet", "_done/*"),
          writes=("after/merged.parquet", "report.json", "stats/stages.json"), resources_text="the driver", done_key="report"),
    Stage("export", "global", "trainer formats from the manifest", reads=("manifest/*.parquet",), writes=("export/*",),
          when=lambda r: any(f != "parquet" for f in r.export.formats), resources_text="the driver"),
    Stage("html", "global", "report.html (matplotlib, self-contained)",
          reads=("report.json", "stats/stages.json", "manifest/*.parquet"), writes=("report.html",),
          when=lambda r: r.report.html, resources_text="the driver"),
)

BY_NAME = {s.name: s for s in STAGES}


def stage(name: str) -> Stage:
    return BY_NAME[name]


def active_stages(recipe: Recipe) -> list[Stage]:
    return [s for s in STAGES if s.when(recipe)]


# -- what reads what: a file's owner, and the units downstream of it ---------------------------------

ALL = "*"  # every unit of a stage
_PLACEHOLDER = re.compile(r"\{(shard|bucket|label)\}")


def _patterns(text: str) -> list[str]:
    """The run paths a reads/writes entry names ('input shard or embeddings/{shard}.parquet': one)."""
    return [p for p in text.split(" or ") if "/" in p or p.endswith((".json", ".html"))]


@functools.lru_cache(maxsize=None)
def _regex(pattern: str) -> re.Pattern:
    out = ""
    for part in re.split(r"(\{shard\}|\{bucket\}|\{label\}|\*)", pattern):
        if part in ("{shard}", "{bucket}"):
            out += "(?P<key>[^/]+)"
        elif part in ("{label}", "*"):
            out += "[^/]+"
        else:
            out += re.escape(part)
    return re.compile(out + "$")


def _unit_of(declared: Stage, match: re.Match) -> str | None:
    if declared.unit == "global":
        return declared.done_key
    return match.groupdict().get("key")


@functools.lru_cache(maxsize=1)
def _written() -> list[tuple[Stage, str]]:
    """Every declared write, literal paths first."""
    return sorted(((s, p) for s in STAGES for p in s.writes), key=lambda sp: bool(_PLACEHOLDER.search(sp[1])))


def owner(relative: str) -> tuple[str, str] | None:
    """(stage, unit key) of the done marker that records ``relative`` (a path under OUT), or None.
    A literal path (signatures/merged.parquet) wins over a pattern it also matches (signatures/{shard})."""
    for declared, pattern in _written():
        found = _regex(pattern).match(relative)
        if found:
            unit = _unit_of(declared, found)
            return (declared.name, unit) if unit else None
    return None


def _overlap(a: str, b: str) -> bool:
    """Can one path match both patterns? (each pattern's instance, placeholders filled, tried on the other)"""
    fill = lambda p: _PLACEHOLDER.sub("x", p).replace("*", "x")  # noqa: E731
    return bool(_regex(a).match(fill(b)) or _regex(b).match(fill(a)))


def readers_of(stage_name: str) -> list[tuple[Stage, bool]]:
    """The stages that read what ``stage_name`` writes, each with True when a unit reads only the
    same shard's files ({shard} on both sides), False when it reads every unit's (a '*' read, a
    bucket or a global stage)."""
    writer = BY_NAME[stage_name]
    out: list[tuple[Stage, bool]] = []
    for reader in STAGES:
        if reader.name == stage_name:
            continue
        same = None
        for read in (p for entry in reader.reads for p in _patterns(entry)):
            for written in writer.writes:
                if _overlap(read, written):
                    one = "{shard}" in read and "{shard}" in written and reader.unit == writer.unit == "shard"
                    same = one if same is None else (same and one)
        if same is not None:
            out.append((reader, same))
    return out


def downstream(units: list[tuple[str, str]], recipe: Recipe) -> dict[str, set[str]]:
    """Every unit that read, directly or through others, what the ``units`` ((stage, key)) wrote,
    derived from the reads and writes above: {stage: {keys} or {ALL}}. A redone unit rewrites all
    its outputs, so all of them count. The given units themselves are not included."""
    active = {s.name for s in active_stages(recipe)}
    found: dict[str, set[str]] = {}
    todo = list(units)
    while todo:
        stage_name, key = todo.pop()
        for reader, same in readers_of(stage_name):
            if reader.name not in active:
                continue
            if reader.unit == "global":
                target = reader.done_key
                if target is None:
                    continue  # rewritten by every run (export, html)
            else:
                target = key if same else ALL
            have = found.setdefault(reader.name, set())
            if ALL in have or target in have:
                continue
            have.add(target)
            todo.append((reader.name, target))
    return found


def check_accounting(stage_name: str, summary: dict[str, Any]) -> None:
    """A unit's summary must carry the accounting schema: a renamed key fails here, not as a silent 0."""
    missing = [k for k in ACCOUNTING if k != "seconds" and k not in summary]
    if missing:
        raise RuntimeError(f"stage {stage_name}: unit summary lacks {', '.join(missing)} (the accounting schema)")


def _quantile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.quantile(np.asarray(values, np.float64), q)) if values else 0.0


def stage_statistics(stage_name: str, summaries: list[dict[str, Any]], wall_seconds: float | None,
                     slowest: int = 5) -> dict[str, Any]:
    """One stage's merged accounting and its per-unit distribution."""
    key = BY_NAME[stage_name].key
    seconds = [float(s.get("seconds", 0.0)) for s in summaries]
    rates = [s["rows_in"] / t for s, t in zip(summaries, seconds) if t > 0]
    reasons = add_reasons({}, *(s.get("reasons") for s in summaries))
    order = sorted(range(len(summaries)), key=lambda i: (-seconds[i], str(summaries[i].get(key))))
    return {
        "units": len(summaries),
        "rows_in": int(sum(s["rows_in"] for s in summaries)),
        "rows_out": int(sum(s["rows_out"] for s in summaries)),
        "rejected": int(sum(s["rejected"] for s in summaries)),
        "reasons": dict(sorted(reasons.items())),
        "task_seconds": round(sum(seconds), 3),
        "wall_seconds": wall_seconds,
        "seconds_per_unit": {"p50": round(_quantile(seconds, 0.5), 4), "p95": round(_quantile(seconds, 0.95), 4),
                             "max": round(max(seconds, default=0.0), 4)},
        "rows_per_second_per_unit": {"p50": round(_quantile(rates, 0.5), 1), "p5": round(_quantile(rates, 0.05), 1)},
        "slowest": [{"unit": summaries[i].get(key), "seconds": round(seconds[i], 4), "rows_in": int(summaries[i]["rows_in"])}
                    for i in order[:slowest]],
    }


def markdown_table() -> str:
    """The stage table of docs/architecture.md, generated from STAGES (a test keeps the doc in step)."""
    lines = ["| stage | unit | does | reads (under OUT) | writes (under OUT) | resources | redone when changed |",
             "|---|---|---|---|---|---|---|"]
    for s in STAGES:
        cells = [s.name, s.unit, s.summary, ", ".join(f"`{r}`" for r in s.reads), ", ".join(f"`{w}`" for w in s.writes),
                 s.resources_text, ", ".join(s.identity) or "-"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


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
    one line per declared stage."""
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
