"""`kdbench` command line: a thin shell over the Python API (kdbench.suite, kdbench.run, kdbench.report).

Heavy libraries load inside the commands, so `kdbench --help` is instant. Bad input ends with one line naming
the culprit and exit code 2; finished runs stay on disk.
"""

from __future__ import annotations

import logging
import re
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from kdbench.errors import KdbenchError

# What may follow `--ray` as its address: `auto`, `local`, `host:port` or `ray://host:port`, never a suite file.
_RAY_ADDRESS = re.compile(r"^(auto|local|ray://\S+|[\w.-]+:\d+)$")


def ray_address_as_option(args: list[str]) -> list[str]:
    """`--ray [ADDRESS]`: click has no option with an optional value, so `--ray ADDR` (or `--ray=ADDR`) becomes
    `--ray --ray-address ADDR` before parsing; `--ray` alone stays a flag (a local Ray)."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--ray="):
            out += ["--ray", "--ray-address", arg.removeprefix("--ray=")]
        elif arg == "--ray" and i + 1 < len(args) and _RAY_ADDRESS.match(args[i + 1]):
            out += ["--ray", "--ray-address", args[i + 1]]
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


class _Typer(typer.Typer):
    def __call__(self, *args, **kwargs):
        sys.argv[1:] = ray_address_as_option(sys.argv[1:])
        return super().__call__(*args, **kwargs)


app = _Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,  # plain help: rich panels label every flag `<bool>`
                  help="Benchmark knowledge distillation: distill, compress and profile students.")



def _print_version(value: bool) -> None:
    if value:
        from kdbench import __version__

        typer.echo(f"kdbench {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="print kdbench's version and exit")):
    """Benchmark knowledge distillation: distill, compress and profile students."""

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
    no_wait: bool = typer.Option(False, "--no-wait", help="if another `kdbench run` is writing to the same results "
                                 "folder, stop (exit 2) instead of waiting for it"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log progress details; show tracebacks of bugs"),
    ray: bool = typer.Option(False, "--ray", metavar="[ADDRESS]", help="`--ray [ADDRESS]`: spread the runs over a "
                             "Ray cluster (pip install kdbench[ray]): alone, a local Ray; `--ray auto`, the running cluster this "
                             "machine is in; `--ray host:6379`; `--ray ray://host:10001`, through Ray Client"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", hidden=True,
                                              help="the address of `--ray ADDRESS`, as its own option"),
    storage: Optional[str] = typer.Option(None, "--storage", help="with --ray: an fsspec URL (s3://…, file://…) "
                                          "for the teachers and students that travel between nodes"),
):
    """Run a suite: teachers, students alone, each method, compressed variants; write results and tables.

    Data parallel: `torchrun --nproc_per_node N $(which kdbench) run suite.yaml` (rank 0 prints and writes)."""
    from kdbench.signals import Interrupted, stop_on_signals

    where: dict = {}  # what an interruption reports: the results folder and the selected runs, once known
    try:
        with stop_on_signals():
            _setup_logging(verbose)
            outcome = _run(suite, results_dir, rerun=rerun, dry_run=dry_run, only=only, wait=not no_wait,
                           where=where, ray=ray or ray_address is not None, ray_address=ray_address,
                           storage=storage)
    except KdbenchError as e:
        _fail(e)
    except Interrupted as e:
        _interrupted(e, where)
    except Exception as e:  # a bug in kdbench: one line, the traceback with -v
        if verbose:
            raise
        typer.echo(f"error: bug in kdbench: {type(e).__name__}: {e} (-v shows the traceback)", err=True)
        raise typer.Exit(code=1) from None
    from kdbench import distributed

    if outcome is None:  # --dry-run
        return
    if not distributed.is_main():  # every rank has the same outcome, hence the same exit code
        raise typer.Exit(code=outcome.exit_code)
    from kdbench.report import console_summary
    from kdbench.results import read_results

    typer.echo("\n" + console_summary(read_results(outcome.results_dir)))
    counts = {status: sum(r.status == status for r in outcome.runs) for status in ("ok", "failed", "skipped")}
    typer.echo(f"runs: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} already done")
    typer.echo(f"full report and plots: {outcome.results_dir / 'README.md'}\n"
               f"result JSONs: {outcome.results_dir / 'runs'}")
    for r in outcome.failed:
        typer.echo(f"error: run {r.run_id} failed: {r.error}", err=True)
    for r in outcome.runs:
        for v in r.failed_variants:
            typer.echo(f"error: run {r.run_id}: variant {v['name']} failed: {v['error']}", err=True)
    raise typer.Exit(code=outcome.exit_code)


def _run(suite: Path, results_dir: Optional[Path], *, rerun: bool, dry_run: bool, only, wait: bool, where: dict,
         ray: bool = False, ray_address: Optional[str] = None, storage: Optional[str] = None):
    """Load, check (kdbench.preflight), then list (--dry-run: returns None) or run the suite under its results
    folder's lock; `where` gets the folder and the selected runs as soon as they are known."""
    from contextlib import nullcontext

    from kdbench import distributed
    from kdbench.lock import results_lock
    from kdbench.run.runner import results_dir_for, select_runs
    from kdbench.plan import expand
    from kdbench.suite import load_suite

    s = load_suite(suite)
    chosen = select_runs(s, only) if only else None
    out = results_dir_for(s, results_dir)
    specs = [spec for spec in expand(s) if chosen is None or spec.run_id in chosen]
    where.update(out=out, specs=specs)
    _preflight(suite, s, results_base=Path(results_dir or s.output_dir), results_dir=out, writable=not dry_run)
    if dry_run:
        from kdbench.run.context import Context
        from kdbench.run.runner import finished

        _warn_bad_results(out, "it is run again", {spec.run_id for spec in specs})
        ctx = Context(s, out, "cpu")  # loads the data (the data key), builds no model
        for spec in specs if distributed.is_main() else []:
            done = not rerun and finished(out, spec, ctx)
            typer.echo(f"{'done' if done else 'run '}  {spec.run_id}")
        return None
    from kdbench.run.runner import run_suite

    # rank 0 alone holds the lock: the other ranks of a launch wait for it in their first collective
    lock = (results_lock(out, wait=wait, on_wait=lambda m: typer.echo(f"kdbench: {m}", err=True))
            if distributed.is_main() else nullcontext())
    with lock:
        if distributed.is_main():  # after the lock: the files another run wrote meanwhile are final
            _warn_bad_results(out, "it is run again", {spec.run_id for spec in specs})
        if ray:  # Ray is imported only here: without --ray nothing changes
            from kdbench.run.ray_runs import run_suite_on_ray

            return run_suite_on_ray(s, results_dir, address=ray_address, storage=storage, rerun=rerun, only=chosen)
        return run_suite(s, results_dir, rerun=rerun, only=chosen)


def _preflight(path: Path, s, **where) -> None:
    from kdbench.preflight import check_suite

    try:
        check_suite(s, **where)
    except KdbenchError as e:
        raise KdbenchError(f"{path}: {e}") from None


def _warn_bad_results(results_dir: Path, then: str, run_ids: Optional[set] = None) -> int:
    """One warning line per file in runs/ that cannot be used (kdbench.results.bad_results), saying what happens
    to it (`then`; a file that is no run of `run_ids` is only ignored); their count."""
    from kdbench.results import bad_results

    bad = bad_results(results_dir)
    for b in bad:
        fate = then if run_ids is None or b.path.stem in run_ids else "ignored"
        typer.echo(f"warning: {b.path}: {b.reason}; {fate}", err=True)
    return len(bad)


def _interrupted(e, where: dict) -> None:
    """The message after SIGINT or SIGTERM: which results are kept, and that the same command resumes."""
    from kdbench.results import read_result, run_path

    out, specs = where.get("out"), where.get("specs") or []
    kept = 0
    for spec in specs:
        r = read_result(run_path(out, spec.run_id))
        kept += bool(r) and r.get("status") == "ok" and r.get("spec_hash") == spec.spec_hash
    import os

    if os.environ.get("RANK", "0") != "0":  # under torchrun every rank gets the signal; rank 0 speaks for all
        raise typer.Exit(code=e.exit_code)
    if out is None:
        typer.echo(f"interrupted ({e.name}) before any run started", err=True)
    else:
        typer.echo(f"interrupted ({e.name}): {kept} of {len(specs)} runs are finished and kept in {out / 'runs'}; "
                   "run the same command again to resume (finished runs are not repeated)", err=True)
    raise typer.Exit(code=e.exit_code)


@app.command()
def validate(suites: List[Path] = typer.Argument(..., help="suite YAML files")):
    """Check suite files without running anything: the schema, and what needs no training (data files and their
    columns and labels, inline model configs, vocabularies)."""
    from kdbench.plan import expand
    from kdbench.suite import load_suite

    _setup_logging(False)  # the model checks import transformers: keep its start-up chatter off the terminal

    bad = 0
    for path in suites:
        try:
            s = load_suite(path)
            _preflight(path, s)
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
    import textwrap

    for name in reg.names():
        typer.echo(textwrap.fill(reg.describe(name), width=100, initial_indent=f"{name:26s} ",
                                 subsequent_indent=" " * 27, break_on_hyphens=False))
        for line in reg.describe_params(name) if what is not Registries.models else []:
            typer.echo(textwrap.fill(line, width=100, initial_indent=" " * 28, subsequent_indent=" " * 32,
                                     break_on_hyphens=False))


@app.command()
def report(results_dir: Path = typer.Argument(..., help="a suite's results folder, e.g. results/quickstart")):
    """Re-render a suite's tables from its RunResult JSONs."""
    from kdbench.report import write_report

    if not (results_dir / "runs").is_dir():
        _fail(KdbenchError(f"no results in {results_dir} (expected {results_dir / 'runs'})"))
    left_out = _warn_bad_results(results_dir, "left out of the report")
    typer.echo(write_report(results_dir))
    typer.echo(f"written to {results_dir / 'README.md'} (and its plots beside it)", err=True)
    if left_out:
        typer.echo(f"warning: {left_out} result file(s) in {results_dir / 'runs'} left out of the report", err=True)


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
        _warn_bad_results(d, "left out of the comparison")
    text = compare_dirs(dir_a, dir_b)
    if output:
        try:
            output.write_text(text)
        except OSError as e:
            _fail(KdbenchError(f"cannot write {output}: {e.strerror or e}"))
    typer.echo(text)
    if output:
        typer.echo(f"written to {output}", err=True)


bench_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Benchmarks of kdbench's own kernels.")
app.add_typer(bench_app, name="bench")


def _bench(measure) -> None:
    """Run a benchmark (`measure() -> (table, page written)`): progress on stderr, the table on stdout, then where
    it went."""
    # The benchmarks log each shape and implementation as they go: minutes on a CPU must not pass in silence.
    _setup_logging(False)
    logging.getLogger("kdbench.kernels").setLevel(logging.INFO)
    logging.getLogger().setLevel(logging.INFO)
    try:
        text, path = measure()
    except KdbenchError as e:
        _fail(e)
    typer.echo(text)
    typer.echo(f"written to {path}", err=True)


@bench_app.command("kernels")
def bench_kernels(
    out: Optional[Path] = typer.Option(None, "--out", help="the page to write (default: <out-dir>/<gpu>.md, or "
                                       "results/kernels/static-sm90.md with --static)"),
    out_dir: Path = typer.Option(Path("results/kernels"), "--out-dir", help="where <gpu>.md is written when "
                                 "--out is not given"),
    quick: bool = typer.Option(False, "--quick", help="small shapes only"),
    static: bool = typer.Option(False, "--static", help="no GPU: compile the kernels for sm_90, count their SASS "
                                "and predict H200 times (kernels/static_model.py)"),
):
    """Time the KD loss (eager, torch.compile, Liger-Kernel if installed, kdbench's kernel) and write a table."""
    if static:
        from kdbench.kernels.static_model import static_table

        _bench(lambda: static_table(out, command="kdbench bench kernels --static" + (f" --out {out}" if out else "")))
    else:
        from kdbench.kernels.benchmark import bench_kernels as run_bench

        _bench(lambda: run_bench(out_dir, quick=quick, out_file=out))


@bench_app.command("fused-linear")
def bench_fused_linear(
    out: Optional[Path] = typer.Option(None, "--out", help="the page to write (default: <out-dir>/<device>.md)"),
    out_dir: Path = typer.Option(Path("results/fused-linear"), "--out-dir", help="where <device>.md is written "
                                 "when --out is not given"),
    quick: bool = typer.Option(False, "--quick", help="a small shape only"),
):
    """Time and measure the loss from hidden states: both models' logits then kd_loss, against
    fused_linear_kd_loss (the methods' `fused_linear`)."""
    from kdbench.kernels.benchmark_fused_linear import bench_fused_linear as run_bench

    _bench(lambda: run_bench(out_dir, quick=quick, out_file=out))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
