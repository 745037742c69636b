"""Plot a train_gpt2.py run: train/val loss and HellaSwag accuracy against steps, next to OpenAI's GPT-2 and GPT-3.

    python plot.py log/log.txt -o log/plot.png

Reads build-nanogpt's log format (`{step} train {loss}`, `{step} val {loss}`, `{step} hella {acc_norm}`), so old
build-nanogpt logs plot too. matplotlib is optional for training and needed only here: `pip install matplotlib`.
"""

import argparse
import os
import sys

# The numbers a GPT-2 (124M) reproduction is judged by, in one place (train_gpt2.py prints them next to its evals too).
# GPT-2 124M: OpenAI's checkpoint evaluated on FineWeb-Edu's val shard (val loss) and HellaSwag's 10,042 validation
# examples (acc_norm); GPT-3 small (124M): HellaSwag zero-shot acc from the GPT-3 paper (Brown et al. 2020).
REFERENCES = {
    "gpt2": {"label": "OpenAI GPT-2 124M", "val": 3.2924, "hella": 0.2955},
    "gpt3": {"label": "OpenAI GPT-3 124M", "hella": 0.337},
}
HELLASWAG_CHANCE = 0.25  # four endings to choose from
LOG_KINDS = ("train", "val", "hella")


class PlotError(ValueError):
    """The log can't be read or the plot can't be written; main() turns it into one line and exit code 2."""


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


def loss_ylim(series, reference):
    """Y range that shows the interesting part: skip the first 5% of steps, where the loss falls from ~11."""
    values = [reference]
    for kind in ("train", "val"):
        steps, losses = series[kind]
        if steps:
            cut = steps[0] + 0.05 * (steps[-1] - steps[0])
            values += [v for s, v in zip(steps, losses) if s >= cut] or losses
    lo, hi = min(values), max(values)
    pad = 0.05 * (hi - lo) + 1e-3
    return lo - pad, hi + pad


def plot(series, output, title):
    try:
        import matplotlib
    except ImportError:
        raise PlotError("matplotlib is not installed: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    gpt2, gpt3 = REFERENCES["gpt2"], REFERENCES["gpt3"]
    fig, (ax_loss, ax_hella) = plt.subplots(1, 2, figsize=(14, 5))

    steps, losses = series["train"]
    if steps:
        ax_loss.plot(steps, losses, lw=0.8, alpha=0.7, label=f"train loss (last {losses[-1]:.4f})")
    steps, losses = series["val"]
    if steps:
        ax_loss.plot(steps, losses, lw=1.5, label=f"val loss (min {min(losses):.4f})")
    ax_loss.axhline(gpt2["val"], color="r", ls="--", label=f"{gpt2['label']} val ({gpt2['val']})")
    ax_loss.set_ylim(*loss_ylim(series, gpt2["val"]))
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("Loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)

    steps, accs = series["hella"]
    if steps:
        ax_hella.plot(steps, accs, label=f"HellaSwag acc_norm (max {max(accs):.4f})")
    else:
        ax_hella.text(0.5, 0.4, "no HellaSwag lines in this log", ha="center", transform=ax_hella.transAxes,
                      bbox={"facecolor": "white", "edgecolor": "none"})
    ax_hella.axhline(gpt2["hella"], color="r", ls="--", label=f"{gpt2['label']} ({gpt2['hella']})")
    ax_hella.axhline(gpt3["hella"], color="g", ls="--", label=f"{gpt3['label']} ({gpt3['hella']})")
    ax_hella.axhline(HELLASWAG_CHANCE, color="gray", ls=":", label=f"chance ({HELLASWAG_CHANCE})")
    references = [gpt2["hella"], gpt3["hella"], HELLASWAG_CHANCE]
    ax_hella.set_ylim(min(references + accs) - 0.02, max(references + accs) + 0.02)
    ax_hella.set_xlim(ax_loss.get_xlim())  # the same steps on both panels
    ax_hella.set_xlabel("step")
    ax_hella.set_ylabel("accuracy")
    ax_hella.set_title("HellaSwag eval")
    ax_hella.legend(loc="lower right")
    ax_hella.grid(alpha=0.3)

    fig.suptitle(title)
    fig.tight_layout()
    # write atomically: a half-written PNG never replaces the previous plot
    tmp = os.path.join(os.path.dirname(os.path.abspath(output)), f".{os.path.basename(output)}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, output)
    except OSError as e:
        raise PlotError(f"{output}: cannot write the plot ({e.strerror})") from None
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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="plot.py", description=__doc__.split("\n")[0])
    parser.add_argument("log", nargs="?", default=os.path.join("log", "log.txt"), help="log.txt of a run")
    parser.add_argument("-o", "--output", help="PNG to write (default: plot.png next to the log)")
    args = parser.parse_args(argv)
    output = args.output or os.path.join(os.path.dirname(args.log), "plot.png")
    try:
        series = read_log(args.log)
        plot(series, output, title=args.log)
    except PlotError as e:
        print(f"plot.py: error: {e}", file=sys.stderr)
        return 2
    for line in summary(series):
        print(line)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
