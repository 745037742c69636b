"""Plot train_gpt2.py runs: train/val loss and HellaSwag accuracy against steps, next to OpenAI's GPT-2 and GPT-3.

    python plot.py log/log.txt -o log/plot.png
    python plot.py log_gpt2/log.txt log_fast/log.txt -o compare.png --labels gpt2,fast    # several runs, one figure

Reads build-nanogpt's log format (`{step} train {loss}`, `{step} val {loss}`, `{step} hella {acc_norm}`), so old
build-nanogpt logs plot too. Prints each run's latest evals and a table to compare runs by: the val loss at the steps
they share and the first step at which each reached --target (GPT-2 124M's val loss by default). matplotlib is
optional for training and needed only here: `pip install matplotlib`.
"""

import math
import os
import sys
from dataclasses import dataclass

from files import REFERENCES, WriteError, atomic_write
from options import option, run

HELLASWAG_CHANCE = 0.25  # four endings to choose from
LOG_KINDS = ("train", "val", "hella")
# one colour per run, from matplotlib's default cycle minus red, green and gray: those are the GPT-2, GPT-3 and chance
# reference lines, and a run drawn in one of them would read as a reference
RUN_COLORS = ("C0", "C1", "C4", "C5", "C6", "C8", "C9")
TABLE_MAX_STEPS = 12  # more shared val steps than this: the table shows a round-numbered subset


class PlotError(ValueError):
    """A log can't be read, the arguments don't fit or the plot can't be written; main() makes it one line, exit 2."""


def read_log(path):
    """Parse a log into {"train": ([steps], [values]), "val": ..., "hella": ...}.

    A last line without its newline is the trace of a run killed mid-write; it is skipped, anything else malformed is
    an error naming the file and line.
    """
    series = {kind: ([], []) for kind in LOG_KINDS}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except OSError as e:
        raise PlotError(f"{path}: cannot read the log ({e.strerror})") from None
    except UnicodeDecodeError:  # a checkpoint, a plot: binary, which a log.txt never is
        raise PlotError(f"{path}: not a log.txt: binary data, not text ({suggest_log(path)})") from None
    partial_last = lines.pop()  # "" when the file ends with a newline
    for lineno, line in enumerate(lines, start=1):
        parts = line.split()
        try:
            step, kind, value = int(parts[0]), parts[1], float(parts[2])
            if len(parts) != 3 or kind not in series:
                raise ValueError
        except (ValueError, IndexError):
            raise PlotError(f"{path}:{lineno}: expected '<step> <train|val|hella> <value>', got {line!r}") from None
        series[kind][0].append(step)
        series[kind][1].append(value)
    if partial_last:
        print(f"plot.py: note: skipped the unfinished last line of {path}: {partial_last!r}", file=sys.stderr)
    if not any(steps for steps, _ in series.values()):
        raise PlotError(f"{path}: no log lines (is this a train_gpt2.py log.txt?)")
    return series


def suggest_log(path):
    """What to pass instead of a file that is not a log: the log.txt next to it when there is one."""
    beside = os.path.join(os.path.dirname(path), "log.txt")
    return f"pass {beside}" if os.path.isfile(beside) else "pass a train_gpt2.py or chat_sft.py log.txt"


def run_labels(logs, labels=None):
    """One name per run: --labels split at commas, else each log's directory name (log_fast/log.txt -> log_fast), or
    the directory paths as given when two names would be the same (a/log/log.txt and b/log/log.txt)."""
    if labels is not None:
        names = labels.split(",")
        if len(names) != len(logs):
            raise PlotError(f"--labels: {len(names)} label{'s' * (len(names) != 1)} for {len(logs)} "
                            f"log{'s' * (len(logs) != 1)} (give one per log, separated by commas)")
        if not all(names) or len(set(names)) != len(names):
            raise PlotError(f"--labels: {labels!r}: every label must be non-empty and different")
        return names
    names = [os.path.basename(os.path.dirname(os.path.abspath(log))) for log in logs]
    if len(set(names)) != len(names):
        names = [os.path.dirname(log) or "." for log in logs]
    return names


def loss_ylim(runs, reference):
    """Y range of every loss and the reference, with a margin: the top is the largest loss (step 0's ~10.8 for a
    run from scratch), not cut off."""
    values = [reference] + [v for series in runs for kind in ("train", "val") for v in series[kind][1]]
    lo, hi = min(values), max(values)
    pad = 0.05 * (hi - lo) + 1e-3
    return lo - pad, hi + pad


def plot(runs, labels, output, title):
    """Loss panel (each run's val loss, its train loss lighter in the same colour) and HellaSwag panel, written to
    output atomically. One run looks as it always did (train and val in two colours, plain legend); several runs
    are told apart by colour and label."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError("matplotlib is not installed: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    gpt2, gpt3 = REFERENCES["gpt2"], REFERENCES["gpt3"]
    fig, (ax_loss, ax_hella) = plt.subplots(1, 2, figsize=(14, 5))
    many = len(runs) > 1
    all_accs = []
    for i, (series, label) in enumerate(zip(runs, labels)):
        color = RUN_COLORS[i % len(RUN_COLORS)]
        train_color, val_color, prefix = (color, color, f"{label} ") if many else ("C0", "C1", "")
        steps, losses = series["train"]
        if steps:
            # the train loss is noisy and sits on top of the val loss: thin and faded, so the val curves stay readable
            ax_loss.plot(steps, losses, color=train_color, lw=0.8, alpha=0.35 if many else 0.7,
                         label=f"{prefix}train loss (last {losses[-1]:.4f})")
        steps, losses = series["val"]
        if steps:
            ax_loss.plot(steps, losses, color=val_color, lw=1.5, label=f"{prefix}val loss (min {min(losses):.4f})")
        steps, accs = series["hella"]
        if steps:
            name = f"{label} acc_norm" if many else "HellaSwag acc_norm"
            ax_hella.plot(steps, accs, color=color, label=f"{name} (max {max(accs):.4f})")
            all_accs += accs
    ax_loss.axhline(gpt2["val"], color="r", ls="--", label=f"{gpt2['label']} val ({gpt2['val']})")
    ax_loss.set_ylim(*loss_ylim(runs, gpt2["val"]))
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("Loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)

    if not all_accs:
        ax_hella.text(0.5, 0.4, f"no HellaSwag lines in {'these logs' if many else 'this log'}", ha="center",
                      transform=ax_hella.transAxes, bbox={"facecolor": "white", "edgecolor": "none"})
    ax_hella.axhline(gpt2["hella"], color="r", ls="--", label=f"{gpt2['label']} ({gpt2['hella']})")
    ax_hella.axhline(gpt3["hella"], color="g", ls="--", label=f"{gpt3['label']} ({gpt3['hella']})")
    ax_hella.axhline(HELLASWAG_CHANCE, color="gray", ls=":", label=f"chance ({HELLASWAG_CHANCE})")
    references = [gpt2["hella"], gpt3["hella"], HELLASWAG_CHANCE]
    ax_hella.set_ylim(min(references + all_accs) - 0.02, max(references + all_accs) + 0.02)
    ax_hella.set_xlim(ax_loss.get_xlim())  # the same steps on both panels
    ax_hella.set_xlabel("step")
    ax_hella.set_ylabel("accuracy")
    ax_hella.set_title("HellaSwag eval")
    ax_hella.legend(loc="lower right")
    ax_hella.grid(alpha=0.3)

    fig.suptitle(title)
    fig.tight_layout()
    try:  # a kill mid-savefig leaves the previous plot, never half a PNG
        atomic_write(output, lambda f: fig.savefig(f, format="png", dpi=100))
    except WriteError as e:
        raise PlotError(f"{output}: cannot write the plot ({e.reason})") from None
    except OSError as e:
        raise PlotError(f"{output}: cannot write the plot ({e.strerror or e})") from None
    finally:
        plt.close(fig)


def summary(series):
    """One line per metric: the latest value and how it compares with GPT-2 124M."""
    gpt2 = REFERENCES["gpt2"]
    lines = []
    for kind, name, ref in (("val", "val loss", gpt2["val"]), ("hella", "HellaSwag acc_norm", gpt2["hella"])):
        steps, values = series[kind]
        if steps:
            lines.append(f"step {steps[-1]}: {name} {values[-1]:.4f} (GPT-2 124M: {ref})")
    return lines


def table_steps(steps, max_rows=TABLE_MAX_STEPS):
    """The steps to show out of steps (sorted): all if at most max_rows, else the multiples of the smallest round stride
    (1, 2, 5 x 10^k) that leaves at most max_rows, plus the first and last step. Logs with val_every=250 give 0, 2000,
    ..., 18000 and the last step. Evenly spaced steps instead if no round stride leaves at least half of max_rows."""
    if len(steps) <= max_rows:
        return list(steps)
    stride = 1
    while True:
        for mantissa in (1, 2, 5):
            chosen = sorted({steps[0], steps[-1], *(s for s in steps if s % (mantissa * stride) == 0)})
            if len(chosen) <= max_rows:
                if len(chosen) >= max_rows // 2:
                    return chosen
                # n > max_rows steps, so consecutive indices below differ by more than 1: no step repeats
                return [steps[round(i * (len(steps) - 1) / (max_rows - 1))] for i in range(max_rows)]
        stride *= 10


def table(runs, labels, target):
    """Lines of a plain text table, one column per run: the val loss at the val steps all runs share (a subset when
    there are many), the first step whose val loss is <= target ("not reached" if none), and the last val loss."""
    vals = [dict(zip(*series["val"])) for series in runs]  # step -> val loss, per run
    shared = sorted(set.intersection(*(set(v) for v in vals)))
    rows = [["val loss", *labels]]
    rows += [[f"step {s}", *(f"{v[s]:.4f}" for v in vals)] for s in table_steps(shared)]
    first = [next((str(s) for s in sorted(v) if v[s] <= target), "not reached") if v else "-" for v in vals]
    rows.append([f"first step <= {target:g}", *first])
    rows.append(["last val step", *(str(max(v)) if v else "-" for v in vals)])
    rows.append(["last val loss", *(f"{v[max(v)]:.4f}" if v else "-" for v in vals)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    # the row names left-aligned, the numbers right-aligned so their decimal points line up
    return ["  ".join([row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])])
            for row in rows]


@dataclass
class PlotConfig:
    logs: tuple = option((os.path.join("log", "log.txt"),), "log.txt of each run to draw (default: log/log.txt)",
                         positional=True, nargs="*", metavar="LOG", type=str)
    output: str = option(None, "the PNG to write (default: plot.png next to the log; for several logs, "
                               "compare.png in the current directory)", aliases=("-o",))
    labels: str = option(None, "the runs' names, comma-separated, one per log (default: each log's directory name)")
    target: float = option(REFERENCES["gpt2"]["val"], "the table gives the first step at which each run's val loss "
                                                      "is <= this (default: GPT-2 124M's)")


def draw(args):
    logs = args.logs
    output = args.output or (os.path.join(os.path.dirname(logs[0]), "plot.png") if len(logs) == 1 else "compare.png")
    if not math.isfinite(args.target):
        raise PlotError(f"--target: {args.target} is not a finite val loss")
    labels = run_labels(logs, args.labels)
    runs = [read_log(log) for log in logs]
    plot(runs, labels, output, title=logs[0] if len(logs) == 1 else " vs ".join(labels))
    for series, label in zip(runs, labels):
        for line in summary(series):
            print(f"{label}: {line}" if len(runs) > 1 else line)
    print()
    for line in table(runs, labels, args.target):
        print(line)
    print(f"wrote {output}")


def main(argv=None):
    return run("plot.py", __doc__, PlotConfig, argv, draw, errors=(PlotError,))


if __name__ == "__main__":
    sys.exit(main())
