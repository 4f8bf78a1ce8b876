"""Comparing two results folders (two versions, two machines): per task and row, each figure in A and in B and
the relative change."""

from __future__ import annotations

from pathlib import Path

from kdbench.report.formatting import fmt_bytes, fmt_change, fmt_stat, markdown_table
from kdbench.report.rows import (
    batch_sizes, collect_rows, decode_of, distinct, extra_metric_names, generation_batch_sizes, latency_of,
    metric_of, retention_of, size_of, speedup_of,
)
from kdbench.results import read_results


def _side(results: list[dict], label: str, folder: Path) -> str:
    ok = [r for r in results if r.get("status") == "ok"]
    devices = distinct(f"{r['device']['type']} ({r['device']['name']})" for r in ok)
    torch = distinct(r["versions"].get("torch") for r in ok)
    kdb = distinct(r["versions"].get("kdbench") for r in ok)
    return (f"- **{label}**: `{folder}`: {len(ok)} ok runs, {len(results) - len(ok)} failed; "
            f"{' | '.join(devices) or 'no device'}; torch {'/'.join(map(str, torch))}, "
            f"kdbench {'/'.join(map(str, kdb))}")


def compare(dir_a: Path, dir_b: Path) -> str:
    """Markdown: per task, each (pair, variant) row's metric, retention, extra metrics, latency, speedup over the
    teacher, decoding ms/token (where timed) and size in A and B, and the relative change B vs A; rows found on one
    side only are listed as such."""
    results_a, results_b = read_results(Path(dir_a)), read_results(Path(dir_b))
    rows_a, rows_b = collect_rows(results_a), collect_rows(results_b)
    lines = ["# kdbench compare", "", _side(results_a, "A", dir_a), _side(results_b, "B", dir_b), "",
             "Values are mean ± std over seeds; Δ: the relative change (B − A) / |A|; † the change is within the "
             "seed spread (|B − A| ≤ std A + std B).", ""]
    for task in distinct(list(rows_a) + list(rows_b)):
        a = {(r.pair, r.label): r for r in rows_a.get(task, [])}
        b = {(r.pair, r.label): r for r in rows_b.get(task, [])}
        ta, tb = rows_a.get(task, []), rows_b.get(task, [])
        common = set(batch_sizes(ta)) & set(batch_sizes(tb))
        bs = max(common, key=int) if common else None
        # figures that only some tasks record, where both sides have them: the extra metrics (perplexity next to
        # exact match) and decoding speed at the largest batch size timed on both sides
        extras = [n for n in extra_metric_names(ta) if n in extra_metric_names(tb)]
        common_gen = set(generation_batch_sizes(ta)) & set(generation_batch_sizes(tb))
        gbs = max(common_gen, key=int) if common_gen else None
        reads = [("metric", metric_of, lambda s: fmt_stat(s, decimals=3)),
                 ("retention", retention_of, lambda s: fmt_stat(s, decimals=1, scale=100, suffix="%")),
                 *[(name, lambda v, n=name: (v.get("extra_metrics") or {}).get(n), lambda s: fmt_stat(s, decimals=3))
                   for name in extras],
                 (f"latency b{bs} ms", latency_of(bs) if bs else (lambda v: None), fmt_stat),
                 # paired with the teacher, so it repeats where absolute latency drifts with the machine's load
                 (f"speedup b{bs}", speedup_of(bs) if bs else (lambda v: None), lambda s: fmt_stat(s, suffix="x")),
                 *([(f"decode b{gbs} ms/token", decode_of(gbs), fmt_stat)] if gbs else []),
                 ("size", size_of, lambda s: fmt_bytes(s.mean) if s else "n/a")]
        header = ["pair", "variant"] + [h for name, _, _ in reads for h in (f"{name} A", f"{name} B", f"{name} Δ")]
        body = []
        for key in [k for k in distinct(list(a) + list(b)) if k in a and k in b]:
            cells = list(key)
            for _, read, show in reads:
                sa, sb = a[key].stat(read), b[key].stat(read)
                cells += [show(sa), show(sb), fmt_change(sa, sb)]
            body.append(cells)
        lines += [f"## {task}", "", markdown_table(header, body, text_columns=2) if body else "No row in both.", ""]
        only = [(side, key) for side, mine, other in (("A", a, b), ("B", b, a)) for key in mine if key not in other]
        lines += [f"- only in {side}: `{pair}: {label}`" for side, (pair, label) in only]
        lines += [""] if only else []
    return "\n".join(lines)

