"""export (global): trainer formats from the manifest; report (global): report.json, the run's
figures and stage statistics (assembled by ``operators.report.run_report``); html (global):
report.html. All three are rewritten by every run (byte-identical)."""

from __future__ import annotations

from typing import Any

from mmbalance.pipeline.stage import DONE_MARKERS, GlobalStage, Output, UnitStage, stage_statistics
from mmbalance.pipeline.stages.fit import FIT_SAMPLE
from mmbalance.pipeline.stages.signatures import ENTRIES, SIGNATURES, entry_counts, merged, merged_entries, vocabulary
from mmbalance.pipeline.stages.solve import SOLUTION, solution
from mmbalance.pipeline.stages.weigh import AFTER, AFTER_ENTRIES, MANIFEST
from mmbalance.schemas.recipe import Recipe

EXPORTED = Output("export/*")


class Export(GlobalStage):
    name = "export"
    summary = "trainer formats from the manifest"
    reads = (MANIFEST.every,)
    writes = (EXPORTED,)
    rerun = True

    def formats(self, recipe: Recipe) -> list[str]:
        return [f for f in recipe.export.formats if f != "parquet"]

    def active(self, recipe: Recipe) -> bool:
        return bool(self.formats(recipe))

    def run(self, state) -> dict[str, Any]:
        """The report's export section."""
        from mmbalance.operators.export import export_run

        formats = self.formats(state.recipe)
        exported = export_run(state.store.uri, formats, state.recipe.export)
        return {"dest": state.recipe.export.dest, "formats": formats, "mixture": exported.get("mixture")}


MERGED_AFTER = Output("after/merged.parquet")
REPORT = Output("report.json")
STAGE_STATS = Output("stats/stages.json")


class Report(GlobalStage):
    name = "report"
    summary = ("metrics before/after, M4 constraint families, leakage probes, tagging audit and caption coverage, "
               "stage statistics")
    reads = (AFTER.every, AFTER_ENTRIES.every, SIGNATURES.every, ENTRIES.every, SOLUTION.every, FIT_SAMPLE.every, DONE_MARKERS)
    writes = (MERGED_AFTER, REPORT, STAGE_STATS)
    done_key = "report"
    rerun = True

    def marker_summary(self, report: dict[str, Any]) -> dict[str, Any]:
        return {"rows_in": report["rows"]["input"]}

    def run(self, state) -> dict[str, Any]:
        from mmbalance.operators import stats
        from mmbalance.operators.report import run_report

        recipe, store = state.recipe, state.store
        after = stats.merge((store.read_table("after", f"{s.shard_id}.parquet") for s in state.shards), state.ctx.tag_columns)
        store.write_table("after", "merged.parquet", table=after)
        sample = None
        if recipe.attributes and recipe.report.leakage and store.exists("fit", "sample.parquet"):
            sample = store.read_table("fit", "sample.parquet")
        counts = entry_counts(state)
        entries = {name: (sizes, merged_entries(state, "after_entries", name, len(sizes))) for name, sizes in counts.items()}
        optional = lambda name: state.summaries(name) if state.is_active(name) else []  # noqa: E731
        report = run_report(recipe, state.run, scans=state.summaries("scan"), embeds=optional("embed"),
                            signatures=state.summaries("signatures"), weighs=state.summaries("weigh"),
                            assigns=optional("assign"), before=merged(state), after=after, vocab=vocabulary(state),
                            solution=solution(state), fit=state.results.get("fit"), sample=sample, entries=entries)
        if "export" in state.results:
            report["export"] = state.results["export"]
        report["stage_seconds"] = state.seconds_until_now(self.name)
        report["stages"] = stage_stats(state, report["stage_seconds"])
        store.write_json("stats", "stages.json", obj=report["stages"])
        store.write_json("report.json", obj=report)
        return report


def stage_stats(state, seconds: dict[str, float]) -> dict[str, Any]:
    """Per active stage: units, the merged accounting (rows in/out/rejected, reasons), summed task
    seconds, wall seconds, and the per-unit distribution; global stages: wall seconds."""
    out: dict[str, Any] = {}
    if "inspect" in seconds:
        out["inspect"] = {"wall_seconds": seconds["inspect"]}
    for declared in state.stages:
        if not isinstance(declared, UnitStage):
            if declared.name in seconds:
                out[declared.name] = {"wall_seconds": seconds[declared.name]}
            continue
        out[declared.name] = stage_statistics(declared.key_field, state.summaries(declared.name), seconds.get(declared.name))
    return out


HTML = Output("report.html")


class Html(GlobalStage):
    name = "html"
    summary = "report.html (matplotlib, self-contained)"
    reads = (REPORT.every, STAGE_STATS.every, MANIFEST.every)
    writes = (HTML,)
    rerun = True

    def active(self, recipe: Recipe) -> bool:
        return recipe.report.html

    def run(self, state) -> None:
        if not state.options.html_report:  # the run's choice (tests, jobs with --no-html)
            return None
        from mmbalance.operators.report_html import write_html_report

        write_html_report(state.store.uri)
        return None
