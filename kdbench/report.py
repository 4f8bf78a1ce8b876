"""Reports: markdown tables rendered from the RunResult JSONs, so `kdbench report DIR` can redo them any time.

One table per task. Rows: the teacher, the student trained alone, each method's distilled student, and each
compressed variant; runs that differ only by seed are aggregated as mean ± standard deviation (n seeds).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

from tabulate import tabulate

from kdbench.results import read_results


def _role(result: dict) -> str:
    spec = result["spec"]
    if spec["kind"] == "teacher":
        return "teacher"
    if spec["kind"] == "student":
        return "student alone"
    return spec["method"]["name"]


def _row_label(result: dict, variant: dict) -> str:
    role = _role(result)
    return role if variant["kind"] != "compressed" else f"{role} + {variant['name']}"


def _model_label(result: dict, variant: dict) -> str:
    from kdbench.models import describe
    from kdbench.suite import InlineConfig

    pair = result["spec"]["pair"]
    ref = pair["teacher" if variant["kind"] == "teacher" else "student"]["model"]
    return describe(ref if isinstance(ref, str) else InlineConfig.model_validate(ref))


def _mean_std(values: list[float], fmt: str, scale: float = 1.0) -> str:
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return format(vals[0], fmt)
    return f"{format(statistics.mean(vals), fmt)} ± {format(statistics.stdev(vals), fmt)}"


def _latency(variants: list[dict], bs: str):
    return [v["latency"].get(bs, {}).get("median_ms") for v in variants if v.get("latency")]


def task_tables(results: list[dict]) -> dict[str, str]:
    """{task name: markdown table} from ok RunResults."""
    groups: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    order: dict[str, list[str]] = defaultdict(list)
    kind_rank = {"teacher": 0, "student": 1, "distill": 2}
    ok = sorted((r for r in results if r.get("status") == "ok"),
                key=lambda r: (kind_rank[r["spec"]["kind"]], r["run_id"]))
    batch_sizes: dict[str, list[str]] = {}
    for r in ok:
        task = r["spec"]["task"]["name"]
        batch_sizes.setdefault(task, [str(b) for b in r["spec"]["profiling"]["batch_sizes"]])
        for v in r["variants"]:
            key = f"{r['spec']['pair']['name']}|{_row_label(r, v)}"
            if key not in groups[task]:
                order[task].append(key)
            groups[task][key].append((r, v))
    tables = {}
    for task, rows_by_key in groups.items():
        bss = batch_sizes[task]
        header = ["pair", "variant", "model", "seeds", "accuracy", "retention", "params", "non-zero", "size MB",
                  "size ÷"] + [f"latency b{b} ms" for b in bss] + [f"speedup b{bss[-1]}", "peak MB", "J/sample",
                                                                       "train s"]
        teacher_size = {}
        for key in order[task]:
            r, v = rows_by_key[key][0]
            if v["kind"] == "teacher":
                teacher_size[r["spec"]["pair"]["name"]] = v["size"]["bytes"]
        body = []
        for key in order[task]:
            pairs = rows_by_key[key]
            r0, v0 = pairs[0]
            pair = r0["spec"]["pair"]["name"]
            vs = [v for _, v in pairs]
            size = v0["size"]["bytes"]
            t_size = teacher_size.get(pair)
            energy = [v["energy"]["joules_per_sample"] for v in vs if v.get("energy")]
            memory = [v["memory"]["peak_mb"] for v in vs if v.get("memory")]
            train = [v["training"]["wall_s"] for v in vs if v.get("training")]
            body.append(
                [pair, key.split("|", 1)[1], _model_label(r0, v0), len(vs),
                 _mean_std([v["metric"] for v in vs], ".4f"),
                 _mean_std([v["retention"] for v in vs], ".1%"),
                 f"{v0['params']:,}", f"{v0['nonzero_params']:,}", f"{size / 1e6:.2f}",
                 f"{t_size / size:.1f}x" if t_size else "n/a"]
                + [_mean_std(_latency(vs, b), ".2f") for b in bss]
                + [_mean_std([v["speedup_vs_teacher"].get(bss[-1]) for v in vs if v.get("speedup_vs_teacher")],
                             ".1f") + "x",
                   _mean_std(memory, ".0f"), _mean_std(energy, ".3g") if energy else "n/a",
                   _mean_std(train, ".1f") if train else "n/a"]
            )
        tables[task] = tabulate(body, headers=header, tablefmt="github", disable_numparse=True)
    return tables


def render(results: list[dict], suite_name: str) -> str:
    ok = [r for r in results if r.get("status") == "ok"]
    failed = [r for r in results if r.get("status") != "ok"]
    lines = [f"# kdbench results: {suite_name}", ""]
    if ok:
        r = ok[-1]
        dev, ver = r["device"], r["versions"]
        lines += [
            f"- device: {dev['type']} ({dev['name']}), torch threads {dev['threads']}",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in ver.items() if v),
            f"- rendered: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} from {len(ok)} runs",
            "",
            "accuracy: on the task's eval split; retention: accuracy / teacher accuracy; size: bytes of the saved "
            "weights; latency: median of timed batches after warm-up at the profiling sequence length; "
            "speedup: teacher latency / variant latency, measured in the same process; mean ± std over seeds.",
            "",
        ]
    for task, table in task_tables(results).items():
        lines += [f"## {task}", "", table, ""]
    if failed:
        lines += ["## failed runs", ""]
        lines += [f"- `{r['run_id']}`: {r.get('error')}" for r in failed]
        lines.append("")
    return "\n".join(lines)


def write_report(results_dir: Path, suite_name: str | None = None) -> str:
    results_dir = Path(results_dir)
    results = read_results(results_dir)
    text = render(results, suite_name or results_dir.name)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "README.md").write_text(text)
    return text
