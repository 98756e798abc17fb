"""Turns a result document (the JSON the runner makes) into a text table, a markdown section, a PNG plot, and
keeps BENCHMARKS.md's section for that command and device up to date.

    python -m t2t_kernels.bench.report bench_out/results.json            # print the markdown section again
    python -m t2t_kernels.bench.report bench_out/results.json --record BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

MB = 1 << 20


def _fmt(value, spec, empty="-"):
    return empty if value is None else format(value, spec)


def _time(row) -> str:
    if row.get("median_s") is None:
        return "-"
    scale, unit = (1, "s") if row["median_s"] >= 1 else (1e3, "ms") if row["median_s"] >= 1e-3 else (1e6, "us")
    return (f"{row['median_s'] * scale:.3g} {unit} "
            f"({row['p20_s'] * scale:.3g}-{row['p80_s'] * scale:.3g})")


def _mb(nbytes) -> str | None:
    return None if nbytes is None else f"{nbytes / MB:.1f}"


COLUMNS = ("provider", "time median (p20-p80)", "images/s", "x eager", "x compile", "GB/s", "% copy BW",
           "peak MB", "act. MB", "act. vs eager")


def row_cells(row) -> list[str]:
    if row["status"] != "ok":
        return [row["provider"], f"{row['status']}: {row['reason']}"] + [""] * (len(COLUMNS) - 2)
    return [
        row["provider"],
        _time(row),
        _fmt(row.get("items_per_s"), ".1f"),
        _fmt(row.get("vs_eager"), ".2f"),
        _fmt(row.get("vs_compile"), ".2f"),
        _fmt(row["bytes_per_s"] / 1e9 if row.get("bytes_per_s") else None, ".1f"),
        _fmt(row["bw_fraction"] * 100 if row.get("bw_fraction") is not None else None, ".0f"),
        _mb(row.get("peak_bytes")) or "-",
        _mb(row.get("activation_bytes")) or "-",
        _fmt(row.get("activation_vs_eager"), ".2f"),
    ]


def groups(result: dict) -> list[tuple[str, list[dict]]]:
    """Rows per case, without the skipped providers (skipped_lines lists those once)."""
    out: dict[str, list[dict]] = {}
    for row in result["rows"]:
        if row["status"] != "skipped":
            out.setdefault(row["group"], []).append(row)
    return list(out.items())


def skipped_lines(result: dict) -> list[str]:
    """Skipped providers, one line per provider and reason (e.g. cuda on a CPU run), with how many cases."""
    seen: dict[tuple[str, str], int] = {}
    for row in result["rows"]:
        if row["status"] == "skipped":
            key = (row["provider"], row["reason"])
            seen[key] = seen.get(key, 0) + 1
    return [f"skipped {provider} ({n} case{'s' if n > 1 else ''}): {reason}" for (provider, reason), n in seen.items()]


def settings_text(settings: dict) -> str:
    """The compile backend and mode, and the train steps' AdamW (foreach in the JSONs from before the setting)."""
    mode = settings.get("compile_mode")
    return (f"compile backend {settings['compile_backend']}" + (f" (mode {mode})" if mode else "")
            + f"; train steps' AdamW {settings.get('optimizer', 'foreach')}")


def header_lines(result: dict) -> list[str]:
    m, bw = result["meta"], result["copy_bandwidth"]
    s = m["settings"]
    return [
        f"command: {m['command']}",
        f"device: {m['device_name']}  |  torch {m['torch']}  triton {m.get('triton')}  CUDA {m.get('cuda')}  "
        f"t2t_kernels {m['t2t_kernels']} (extension {'loaded' if m['extension_loaded'] else 'not loaded'})",
        f"date: {m['date']}  |  dtype {s['dtype']}  batch {s['batch']}  image {s['img_size'][0]}x{s['img_size'][1]}  "
        + settings_text(s),
        f"copy bandwidth (measured in this run): {bw['bytes_per_s'] / 1e9:.1f} GB/s ({bw['method']})",
    ] + note_lines(result)


def note_lines(result: dict) -> list[str]:
    """The lines under a run's header: switches, providers, skips, noise, page faults."""
    return (switch_lines(result) + provider_notes(result) + skipped_lines(result) + noise_lines(result)
            + page_fault_lines(result))


def switch_lines(result: dict) -> list[str]:
    switches = result["meta"].get("switches")
    return [f"run-time switches set: {' '.join(f'{k}={v}' for k, v in switches.items())}"] if switches else []


NOISY = 1.3  # p80 / p20 above this: the row's timing spread is wide


def provider_notes(result: dict) -> list[str]:
    """What the model providers are, e.g. which kernel backend="auto" resolved to."""
    notes = {}
    for row in result["rows"]:
        if row["kind"] == "model" and row.get("note") and row["provider"] not in notes:
            notes[row["provider"]] = row["note"]
    return [f"{name}: {note}" for name, note in notes.items() if name in ("eager", "fused")]


def noise_lines(result: dict) -> list[str]:
    rows = [r for r in result["rows"] if r["status"] == "ok" and r.get("p20_s") and r["p80_s"] / r["p20_s"] > NOISY]
    if not rows:
        return []
    return [f"warning: {len(rows)} of {sum(r['status'] == 'ok' for r in result['rows'])} timed rows have p80/p20 > "
            f"{NOISY} (a busy or throttling machine): compare ratios with care, or re-run with more --min-reps"]


FAULTY = 1000  # minor page faults per call above this: the call re-faults memory the allocator gave back


def page_fault_lines(result: dict) -> list[str]:
    rows = [r for r in result["rows"] if r["status"] == "ok" and r.get("page_faults_per_call", 0) > FAULTY]
    if not rows:
        return []
    calls = ", ".join(f"{r['group']} {r['provider']} {r['page_faults_per_call'] / 1000:.1f}k" for r in rows)
    return [f"page faults per call above {FAULTY} (memory the allocator returned to the OS after the last call and "
            f"takes back; part of the row's time, see README, Benchmarks): {calls}"]


def text_table(result: dict) -> str:
    lines = header_lines(result) + [""]
    for group, rows in groups(result):
        cells = [list(COLUMNS)] + [row_cells(r) for r in rows]
        ok = [c for c, r in zip(cells[1:], rows) if r["status"] == "ok"]
        widths = [max(len(c[i]) for c in [cells[0]] + ok) for i in range(len(COLUMNS))]
        lines.append(group)
        for cell, row in zip(cells, [None] + rows):
            if row is not None and row["status"] != "ok":
                lines.append(f"  {cell[0]:<{widths[0]}}  {cell[1]}")
            else:
                lines.append("  " + "  ".join(f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, w) in
                                              enumerate(zip(cell, widths))).rstrip())
        lines.append("")
    lines += target_lines(result)
    return "\n".join(lines)


def target_lines(result: dict) -> list[str]:
    if not result.get("targets"):
        return []
    lines = ["targets (ratios measured in this run):"]
    for t in result["targets"]:
        cond = "" if t["conditions_match"] else f"  [goal set for {t['conditions']}; this run differs]"
        lines.append(f"  {'MET ' if t['met'] else 'MISS'} {t['target']}: {t['ratio']:.2f} (goal {t['goal']}){cond}")
    return lines


# ---- markdown --------------------------------------------------------------------------------------------------
def markdown(result: dict, note: str | None = None) -> str:
    m = result["meta"]
    bw = result["copy_bandwidth"]
    s = m["settings"]
    lines = [
        f"### {m['device_name']} — {s['dtype']}, B={s['batch']}, {s['img_size'][0]}x{s['img_size'][1]}", "",
        f"- command: `{m['command']}`",
        f"- device: {m['device_name']}; torch {m['torch']}, triton {m.get('triton')}, CUDA {m.get('cuda')}, "
        f"t2t_kernels {m['t2t_kernels']} (extension {'loaded' if m['extension_loaded'] else 'not loaded'}), "
        f"Python {m['python']}" + (f", git {m['git']}" if m.get("git") else ""),
        f"- date: {m['date']} (UTC); {settings_text(s)}; timing: median of per-call times, "
        "p20-p80 in brackets, providers interleaved",
        f"- copy bandwidth measured in the same run: {bw['bytes_per_s'] / 1e9:.1f} GB/s (`torch.clone`, "
        f"{bw['tensor_bytes'] / MB:.0f} MB)",
    ]
    if m.get("wall_s"):
        lines.append(f"- the whole run (compilation included) took {m['wall_s'] / 60:.1f} min")
    if m.get("partial"):
        lines.append(f"- partial run: stopped after {m['partial']} (the JSON written after each case)")
    lines += [f"- {line}" for line in note_lines(result)]
    if note:
        lines.append(f"- note: {note}")
    lines += ["", "| case | " + " | ".join(COLUMNS) + " |", "|" + " --- |" * (len(COLUMNS) + 1)]
    for group, rows in groups(result):
        for i, row in enumerate(rows):
            cells = row_cells(row)
            if row["status"] != "ok":
                cells = [cells[0], f"{row['status']}: {row['reason']}"] + [""] * (len(cells) - 2)
            cells = [c.replace("|", "/") for c in cells]
            lines.append(f"| {group if i == 0 else ''} | " + " | ".join(cells) + " |")
    if result.get("targets"):
        lines += ["", "Targets (issue 5 item 8, issue 6 item 2), ratios from this run:", ""]
        for t in result["targets"]:
            cond = "" if t["conditions_match"] else f" (goal set for {t['conditions']}; this run differs)"
            lines.append(f"- {'met' if t['met'] else '**not met**'}: {t['target']}: **{t['ratio']:.2f}** "
                         f"(goal {t['goal']}){cond}")
    lines += ["", "Columns: x eager / x compile = that provider's median time over this one's (>1 is faster); "
              "GB/s = the op's byte floor (inputs read once, outputs written once) over its median time; "
              "peak MB = most memory allocated during one call above what was allocated before it (CPU: replay of "
              "torch.profiler allocator events; CUDA: max_memory_allocated); act. MB = memory the forward leaves "
              "allocated for backward (beyond its own output)."]
    return "\n".join(lines) + "\n"


def _section_key(result: dict) -> str:
    """The command, its run-time switches (an A/B pair of runs differs only there) and the device."""
    m = result["meta"]
    switches = " ".join(f"{k}={v}" for k, v in m.get("switches", {}).items())
    return f"{m['command']}{f' [{switches}]' if switches else ''} @ {m['device_name']}"


_SECTION = re.compile(r"<!-- bench-run: (?P<key>.*?) -->\n.*?<!-- /bench-run -->\n", re.S)


def record(path: str, result: dict, note: str | None = None) -> str:
    """Puts this run's markdown into the file at `path`, replacing the section of an earlier run of the same command
    with the same switches on the same device (older runs of others stay). Returns the key."""
    key = _section_key(result).replace("-->", "- ->")
    section = f"<!-- bench-run: {key} -->\n{markdown(result, note)}<!-- /bench-run -->\n"
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n\n"
    for match in _SECTION.finditer(text):
        if match.group("key") == key:
            text = text[:match.start()] + section + text[match.end():]
            break
    else:
        marker = "<!-- bench-runs: new runs are added below -->\n"
        if marker in text:
            i = text.index(marker) + len(marker)
            text = text[:i] + "\n" + section + text[i:]
        else:
            text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w") as f:
        f.write(text)
    return key


# ---- plot ------------------------------------------------------------------------------------------------------
def plot(result: dict, path: str) -> str:
    """A PNG: speedup against eager per case and provider, the ops' achieved fraction of the copy bandwidth, and the
    models' activation memory against eager's (gradient checkpointing included)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["status"] == "ok" and r["provider"] != "eager" and r.get("vs_eager")]
    bw_rows = [r for r in result["rows"] if r["status"] == "ok" and r.get("bw_fraction") is not None]
    providers = sorted({r["provider"] for r in result["rows"]})
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(providers)}
    mem_rows = [r for r in result["rows"] if r["status"] == "ok" and r.get("activation_vs_eager") is not None
                and r["kind"] == "model"]
    height = max(3.0, 0.22 * max(len(rows), len(bw_rows), len(mem_rows), 1) + 1.5)
    fig, axes = plt.subplots(1, 3, figsize=(22, height), constrained_layout=True)

    def bars(ax, rs, value, title, xlabel, ref):
        labels = [f"{r['case']} [{r['provider']}]" for r in rs]
        ax.barh(range(len(rs)), [value(r) for r in rs], color=[colors[r["provider"]] for r in rs])
        ax.set_yticks(range(len(rs)), labels, fontsize=7)
        ax.invert_yaxis()
        if ref is not None:
            ax.axvline(ref, color="black", lw=0.8, ls="--")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        if not rs:
            ax.text(0.5, 0.5, "nothing measured", ha="center", va="center", transform=ax.transAxes)

    bars(axes[0], rows, lambda r: r["vs_eager"], "speedup vs eager (same run)", "x eager (>1: faster)", 1.0)
    bars(axes[1], bw_rows, lambda r: 100 * r["bw_fraction"], "ops: byte floor / time as % of measured copy bandwidth",
         "% of copy bandwidth", 100.0)
    bars(axes[2], mem_rows, lambda r: r["activation_vs_eager"], "models: activation memory kept for backward",
         "x eager's (<1: less)", 1.0)
    m = result["meta"]
    fig.suptitle(f"t2t_kernels bench — {m['device_name']}, torch {m['torch']}, {m['date']}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- files -----------------------------------------------------------------------------------------------------
def write_json(result: dict, out_dir: str) -> str:
    """out_dir/results.json (the bench writes it after each case too: a partial run keeps its rows)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    with open(path + ".tmp", "w") as f:  # then renamed: an interrupt mid-write keeps the previous file whole
        json.dump(result, f, indent=1, default=str)
        f.write("\n")
    os.replace(path + ".tmp", path)
    return path


def write_all(result: dict, out_dir: str, note: str | None = None) -> dict[str, str]:
    """results.json, results.md and speedups.png in out_dir. Without matplotlib (an optional dependency) there is no
    plot: paths["plot"] is None, paths["plot_skipped"] says why, and an earlier run's speedups.png is removed."""
    paths = {"json": write_json(result, out_dir), "markdown": os.path.join(out_dir, "results.md"),
             "plot": os.path.join(out_dir, "speedups.png")}
    with open(paths["markdown"], "w") as f:
        f.write(markdown(result, note))
    try:
        plot(result, paths["plot"])
    except ImportError as err:
        if os.path.exists(paths["plot"]):
            os.remove(paths["plot"])  # an older run's plot next to this run's numbers would mislead
        paths["plot"], paths["plot_skipped"] = None, f"no plot: matplotlib is not importable ({err})"
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m t2t_kernels.bench.report", description=__doc__,
                                     allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", help="results.json written by `python -m t2t_kernels bench`")
    parser.add_argument("--record", metavar="MARKDOWN", help="update this file's section for the run (BENCHMARKS.md)")
    parser.add_argument("--note", help="a line added to the section (e.g. 'shared machine, noisy')")
    parser.add_argument("--plot", metavar="PNG", help="also draw the plot here")
    args = parser.parse_args(argv)
    with open(args.json) as f:
        result = json.load(f)
    if args.record:
        print(f"recorded in {args.record}: {record(args.record, result, args.note)}")
    else:
        sys.stdout.write(markdown(result, args.note))
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
