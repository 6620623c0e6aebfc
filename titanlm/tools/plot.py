"""Loss curves from metrics.jsonl files, and an exact comparison of two runs' losses.

    python -m titanlm.tools.plot RUN [RUN ...] -o curves.png [--keys loss,valid_loss,lr] [--smooth 20]
        [--x step|tokens] [--log_y]
    python -m titanlm.tools.plot RUN_A RUN_B --compare [--tolerance 0]

A RUN is a dump folder (holding metrics.jsonl) or a metrics.jsonl file. A file can hold several
runs: every trainer start appends a start record, a resume continues its run and a start from
step 0 begins a new one. The newest run is used; RUN@N picks the N-th run of the file instead (1
is the oldest, -2 the one before the newest) and RUN@ID the run with that id.

The plot has one panel per key and one line per run, labelled with the run's folder name, and with
the run's id (its start time) when the file holds several runs. --smooth N draws each curve smoothed
next to its raw (faint) self: TensorBoard's debiased exponential moving average, with weight
(N - 1) / (N + 1), so that it averages about the last N points and starts at the first raw value.
Schedules (lr, loss_scale) are always drawn raw: a smoothed schedule shows values never used.
--log_y draws the values on a log scale.

--compare prints, for two runs, the per-step difference of the loss (or of --keys): the largest
absolute and relative difference and the first step that differs. It exits 1 when a difference
exceeds --tolerance (default 0: bitwise equal) or the runs do not cover the same steps, else 0, so
CI can assert that two configurations train identically. It does not need matplotlib.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

from titanlm.errors import ConfigError, DataError
from titanlm.extras import require
from titanlm.metrics import Run, read_runs
from titanlm.tools.common import check_output_folder, run_cli

DEFAULT_KEYS = ("loss", "valid_loss")
RAW_KEYS = ("lr", "loss_scale")  # schedules: never smoothed
_PANEL_INCHES = (6.4, 4.2)
DPI = 100


class PlotError(DataError):
    """Input the tool cannot use; the message is the one line it prints."""


@dataclass
class Curves:
    """One run of one metrics.jsonl, as the tool shows it."""

    label: str
    run: Run
    note: str  # which run of the file this is, for the summary line


def _metrics_path(path: str) -> str:
    file = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise PlotError(f"{path}: no such metrics.jsonl file or dump folder holding one")
    return file


def load(spec: str) -> Curves:
    """The run RUN[@N|@ID] names (the newest of the file without a suffix)."""
    path, _, choice = spec.rpartition("@") if "@" in spec and not os.path.exists(spec) else (spec, "", "")
    file = _metrics_path(path)
    runs = [run for run in read_runs(file) if run.records]
    if not runs:
        raise PlotError(f"{file} holds no step records yet")
    if not choice:
        index = len(runs) - 1
    elif choice.lstrip("-").isdigit() and int(choice) != 0 and -len(runs) <= int(choice) <= len(runs):
        index = int(choice) - 1 if int(choice) > 0 else len(runs) + int(choice)
    else:
        ids = [run.id for run in runs]
        if choice not in ids:
            raise PlotError(f"{file} has no run {choice!r}: it holds runs 1-{len(runs)}, ids {', '.join(ids)}")
        index = ids.index(choice)
    folder = os.path.basename(os.path.dirname(os.path.abspath(file)))
    label = f"{folder}@{choice}" if choice else folder
    run = runs[index]
    if len(runs) > 1:  # which of the file's runs the legend shows
        label += f" (run {run.id})" if run.id else f" (run {index + 1} of {len(runs)})"
    steps = [r["step"] for r in run.records]
    note = f"run {index + 1} of {len(runs)} in {file} (id {run.id or 'none'}, steps {min(steps)}-{max(steps)})"
    return Curves(label, run, note)


def _with_unique_labels(curves: list[Curves], specs: list[str]) -> list[Curves]:
    labels = [c.label for c in curves]
    if len(set(labels)) == len(labels):
        return curves
    return [Curves(spec, c.run, c.note) for c, spec in zip(curves, specs)]


def _tokens(records: list[dict[str, Any]]) -> list[float]:
    """num_consumed_tokens per record; the records without it (steps not logged, validation) count
    their step times the tokens per step of the logged step last written before them."""
    per_step = next((r["num_consumed_tokens"] / r["step"] for r in records if "num_consumed_tokens" in r), 0.0)
    tokens = []
    for r in records:
        if "num_consumed_tokens" in r:
            per_step = r["num_consumed_tokens"] / r["step"]
        tokens.append(r["num_consumed_tokens"] if "num_consumed_tokens" in r else r["step"] * per_step)
    return tokens


def series(run: Run, key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(x, value) of every record of the run with a value for `key`; x is the step or the tokens."""
    xs = _tokens(run.records) if x == "tokens" else [r["step"] for r in run.records]
    points = [(at, r[key]) for at, r in zip(xs, run.records) if _is_number(r.get(key))]
    return [at for at, _ in points], [value for _, value in points]


def _is_number(value: Any) -> bool:
    """A value a curve can show (a string a script wrote by mistake is not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def smoothed(values: list[float], n: int) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average with weight (n - 1) / (n + 1) (pandas'
    `ewm(span=n)`), divided by the weight its terms have so far, so that the first point is the raw
    value instead of a pull towards zero. A value that is not finite is kept and does not count."""
    weight = (n - 1) / (n + 1)
    out, average, counted = [], 0.0, 0
    for value in values:
        if not math.isfinite(value):
            out.append(value)
            continue
        average = average * weight + (1 - weight) * value
        counted += 1
        out.append(average / (1 - weight**counted))
    return out


def plotted_keys(curves: list[Curves], keys: list[str]) -> tuple[list[str], list[str]]:
    """(keys some run has values for, the notes about those none has)."""
    present = [k for k in keys if any(series(c.run, k)[1] for c in curves)]
    notes = []
    for key in keys:
        if key not in present:
            available = sorted(
                {k for c in curves for r in c.run.records for k, v in r.items() if v is not None and k != "step"}
            )
            notes.append(f"no run has values for {key!r}, so it gets no panel; keys there: {', '.join(available)}")
    return present, notes


def figure(curves: list[Curves], keys: list[str], x: str = "step", smooth: int = 0, log_y: bool = False):
    """A matplotlib Figure: one panel per key, one line per run (smoothed beside the faint raw curve with
    `smooth`, except for RAW_KEYS), values on a log scale with `log_y`."""
    matplotlib = require("matplotlib", "plot", "plotting")
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter, MaxNLocator

    cols = min(2, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(_PANEL_INCHES[0] * cols, _PANEL_INCHES[1] * rows), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes, keys):
        for i, c in enumerate(curves):
            xs, values = series(c.run, key, x)
            if not values:
                continue
            color = colors[i % len(colors)]
            # A series no longer than the span (e.g. a few validation points) would smooth to a flat line.
            if 1 < smooth < len(values) and key not in RAW_KEYS:
                ax.plot(xs, values, color=color, alpha=0.25, linewidth=1)
                ax.plot(xs, smoothed(values, smooth), color=color, label=f"{c.label} (smoothed over ~{smooth})")
            else:
                ax.plot(xs, values, color=color, label=c.label, marker="." if len(values) < 50 else None)
        ax.set_title(key)
        ax.set_xlabel("tokens consumed" if x == "tokens" else "step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(key)
        if log_y:
            ax.set_yscale("log")
            # plain numbers (2, 3, 0.5), not 2 x 10^0: a loss spans less than a decade
            ax.yaxis.set_major_formatter(LogFormatter())
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    return fig


def compare(a: Curves, b: Curves, key: str, tolerance: float) -> tuple[list[str], bool]:
    """The report lines of `key`'s per-step difference between two runs, and whether they agree."""
    values_a, values_b = (dict(zip(*series(c.run, key))) for c in (a, b))
    common = sorted(values_a.keys() & values_b.keys())
    lines = [
        f"{key}: {a.label} vs {b.label}, {len(common)} common steps"
        + (f" ({common[0]}-{common[-1]})" if common else "")
    ]
    agree = bool(common)
    for name, only in ((a.label, values_a.keys() - values_b.keys()), (b.label, values_b.keys() - values_a.keys())):
        if only:
            lines.append(f"  steps only in {name}: {_ranges(sorted(only))}")
            agree = False
    if not common:
        return lines, False
    diffs = {s: abs(values_a[s] - values_b[s]) for s in common}
    relative = {s: diffs[s] / abs(values_a[s]) if values_a[s] else (0.0 if not diffs[s] else math.inf) for s in common}
    worst, worst_rel = max(common, key=diffs.get), max(common, key=relative.get)
    differing = [s for s in common if values_a[s] != values_b[s]]
    if not differing:
        lines.append("  equal at every common step")
    else:
        first = differing[0]
        lines += [
            f"  max abs diff {diffs[worst]:.6g} (step {worst}), max rel diff {relative[worst_rel]:.6g} "
            f"(step {worst_rel})",
            f"  first differing step: {first} ({values_a[first]!r} vs {values_b[first]!r})",
        ]
    if diffs[worst] > tolerance or math.isnan(diffs[worst]):
        lines.append(f"  differs by more than --tolerance {tolerance:g}")
        agree = False
    return lines, agree


def _ranges(steps: list[int]) -> str:
    """1, 2, 3, 7 -> "1-3, 7"."""
    spans: list[list[int]] = []
    for s in steps:
        if spans and s == spans[-1][1] + 1:
            spans[-1][1] = s
        else:
            spans.append([s, s])
    return ", ".join(f"{lo}-{hi}" if hi > lo else str(lo) for lo, hi in spans)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m titanlm.tools.plot",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="dump folder or metrics.jsonl; RUN@N or RUN@ID picks a run other than the newest",
    )
    parser.add_argument("-o", "--output", default="curves.png", help="PNG to write (default curves.png)")
    parser.add_argument(
        "--keys",
        help="comma-separated metrics, one panel each (default loss,valid_loss; "
        "with --compare: loss), e.g. loss,lr,grad_norm,tgs,mfu,memory_gib,eta",
    )
    parser.add_argument(
        "--smooth",
        type=int,
        default=0,
        metavar="N",
        help="draw each curve smoothed over about the last N points (TensorBoard's smoothing, weight "
        "(N-1)/(N+1)) beside its faint raw self; lr and loss_scale stay raw",
    )
    parser.add_argument("--log_y", action="store_true", help="draw the values on a log scale")
    parser.add_argument(
        "--x",
        choices=("step", "tokens"),
        default="step",
        help="x axis: optimizer step (default) or num_consumed_tokens",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="print the per-step differences of two runs instead of plotting; exit 1 if they differ",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="--compare: largest absolute difference still counted as equal (default 0)",
    )
    return parser


def _check_options(options: argparse.Namespace) -> None:
    """Refuse, in one line, the values that would fail later or mean nothing."""
    if options.smooth < 0:
        raise ConfigError(f"--smooth {options.smooth} must be 0 or more (0 and 1 draw the raw curves only)")
    if not options.tolerance >= 0:  # also refuses nan, which every comparison would pass
        raise ConfigError(f"--tolerance {options.tolerance} must be a number, 0 or more")
    if options.compare:
        return
    output = os.path.abspath(options.output)
    if os.path.isdir(output):
        raise ConfigError(f"-o {options.output} is a folder; name the PNG to write, e.g. {options.output}/curves.png")
    check_output_folder(os.path.dirname(output), "-o")


@run_cli
def main(argv: list[str] | None = None) -> int:
    """Plot (exit 0) or compare (exit 0 if equal, 1 if not); bad input prints one line and exits 2."""
    options = _parser().parse_intermixed_args(argv)
    _check_options(options)
    keys = [k.strip() for k in options.keys.split(",") if k.strip()] if options.keys else None
    if options.compare and len(options.runs) != 2:
        raise PlotError(f"--compare takes exactly two runs, got {len(options.runs)}")
    curves = _with_unique_labels([load(spec) for spec in options.runs], options.runs)
    for c in curves:
        print(f"{c.label}: {c.note}")
    if options.compare:
        agree = True
        for key in keys or ["loss"]:
            lines, same = compare(*curves, key, options.tolerance)
            print("\n".join(lines))
            agree &= same
        return 0 if agree else 1
    present, notes = plotted_keys(curves, keys or list(DEFAULT_KEYS))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if not present:
        raise PlotError("nothing to plot")
    fig = figure(curves, present, options.x, options.smooth, options.log_y)
    os.makedirs(os.path.dirname(os.path.abspath(options.output)), exist_ok=True)
    # matplotlib would add ".png" to a name without a suffix, and the line below would name another file
    fig.savefig(options.output, dpi=DPI, format=None if os.path.splitext(options.output)[1] else "png")
    print(f"wrote {options.output}: {', '.join(present)} for {len(curves)} run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
