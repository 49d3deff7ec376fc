"""Options of latency benchmarking (``yolocomp bench`` and the timing of every stage model in ``yolocomp run``)."""

from __future__ import annotations

from dataclasses import dataclass

from yolocomp.config.options import each, non_negative, option, positive


@dataclass
class BenchConfig:
    batch_sizes: list[int] = option([1, 8], "batch sizes to time", hint="use a list such as [1, 8]", check=each(positive),
                                    metavar="N")
    runs: int = option(50, "timed runs per model and batch size", hint="use a number of timed runs such as 50",
                       check=positive)
    warmup: int = option(10, "untimed warm-up runs", hint="use a number of warm-up runs such as 10", check=non_negative)
    threads: int | None = option(None, "CPU threads (unset: all)", hint="use a CPU thread count or null", check=positive)
    openvino: bool = option(True, "yolocomp run: also measure every stage model converted to OpenVINO, when OpenVINO is "
                            "installed and the device is the CPU", hint="use true or false")
