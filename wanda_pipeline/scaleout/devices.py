"""Which GPUs each worker sees (its ``CUDA_VISIBLE_DEVICES``)."""

from __future__ import annotations

from wanda_pipeline.errors import ConfigError


def parse_devices(text: str | None) -> list[str]:
    """``"0,1"`` -> ``["0", "1"]``; GPU UUIDs (``GPU-...``) pass through. Empty or None -> []."""
    if not text:
        return []
    out = [d.strip() for d in text.split(",")]
    if any(not d for d in out) or len(set(out)) != len(out):
        raise ConfigError(f"--devices {text!r}: give distinct device ids separated by commas, e.g. --devices 0,1")
    return out


def worker_devices(workers: int, devices: list[str]) -> list[str | None]:
    """The ``CUDA_VISIBLE_DEVICES`` value of each worker, or None to leave the variable alone.

    Devices split into equal contiguous groups (4 devices, 2 workers -> "0,1" and "2,3": one
    model spread over two GPUs), or, with more workers than devices, workers share devices
    round-robin (4 workers on 2 GPUs -> 0, 1, 0, 1).
    """
    if workers < 1:
        raise ConfigError(f"--workers {workers}: needs at least 1")
    if not devices:
        return [None] * workers
    n = len(devices)
    if n % workers == 0:
        size = n // workers
        return [",".join(devices[i * size:(i + 1) * size]) for i in range(workers)]
    if workers % n == 0:
        return [devices[i % n] for i in range(workers)]
    raise ConfigError(f"--devices has {n} device(s) for {workers} worker(s); use a number of devices that is a "
                      f"multiple of the workers (each gets a group) or a divisor of it (workers share)")
