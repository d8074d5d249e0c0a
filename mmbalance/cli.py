"""The ``mmbalance`` command line. Heavy imports (ray, polars) happen inside the commands."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Rebalance image-text corpora before CLIP/SigLIP pretraining.")

EXIT_BAD_INPUT = 2


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    typer.echo(f"mmbalance: error: {message}", err=True)
    raise typer.Exit(code)


def _guarded(fn, debug: bool):
    from mmbalance.errors import exit_code, known_error, sigterm_exits

    with sigterm_exits():
        try:
            return fn()
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            _fail("interrupted; rerun the same command to resume", 130)
        except SystemExit as exc:  # SIGTERM during a run: outputs so far are complete shards only
            if exc.code and exc.code != 0:
                _fail("terminated; rerun the same command to resume", exit_code(exc))
            raise
        except Exception as exc:  # noqa: BLE001 - the one place that turns errors into one line
            known = known_error(exc)
            if debug:
                raise
            if known is not None:
                _fail(str(known).splitlines()[0])
            if isinstance(exc, OSError):  # e.g. a full or read-only output filesystem
                _fail((str(exc).strip().splitlines() or [type(exc).__name__])[0], 1)
            first = (str(exc).strip().splitlines() or [""])[0]
            _fail(f"{type(exc).__name__}: {first} (rerun with --debug for the traceback)", 1)


def _load(recipe_path: Optional[str]):
    from mmbalance.io.recipes import load_recipe
    from mmbalance.schemas.recipe import Recipe

    return load_recipe(recipe_path) if recipe_path else Recipe()


@app.command()
def rebalance(
    shard_dir: Optional[str] = typer.Argument(None, help="Directory or URI of Parquet shards or WebDataset tars (default: recipe input.path)."),
    out: str = typer.Option(..., "--out", "-o", help="Output directory or URI of the run."),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="YAML recipe: a path or a URI (s3://bucket/r.yaml)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)."),
    executor: Optional[str] = typer.Option(None, "--executor", help="ray | local (overrides the recipe)."),
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", help="CPUs for the local Ray."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run in OUT made from another recipe or input."),
    update: bool = typer.Option(False, "--update", help="The input changed since OUT's run (shards added, rewritten or removed; same recipe): rescan only those, redo what depends on them; ends as a fresh run over the new input would."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or summary."),
    plan: bool = typer.Option(False, "--plan", help="Print the stages, units done / to do, resources and expected output size; run nothing."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Validate, tag, solve and write a resampled manifest with a before/after report."""

    def go():
        from mmbalance.pipeline.rebalance import RunOptions, rebalance as run
        from mmbalance.console import print_summary

        spec = _load(recipe)
        source = shard_dir or spec.input.path
        if not source:
            _fail("no shard directory: give SHARD_DIR or input.path in the recipe")
        if executor not in (None, "ray", "local"):
            _fail(f"--executor must be ray or local, got {executor!r}")
        if update and overwrite:
            _fail("--update and --overwrite exclude each other: --update redoes what the input changes affect, --overwrite everything")
        if plan:
            from rich.console import Console

            from mmbalance.pipeline.plan import render_plan
            from mmbalance.pipeline.rebalance import Rebalancer

            render_plan(Rebalancer(source, out, spec, RunOptions(overwrite=overwrite, update=update)).plan(),
                        Console(width=max(Console().width, 150)))
            return
        result = run(source, out, spec, RunOptions(executor=executor, address=address, num_cpus=num_cpus,
                                                   overwrite=overwrite, update=update, show_progress=not quiet))
        if not quiet:
            print_summary(result.report, out, recipe=spec)

    _guarded(go, debug)


@app.command()
def validate(
    shard_dir: str = typer.Argument(..., help="Directory or URI of Parquet shards or WebDataset tars."),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="YAML recipe (column mapping, attributes): a path or a URI."),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Check every shard and row against the recipe without writing a run. Exit 1 if rows would be rejected."""

    def go():
        from mmbalance.pipeline.validate import validate_corpus
        from mmbalance.console import print_validation

        summary = validate_corpus(shard_dir, _load(recipe))
        print_validation(summary)
        if summary["rejected"]:
            raise typer.Exit(1)

    _guarded(go, debug)


@app.command()
def synth(
    out_dir: Path = typer.Argument(..., help="Directory to write the shards into."),
    rows: int = typer.Option(10_000, "--rows", help="Rows in total."),
    shards: int = typer.Option(4, "--shards", help="Number of Parquet files."),
    seed: int = typer.Option(0, "--seed"),
    dim: int = typer.Option(64, "--dim", help="Embedding dimension."),
    images: bool = typer.Option(True, "--images/--no-images", help="Include small PNG image bytes."),
    rendered: bool = typer.Option(False, "--rendered", help="The model-bias corpus instead: rendered images whose pixels carry "
                                  "the gender cue, occupation and a latent scene; captions, no embeddings (docs/model-bias.md)."),
    eval_out: Optional[Path] = typer.Option(None, "--eval-out", help="With --rendered: also write the evaluation set (eval.parquet) here."),
    cue_rate: float = typer.Option(0.5, "--cue-rate", help="With --rendered: share of persons whose gender cue is visible."),
) -> None:
    """Generate a deterministic demo corpus with planted gender-occupation association."""
    if rows < 0 or shards < 1 or dim < 2:
        _fail("need --rows >= 0, --shards >= 1, --dim >= 2")
    if not rendered:
        if eval_out is not None:
            _fail("--eval-out needs --rendered")
        from mmbalance.synth import synth_corpus

        synth_corpus(out_dir, rows, shards, seed=seed, dim=dim, images=images)
    else:
        from mmbalance.synth_images import synth_image_corpus

        if not 0.0 <= cue_rate <= 1.0:
            _fail("--cue-rate must be within [0, 1]")
        synth_image_corpus(out_dir, rows, shards, seed=seed, cue_rate=cue_rate, eval_dir=eval_out)
        if eval_out is not None:
            typer.echo(f"wrote the evaluation set to {eval_out / 'eval.parquet'}")
    typer.echo(f"wrote {rows} rows in {shards} shards to {out_dir}")


@app.command()
def demo(
    out: Path = typer.Option(Path("mmbalance-demo"), "--out", "-o", help="Where the corpus and run go."),
    rows: int = typer.Option(20_000, "--rows"),
    shards: int = typer.Option(8, "--shards"),
    executor: str = typer.Option("ray", "--executor", help="ray | local"),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Generate a small corpus, rebalance it on an embedded local Ray, print before/after."""

    def go():
        from mmbalance.console import describe_recipe, make_console, print_summary
        from mmbalance.pipeline.rebalance import RunOptions, rebalance as run
        from mmbalance.schemas.recipe import parse_recipe
        from mmbalance.synth import DEMO_RECIPE, OCCUPATIONS, synth_corpus

        console = make_console()
        corpus, run_dir = out / "corpus", out / "run"
        woman = sorted(OCCUPATIONS.items(), key=lambda kv: kv[1])
        console.print(f"mmbalance demo: {rows:,} generated image-text rows in {shards} shards ({corpus}), with a planted skew: "
                      f"the share of women runs from {woman[0][1]:.0%} ({woman[0][0]}) to {woman[-1][1]:.0%} ({woman[-1][0]}) "
                      "across 20 long-tailed occupations, and the image embeddings carry it too.")
        spec = parse_recipe(DEMO_RECIPE, "demo recipe")
        console.print("What it balances (the recipe `mmbalance recipe --example` starts from is in the README):")
        for line in describe_recipe(spec):
            console.print(f"- {line}")
        if not corpus.exists():
            synth_corpus(corpus, rows, shards, seed=0)
        result = run(str(corpus), str(run_dir), spec, RunOptions(executor=executor, overwrite=True))
        print_summary(result.report, str(run_dir), console=console, recipe=spec)
        console.print(f"Next: open {run_dir / 'report.html'}; `mmbalance inspect {run_dir}` for a terminal summary; "
                      "`mmbalance recipe --example > recipe.yaml` to start your own (README: Quickstart).")

    _guarded(go, debug)


@app.command("recipe")
def recipe_cmd(
    example: bool = typer.Option(False, "--example", help="Print a commented example recipe."),
    check: Optional[Path] = typer.Option(None, "--check", help="Validate a recipe file and print it resolved."),
) -> None:
    """Print an example recipe or check one."""
    from mmbalance.io.recipes import load_recipe
    from mmbalance.schemas.recipe import EXAMPLE_RECIPE, RecipeError

    if check:
        from mmbalance.operators.tag import check_vocabularies

        try:
            spec = load_recipe(check)
            check_vocabularies(spec)  # as validate and rebalance do before any work
        except RecipeError as err:
            _fail(f"{check}: {err}" if str(check) not in str(err) else str(err))
        import yaml

        typer.echo(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
        return
    if not example:
        _fail("use --example or --check FILE")
    typer.echo(EXAMPLE_RECIPE, nl=False)


# -- report and inspect (issue 9) ------------------------------------------------------------------


@app.command("report")
def report_cmd(
    out: str = typer.Argument(..., help="Run directory or URI (holds report.json)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Write OUT/report.html (self-contained, plots embedded) from a finished run and print its path."""

    def go():
        import mmbalance.pipeline.stages  # noqa: F401 - the stages say which marker records a run file: reads are checked
        from mmbalance.operators.report_html import write_html_report

        if "://" not in out and not Path(out).is_dir():
            _fail(f"{out}: not a directory")
        typer.echo(write_html_report(out))

    _guarded(go, debug)


@app.command("inspect")
def inspect_cmd(
    path: str = typer.Argument(..., help="A shard directory (footers + a bounded sample) or a run directory."),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="YAML recipe naming the tag columns of a shard directory (a path or a URI)."),
    sample_rows: int = typer.Option(5000, "--sample-rows", help="Rows sampled from a shard directory."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Summarise a corpus or a run: schema, row counts, tag prevalence, top associations, label/cluster sizes."""

    def go():
        from mmbalance.inspect import inspect_path

        if sample_rows < 0:
            _fail("--sample-rows must be >= 0")
        inspect_path(path, recipe=_load(recipe) if recipe else None, sample_rows=sample_rows)

    _guarded(go, debug)


# -- export (issue 7) -------------------------------------------------------------------------------


@app.command("export")
def export_cmd(
    out: str = typer.Argument(..., help="Run directory or URI (holds run.json and manifest/)."),
    formats: list[str] = typer.Option([], "--format", "-f", help="csv | webdataset | wids | bigvision | hf | streaming | datacomp | parquet; repeat or comma-separate (default: the recipe's export.formats)."),
    domain: Optional[str] = typer.Option(None, "--domain", help="Tag (label, cluster) whose values are the domains."),
    domain_column: Optional[str] = typer.Option(None, "--domain-column", help="Or: a column of OUT/<domain-source>/ tables, e.g. cluster_id."),
    domain_source: Optional[str] = typer.Option(None, "--domain-source", help="Run subdirectory holding the domain column (default tags)."),
    dest: Optional[str] = typer.Option(None, "--dest", help="Output directory (default OUT/export)."),
    input_uri: Optional[str] = typer.Option(None, "--input", help="Where the source shards are now (default: run.json input)."),
    epoch_size: Optional[int] = typer.Option(None, "--epoch-size", help="Samples per epoch (--train-num-samples); default the manifest's repeats."),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", help="Samples per webdataset tar (default: sized so an epoch's domain shares stay within --max-share-deviation)."),
    max_share_deviation: Optional[float] = typer.Option(None, "--max-share-deviation", help="Per-epoch domain share standard deviation the tar size is chosen for (default 0.01)."),
    min_shard_size: Optional[int] = typer.Option(None, "--min-shard-size", help="Fewest samples per webdataset tar when sized from the bound (default 100: a tar is a request)."),
    copies: Optional[str] = typer.Option(None, "--copies", help="repeats (default): every row drawn in proportion to its repeats | once: each row once, domain mixing only."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Write trainer-ready files (open_clip TSV/webdataset + command line, big_vision, HF, DataComp) from a run, without recomputing."""

    def go():
        import mmbalance.pipeline.stages  # noqa: F401 - the stages say which marker records a run file: reads are checked
        from mmbalance.operators.export import export_run, load_run
        from pydantic import ValidationError

        from mmbalance.schemas.export import ExportOptions
        from mmbalance.schemas.recipe import format_error

        _, info, _, _ = load_run(out)
        section = dict((info.get("recipe") or {}).get("export") or {})
        names = [f.strip() for item in formats for f in item.split(",") if f.strip()]
        names = names or [f for f in section.get("formats", []) if f != "parquet"]
        if not names:
            _fail("no format: pass --format (csv, webdataset, wids, bigvision, hf, streaming, datacomp)")
        data = {k: v for k, v in section.items() if k in ExportOptions.model_fields}
        dom = dict(data.get("domain") or {})
        if domain is not None or domain_column is not None:
            dom = {"by": domain, "column": domain_column, "source": dom.get("source", "tags"), "unlabeled": dom.get("unlabeled", "unlabeled")}
        if domain_source is not None:
            dom["source"] = domain_source
        data["domain"] = dom
        for key, value in (("dest", dest), ("input", input_uri), ("epoch_size", epoch_size), ("copies", copies)):
            if value is not None:
                data[key] = value
        if shard_size is not None:
            data["webdataset"] = {**(data.get("webdataset") or {}), "shard_size": shard_size}
        if max_share_deviation is not None:
            data["webdataset"] = {**(data.get("webdataset") or {}), "max_share_deviation": max_share_deviation}
        if min_shard_size is not None:
            data["webdataset"] = {**(data.get("webdataset") or {}), "min_shard_size": min_shard_size}
        try:
            opts = ExportOptions.model_validate(data)
            opts.domain.column_name()
        except ValidationError as err:
            _fail(format_error("export options", err))
        except ValueError as err:
            _fail(f"export options: {str(err).splitlines()[0]}")
        result = export_run(out, names, opts)
        mix = result["mixture"]
        typer.echo(f"mixture: {len(mix['domains'])} domains, epoch size {mix['epoch_size']}")
        for name in names:
            summary = result.get(name)
            if summary is None:
                continue
            if "skipped" in summary and isinstance(summary["skipped"], str):
                typer.echo(f"{name}: skipped: {summary['skipped']}")
            elif "open_clip_script" in summary:
                typer.echo(f"{name}: {summary.get('dir') or summary.get('file')}")
                typer.echo(f"  train: sh {summary['open_clip_script']} --model ViT-B-32 ...  "
                           f"(python -m open_clip_train.main with this export's {len(summary['open_clip_args'])} data arguments; "
                           "extra arguments are passed on)")
            else:
                typer.echo(f"{name}: {summary.get('file') or summary.get('dir')}")

    _guarded(go, debug)


# -- evaluate (issue 20) ----------------------------------------------------------------------------


@app.command("evaluate")
def evaluate_cmd(
    paths: list[str] = typer.Argument(None, metavar="EVAL_PATH|CHECKPOINT", help="EVAL_PATH (Parquet file or directory; default: the recipe's eval.path), then with --compare the checkpoints (PATH or NAME=PATH)."),
    recipe: Path = typer.Option(..., "--recipe", "-r", help="Evaluation recipe (YAML): model, eval columns, attributes, labels, prompts."),
    out: str = typer.Option(..., "--out", "-o", help="Output directory: evaluate.json, evaluate.html, embeddings/, prompts.parquet, rejects/."),
    compare: bool = typer.Option(False, "--compare", help="Evaluate each checkpoint after EVAL_PATH with the recipe's model and put them side by side (differences against the first, paired intervals)."),
    executor: Optional[str] = typer.Option(None, "--executor", help="local | ray | auto (overrides execution.executor)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)."),
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", help="CPUs for the local Ray."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Clear OUT first."),
    html: bool = typer.Option(True, "--html/--no-html", help="Write evaluate.html."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or table."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Bias (RB, AB, MaxSkew, NDKL) and quality (zero-shot accuracy, recall) of a trained checkpoint, with bootstrap intervals."""

    def go():
        from mmbalance.pipeline.evaluate import EvaluateOptions, evaluate, model_names
        from mmbalance.io.recipes import load_eval_recipe

        spec = load_eval_recipe(recipe)
        items = list(paths or [])
        if compare and len(items) < 2:
            _fail("--compare needs EVAL_PATH and at least one checkpoint: mmbalance evaluate EVAL_PATH --compare A B ...")
        if not compare and len(items) > 1:
            _fail(f"one EVAL_PATH expected, got {len(items)} paths (to compare checkpoints pass --compare)")
        source = items[0] if items else spec.eval.path
        if not source:
            _fail("no evaluation set: give EVAL_PATH or eval.path in the recipe")
        if executor not in (None, "ray", "local", "auto"):
            _fail(f"--executor must be local, ray or auto, got {executor!r}")
        options = EvaluateOptions(executor=executor, address=address, num_cpus=num_cpus, overwrite=overwrite, html=html,
                                  show_progress=not quiet, checkpoints=model_names(items[1:]) if compare else None)
        doc = evaluate(source, out, spec, options)
        if quiet:
            return
        from mmbalance.operators.evaluate.render import print_comparison, print_evaluation

        (print_comparison if compare else print_evaluation)(doc)
        typer.echo(f"evaluation: {out}/evaluate.json, {out}/evaluate.html")

    _guarded(go, debug)


def main() -> None:
    if not os.environ.get("RAY_ADDRESS") and "--address" not in sys.argv:
        # an embedded local Ray stays on loopback (set before Ray is imported); a cluster driver must not
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    app()


if __name__ == "__main__":
    main()
