"""runtime.py: device choice, the GPU peak FLOPs table, the stop signals."""

import pytest
import torch

import files
import runtime
from options import ConfigError


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


def test_peak_flops_of_consumer_cards_and_look_alike_names():
    """The more specific name wins whatever the table's order would give a plain substring match: an H200 NVL is no
    H200 SXM, a 4070 SUPER no 4070; a laptop GPU has no listed peak."""
    expected = {"NVIDIA H200 NVL": 835e12, "NVIDIA GeForce RTX 4070 SUPER": 71.0e12, "NVIDIA GeForce RTX 4070": 58.3e12,
                "NVIDIA GeForce RTX 4070 Ti": 80.2e12, "NVIDIA GeForce RTX 4070 Ti SUPER": 88.2e12,
                "NVIDIA GeForce RTX 4080": 97.5e12, "NVIDIA GeForce RTX 4080 SUPER": 104.5e12,
                "NVIDIA GeForce RTX 3090 Ti": 79.8e12, "NVIDIA GeForce RTX 3080": 59.5e12,
                "NVIDIA GeForce RTX 3080 Ti": 68.0e12, "NVIDIA GeForce RTX 4070 Laptop GPU": None}
    assert {name: runtime.peak_flops_of(name) for name in expected} == expected
    for i, (key, _) in enumerate(runtime.PEAK_BF16_FLOPS):  # no key shadowed by an earlier, shorter one
        assert runtime.peak_flops_of("NVIDIA " + key) == runtime.PEAK_BF16_FLOPS[i][1], key


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


def test_stop_flags_summed_over_ranks():
    """Under DDP the stop request rides on the loss's all-reduce as [SIGINT, SIGTERM, write failed] counts: their sum
    over ranks gives every rank the same signal, SIGTERM over SIGINT as agreed()'s MAX, and a failure of rank 0's
    writes stops every rank."""
    import signal

    cpu, stops = torch.device("cpu"), [runtime.StopSignal() for _ in range(3)]
    stops[1].signum, stops[2].signum = signal.SIGINT, signal.SIGTERM
    flags = [stop.flags(cpu) for stop in stops]
    assert [f.tolist() for f in flags] == [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    assert stops[0].from_flags(flags[0]) == 0
    assert stops[0].from_flags(flags[0] + flags[1]) == signal.SIGINT
    assert stops[0].from_flags(sum(flags)) == signal.SIGTERM
    failed = runtime.StopSignal(runtime.Writes(ddp=True))
    failed.writes.error = files.WriteError("log/model_00010.pt", "No space left on device")
    assert failed.flags(cpu).tolist() == [0.0, 0.0, 1.0]
    with pytest.raises(files.WriteError):
        failed.from_flags(failed.flags(cpu))  # rank 0 stops with its error
    with pytest.raises(runtime.PeerWriteError):
        stops[0].from_flags(flags[0] + failed.flags(cpu))  # and every other rank too


def test_ddp_wrapper_options(tmp_path):
    """wrap_ddp: the gradients are views of DDP's buckets (no second copy) and no buffers are broadcast (the rotary
    tables are the same on every rank); DDP's equality with accumulation is test_train's gloo test."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = runtime.wrap_ddp(torch.nn.Linear(2, 2), runtime.Dist(True, 0, 0, 1), torch.device("cpu"))
        assert model.gradient_as_bucket_view and not getattr(model, "forward_sync_buffers", model.broadcast_buffers)
    finally:
        dist.destroy_process_group()
