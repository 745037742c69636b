"""plot.py on generated logs: parsing, the PNG (one run and several), the comparison table, labels, the errors."""

import os

import pytest

import plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_log(path, val, train=(), hella=()):
    """A log.txt from {step: value} dicts, in the order train_gpt2.py writes them (by step, train before val)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lines = []
    for step in sorted({*train, *val, *hella}):
        for kind, values, fmt in (("train", train, ".6f"), ("val", val, ".4f"), ("hella", hella, ".4f")):
            if step in values:
                lines.append(f"{step} {kind} {values[step]:{fmt}}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def two_logs(tmp_path):
    """Run a: val every 10 steps to 100, falling 5 -> 2.5, first <= 3.2924 at step 70. Run b: val every 20 steps to 60,
    falling 5 -> 4.4, never reaching 3.2924. They share the val steps 0, 20, 40, 60."""
    a = write_log(tmp_path / "run_a" / "log.txt", val={s: 5 - s / 40 for s in range(0, 101, 10)},
                  train={s: 5.1 - s / 40 for s in range(101)}, hella={0: 0.25, 100: 0.28})
    b = write_log(tmp_path / "run_b" / "log.txt", val={s: 5 - s / 100 for s in range(0, 61, 20)},
                  train={s: 5.1 - s / 100 for s in range(61)})
    return a, b


def test_plot_writes_png_and_rejects_bad_logs(tmp_path, capsys):
    log = tmp_path / "log.txt"
    lines = [f"{s} train {4 - s / 100:.6f}" for s in range(100)]
    lines += [f"{s} val {4.1 - s / 100:.4f}" for s in (0, 50, 99)]
    lines += [f"{s} hella {0.25 + s / 1000:.4f}" for s in (0, 99)]
    log.write_text("\n".join(lines) + "\n99 tra")  # an unfinished last line, as a kill leaves it
    assert plot.main([str(log), "-o", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr()
    assert "val loss 3.1100 (GPT-2 124M: 3.2924)" in out.out and "unfinished last line" in out.err
    series = plot.read_log(str(log))
    assert series["val"] == ([0, 50, 99], [4.1, 3.6, 3.11])
    log.write_text("0 train 1.0\n1 oops 2.0\n")
    assert plot.main([str(log), "-o", str(tmp_path / "q.png")]) == 2
    assert f"{log}:2: expected '<step> <train|val|hella> <value>'" in capsys.readouterr().err
    assert not (tmp_path / "q.png").exists()


def test_one_log_as_before(tmp_path, capsys):
    """One log: plot.png next to it by default, the same summary lines first, then the table, nothing else written."""
    log = write_log(tmp_path / "log" / "log.txt", val={0: 4.5, 50: 3.5, 99: 3.1},
                    train={s: 4.6 - s / 100 for s in range(100)}, hella={0: 0.25, 99: 0.3})
    assert plot.main([log]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == ["step 99: val loss 3.1000 (GPT-2 124M: 3.2924)",
                       "step 99: HellaSwag acc_norm 0.3000 (GPT-2 124M: 0.2955)", ""]
    assert out[3].split() == ["val", "loss", "log"]  # the default label: the log's directory
    assert out[-1] == f"wrote {tmp_path / 'log' / 'plot.png'}"
    assert (tmp_path / "log" / "plot.png").read_bytes()[:8] == PNG_MAGIC
    assert sorted(os.listdir(tmp_path / "log")) == ["log.txt", "plot.png"]  # no temporary file left behind


def test_table_shared_steps_first_step_to_target_and_last(two_logs):
    runs = [plot.read_log(log) for log in two_logs]
    assert plot.table(runs, ["a", "b"], target=3.2924) == [
        "val loss                   a            b",
        "step 0                5.0000       5.0000",
        "step 20               4.5000       4.8000",
        "step 40               4.0000       4.6000",
        "step 60               3.5000       4.4000",
        "first step <= 3.2924      70  not reached",  # reached by a alone, at a step b never logged
        "last val step            100           60",
        "last val loss         2.5000       4.4000",
    ]
    # a target both runs reach: each run's own first step at or below it (a: 4.75 at step 10, which b never logged)
    assert plot.table(runs, ["a", "b"], target=4.75)[5].split() == ["first", "step", "<=", "4.75", "10", "40"]
    assert plot.table(runs, ["a", "b"], target=1.0)[5].split()[-4:] == ["not", "reached", "not", "reached"]


def test_table_picks_round_steps_when_there_are_many():
    steps = list(range(0, 19001, 250)) + [19072]  # val_every=250 over the 19,073 steps of the GPT-2 recipe
    assert plot.table_steps(steps) == [0, 2000, 4000, 6000, 8000, 10000, 12000, 14000, 16000, 18000, 19072]
    assert plot.table_steps([0, 5, 10]) == [0, 5, 10]  # few: all of them
    odd = list(range(1, 100, 2))  # no round stride fits: evenly spaced, first and last included
    chosen = plot.table_steps(odd)
    assert len(chosen) == plot.TABLE_MAX_STEPS and chosen[0] == 1 and chosen[-1] == 99
    assert chosen == sorted(set(chosen)) and set(chosen) <= set(odd)


def test_two_logs_one_png_labels_and_table(two_logs, tmp_path, capsys, monkeypatch):
    out_png = tmp_path / "out" / "compare.png"
    out_png.parent.mkdir()
    assert plot.main([*two_logs, "-o", str(out_png), "--labels", "gpt2,fast"]) == 0
    assert out_png.read_bytes()[:8] == PNG_MAGIC
    assert os.listdir(out_png.parent) == ["compare.png"]
    out = capsys.readouterr().out.splitlines()
    assert "gpt2: step 100: val loss 2.5000 (GPT-2 124M: 3.2924)" in out
    assert "fast: step 60: val loss 4.4000 (GPT-2 124M: 3.2924)" in out
    assert out[out.index("") + 1].split() == ["val", "loss", "gpt2", "fast"]
    assert out[-1] == f"wrote {out_png}"
    # default labels (the logs' directories) and, for several logs, the default output compare.png here
    monkeypatch.chdir(tmp_path)
    assert plot.main([*two_logs, "--target", "4.7"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[out.index("") + 1].split() == ["val", "loss", "run_a", "run_b"]
    assert "first step <= 4.7" in "\n".join(out) and out[-1] == "wrote compare.png"
    assert (tmp_path / "compare.png").read_bytes()[:8] == PNG_MAGIC


def test_default_labels_when_directories_share_a_name():
    assert plot.run_labels(["log_gpt2/log.txt", "log_fast/log.txt"]) == ["log_gpt2", "log_fast"]
    assert plot.run_labels(["a/log/log.txt", "b/log/log.txt"]) == [os.path.join("a", "log"), os.path.join("b", "log")]
    assert plot.run_labels(["x/log.txt", "y/log.txt"], "first,second") == ["first", "second"]


@pytest.mark.parametrize("extra, message", [
    (["--labels", "gpt2"], "plot.py: error: --labels: 1 label for 2 logs (give one per log, separated by commas)"),
    (["--labels", "a,b,c"], "plot.py: error: --labels: 3 labels for 2 logs (give one per log, separated by commas)"),
    (["--labels", "a,a"], "plot.py: error: --labels: 'a,a': every label must be non-empty and different"),
    (["--labels", "a,"], "plot.py: error: --labels: 'a,': every label must be non-empty and different"),
    (["--target", "nan"], "plot.py: error: --target: nan is not a finite val loss"),
])
def test_argument_errors_are_one_line(two_logs, tmp_path, capsys, extra, message):
    out_png = tmp_path / "c.png"
    assert plot.main([*two_logs, "-o", str(out_png), *extra]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [message] and captured.out == ""
    assert not out_png.exists()


@pytest.mark.parametrize("where, problem", [
    ("missing/plot.png", "No such file or directory"),  # the output directory doesn't exist
    ("a_file/plot.png", "Not a directory"),  # its "directory" is a file
    ("a_dir", "Is a directory"),  # the output itself is a directory
])
def test_unwritable_output_is_one_line(two_logs, tmp_path, capsys, where, problem):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_dir").mkdir()
    output = str(tmp_path / where)
    assert plot.main([two_logs[0], "-o", output]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"plot.py: error: {output}: cannot write the plot ({problem})"]
    assert captured.out == ""
    # nothing written anywhere: no temporary file left next to the output, the directory in the way untouched
    assert sorted(os.listdir(tmp_path)) == ["a_dir", "a_file", "run_a", "run_b"]
    assert os.listdir(tmp_path / "a_dir") == []


def test_options_spellings_alias_and_one_line_errors(two_logs, tmp_path, capsys):
    """-o, -o=FILE, --output FILE and --output=FILE write the same plot; a bad or unknown option is one error line;
    --help lists every option and exits 0."""
    outputs = [tmp_path / f"{i}.png" for i in range(4)]
    for i, argv in enumerate([["-o", outputs[0]], [f"-o={outputs[1]}"], ["--output", outputs[2]],
                              [f"--output={outputs[3]}", "--target=4.7"]]):
        assert plot.main([*two_logs, *map(str, argv), "--labels", "a,b"]) == 0
    assert len({p.read_bytes() for p in outputs[:3]}) == 1 and outputs[3].read_bytes()[:8] == PNG_MAGIC
    capsys.readouterr()
    for extra, message in [(["--target", "low"], "plot.py: error: --target=low: expected float"),
                           (["--colour=red"], "plot.py: error: unknown option --colour (see --help for the options)"),
                           (["--labels"], "plot.py: error: argument --labels: expected one argument (see --help)")]:
        assert plot.main([*two_logs, "-o", str(tmp_path / "bad.png"), *extra]) == 2
        captured = capsys.readouterr()
        assert captured.err.splitlines() == [message] and captured.out == ""
    assert not (tmp_path / "bad.png").exists()
    assert plot.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "python plot.py log/log.txt -o log/plot.png" in out
    assert all(f"--{name}=" in out for name in ("output", "labels", "target")) and "LOGS" in out


def test_a_checkpoint_is_not_a_log_one_line(tmp_path, capsys):
    """plot.py run/model_00300.pt: a 15-line UnicodeDecodeError traceback before; one line now, naming the log.txt."""
    write_log(tmp_path / "run" / "log.txt", val={0: 4.0})
    checkpoint = tmp_path / "run" / "model_00300.pt"
    checkpoint.write_bytes(b"PK\x03\x04\x80\x81\xff binary")
    assert plot.main([str(checkpoint), "-o", str(tmp_path / "x.png")]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"plot.py: error: {checkpoint}: not a log.txt: binary data, not text "
                                         f"(pass {tmp_path / 'run' / 'log.txt'})"]
    assert not (tmp_path / "x.png").exists()


def test_loss_axis_shows_step_0():
    """A run from scratch starts near ln(50257) = 10.8: the y-axis stopped near 10.5 and cut it off."""
    run = {"train": ([0, 1, 100], [10.81, 9.5, 3.3]), "val": ([0, 100], [10.74, 3.4]), "hella": ([], [])}
    lo, hi = plot.loss_ylim([run], 3.2924)
    assert 10.81 < hi < 11.2 and lo < 3.2924
