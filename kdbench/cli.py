"""`kdbench` command line: a thin shell over the Python API (kdbench.suite, kdbench.runner, kdbench.report).

Heavy libraries load inside the commands, so `kdbench --help` is instant. Bad input ends with one line naming
the culprit and exit code 2; finished runs stay on disk.
"""

from __future__ import annotations

import logging
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from kdbench.errors import KdbenchError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Benchmark knowledge distillation: distill, compress and profile students.")


def _setup_logging(verbose: bool) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    # stderr: stdout carries the tables only
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False, show_time=False)],
                        force=True)
    import torch  # noqa: F401  - torch configures its loggers on import; quieten them after that, not before

    for noisy in ("transformers", "datasets", "torchao", "torch", "accelerate", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # rich draws kdbench's own bars
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.getLogger("kdbench").setLevel(logging.INFO if verbose else logging.WARNING)
    from kdbench import distributed

    if not distributed.is_main():  # under torchrun: rank 0 speaks for all; the others report errors only
        logging.getLogger("kdbench").setLevel(logging.ERROR)


def _fail(e: KdbenchError) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(code=e.exit_code)


@app.command()
def run(
    suite: Path = typer.Argument(..., help="suite YAML file"),
    results_dir: Optional[Path] = typer.Option(None, "--results-dir", help="base folder (default: the suite's output_dir)"),
    rerun: bool = typer.Option(False, "--rerun", help="run again even if a result exists"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the runs and whether each would run, then stop"),
    only: Optional[List[str]] = typer.Option(None, "--only", help="run ids to run, as globs (repeatable), e.g. "
                                             "'sst2__*' or '*__kd__s0'; the teachers they need come along"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Run a suite: teachers, students alone, each method, compressed variants; write results and tables.

    Data parallel: `torchrun --nproc_per_node N $(which kdbench) run suite.yaml` (rank 0 prints and writes)."""
    _setup_logging(verbose)
    from kdbench import distributed

    try:
        from kdbench.suite import expand, load_suite

        s = load_suite(suite)
        from kdbench.runner import select_runs

        chosen = select_runs(s, only) if only else None
        if dry_run:
            from kdbench.runner import Context, finished, results_dir_for

            out = results_dir_for(s, results_dir)
            ctx = Context(s, out, "cpu")  # loads the data (the data key), builds no model
            for spec in expand(s) if distributed.is_main() else []:
                if chosen is not None and spec.run_id not in chosen:
                    continue
                done = not rerun and finished(out, spec, ctx)
                typer.echo(f"{'done' if done else 'run '}  {spec.run_id}")
            return
        from kdbench.report import task_tables
        from kdbench.results import read_results
        from kdbench.runner import run_suite

        outcome = run_suite(s, results_dir, rerun=rerun, only=chosen)
    except KdbenchError as e:
        _fail(e)
    if not distributed.is_main():  # every rank has the same outcome, hence the same exit code
        raise typer.Exit(code=outcome.exit_code)
    for task, table in task_tables(read_results(outcome.results_dir)).items():
        typer.echo(f"\n## {task}\n\n{table}")
    ran = sum(r.status != "skipped" for r in outcome.runs)
    typer.echo(f"\n{ran} run(s) executed, {len(outcome.runs) - ran} already done; "
               f"report: {outcome.results_dir / 'README.md'}")
    for r in outcome.failed:
        typer.echo(f"error: run {r.run_id} failed: {r.error}", err=True)
    for r in outcome.runs:
        for v in r.failed_variants:
            typer.echo(f"error: run {r.run_id}: variant {v['name']} failed: {v['error']}", err=True)
    raise typer.Exit(code=outcome.exit_code)


@app.command()
def validate(suites: List[Path] = typer.Argument(..., help="suite YAML files")):
    """Check suite files without running anything."""
    from kdbench.suite import expand, load_suite

    bad = 0
    for path in suites:
        try:
            s = load_suite(path)
            typer.echo(f"ok  {path}: {len(expand(s))} runs")
        except KdbenchError as e:
            typer.echo(f"error: {e}", err=True)
            bad += 1
    raise typer.Exit(code=2 if bad else 0)


class Registries(str, Enum):
    tasks = "tasks"
    methods = "methods"
    compressors = "compressors"
    models = "models"


@app.command("ls")
def ls(what: Registries = typer.Argument(..., help="tasks | methods | compressors | models")):
    """List registered tasks, methods, compressors or inline model types, with their parameters."""
    if what is Registries.tasks:
        from kdbench.tasks import tasks as reg
    elif what is Registries.methods:
        from kdbench.methods import methods as reg
    elif what is Registries.compressors:
        from kdbench.compress import compressors as reg
    else:
        from kdbench.models import model_types as reg
    for name in reg.names():
        params = ", ".join(reg.params_schema(name).model_fields) if what is not Registries.models else ""
        typer.echo(f"{name:26s} {reg.describe(name)}" + (f"\n{'':26s} params: {params}" if params else ""))


@app.command()
def report(results_dir: Path = typer.Argument(..., help="a suite's results folder, e.g. results/quickstart")):
    """Re-render a suite's tables from its RunResult JSONs."""
    from kdbench.report import write_report

    if not (results_dir / "runs").is_dir():
        _fail(KdbenchError(f"no results in {results_dir} (expected {results_dir / 'runs'})"))
    typer.echo(write_report(results_dir))


@app.command()
def compare(
    dir_a: Path = typer.Argument(..., help="results folder A, e.g. results/quickstart"),
    dir_b: Path = typer.Argument(..., help="results folder B"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="also write the markdown here"),
):
    """Compare two results folders (two versions or machines): metric, retention, latency, size and their change."""
    from kdbench.report import compare as compare_dirs

    for d in (dir_a, dir_b):
        if not (d / "runs").is_dir():
            _fail(KdbenchError(f"no results in {d} (expected {d / 'runs'})"))
    text = compare_dirs(dir_a, dir_b)
    if output:
        output.write_text(text)
    typer.echo(text)


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks of kdbench's own kernels.")
app.add_typer(bench_app, name="bench")


@bench_app.command("kernels")
def bench_kernels(
    out_dir: Path = typer.Option(Path("results/kernels"), "--out-dir", help="where <gpu>.md is written"),
    quick: bool = typer.Option(False, "--quick", help="small shapes only"),
    static: bool = typer.Option(False, "--static", help="no GPU: compile the kernels for sm_90, count their SASS "
                                "and predict H200 times (kernels/static_model.py)"),
    out: Optional[Path] = typer.Option(None, "--out", help="--static: the page to write (default "
                                       "results/kernels/static-sm90.md)"),
):
    """Time the KD loss (eager, torch.compile, Liger-Kernel if installed, kdbench's kernel) and write a table."""
    _setup_logging(False)
    if static:
        from kdbench.kernels.static_model import static_table

        try:
            text, path = static_table(out, command="kdbench bench kernels --static" + (f" --out {out}" if out else ""))
        except KdbenchError as e:
            _fail(e)
        typer.echo(f"{text}\nwritten to {path}")
        return
    from kdbench.bench import bench_kernels as run_bench

    typer.echo(run_bench(out_dir, quick=quick))


@bench_app.command("fused-linear")
def bench_fused_linear(
    out_dir: Path = typer.Option(Path("results/fused-linear"), "--out-dir", help="where <device>.md is written"),
    quick: bool = typer.Option(False, "--quick", help="a small shape only"),
):
    """Time and measure the loss from hidden states: both models' logits then kd_loss, against
    fused_linear_kd_loss (the methods' `fused_linear`)."""
    _setup_logging(False)
    from kdbench.bench_fused_linear import bench_fused_linear as run_bench

    typer.echo(run_bench(out_dir, quick=quick))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
