"""runtime.py: options from a dataclass, --help from field metadata, device choice and the GPU peak FLOPs table."""

from dataclasses import dataclass

import pytest
import torch

import runtime
from runtime import ConfigError, option


@dataclass
class Options:
    name: str = option("a # not a comment", "text with a '# ' in its default", section="first section")
    count: int = option(3, "how many")
    rate: float = option(0.5, "")
    flag: bool = option(False, "on or off", section="second section")


def test_parse_args_types_defaults_and_errors():
    cfg = runtime.parse_args(["--count=7", "--flag=yes", "--name=x=y"], Options)
    assert (cfg.name, cfg.count, cfg.rate, cfg.flag) == ("x=y", 7, 0.5, True)
    for argv, message in [(["--nope=1"], "unknown option --nope"), (["--count=1.5"], "--count=1.5: expected int"),
                          (["--flag=maybe"], "--flag=maybe: expected true/false/1/0"), (["count=1"], "--name=value")]:
        with pytest.raises(ConfigError, match=message):
            runtime.parse_args(argv, Options)


def test_usage_lists_every_option_under_its_section():
    text = runtime.usage("Doc line.\n\n    python x.py", Options, "in x.py")
    assert text.startswith("Doc line.") and "options (--name=value), the defaults in x.py:" in text
    # a default holding "# " is printed whole (the old source-parsing --help cut it there)
    assert "\n  first section\n    --name='a # not a comment' (str)  text with a '# ' in its default\n" in text
    assert "    --count=3 (int)  how many\n    --rate=0.5 (float)\n\n  second section\n    --flag=False (bool)" in text


def test_get_device():
    assert runtime.get_device("cpu") == torch.device("cpu")
    assert runtime.get_device("auto") == torch.device(runtime.default_device())
    with pytest.raises(ConfigError, match="--device gpu: "):
        runtime.get_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device cuda: not available on this machine"):
            runtime.get_device("cuda")
    ddp = runtime.Dist(ddp=True, rank=1, local_rank=1, world_size=2)
    assert runtime.get_device("cpu", ddp) == torch.device("cpu")


def test_peak_flops_table():
    assert runtime.peak_flops("cpu") is None
    expected = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H200": 989e12,
                "NVIDIA GH200 480GB": 989e12, "NVIDIA L4": 121e12, "NVIDIA L40": 181e12, "NVIDIA L40S": 362e12,
                "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA GeForce RTX 4090": 165e12, "Some Other GPU": None}
    assert {name: runtime.peak_flops_of(name) for name in expected} == expected


def test_stop_signal_first_requests_second_ctrl_c_interrupts(monkeypatch):
    import signal

    clock = [100.0]
    monkeypatch.setattr(runtime.time, "monotonic", lambda: clock[0])
    with runtime.StopSignal() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop.handle and stop.agreed(torch.device("cpu"), ddp=False) == 0
        stop.handle(signal.SIGTERM, None)
        stop.handle(signal.SIGTERM, None)  # torchrun forwards SIGTERM: still a request
        stop.handle(signal.SIGINT, None)  # within a second of the first: the same Ctrl-C, forwarded
        assert stop.agreed(torch.device("cpu"), ddp=False) == signal.SIGTERM
        clock[0] += 1.5
        with pytest.raises(KeyboardInterrupt):
            stop.handle(signal.SIGINT, None)  # a person pressing Ctrl-C again
    assert signal.getsignal(signal.SIGTERM) is not stop.handle  # the previous handlers are back
