"""This machine's identity, for caches of measurements that only hold on it.

Kernel choices and step-cost curves depend on the CPU, the thread count and the torch build;
:func:`machine_key` names that combination once, so every cache keys on the same thing.
"""

from __future__ import annotations

import platform

import torch

__all__ = ["cpu_name", "machine_key"]


def cpu_name() -> str:
    """The CPU model as the OS reports it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_key() -> str:
    """``cpu|threads|torch version``: what a measured speed depends on besides the model."""
    return f"{cpu_name()}|{torch.get_num_threads()}|{torch.__version__}"
