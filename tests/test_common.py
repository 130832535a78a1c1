"""Compute dtype selection: bf16 only where the hardware multiplies bf16 fast, and explicit choices honoured."""
import os

import pytest
import torch

from nanochat.common import autocast_context, cpu_has_fast_bf16, get_compute_dtype

CPU = torch.device("cpu")


def test_explicit_dtypes_are_honoured_and_bad_ones_rejected():
    assert get_compute_dtype(CPU, "float32") == torch.float32
    assert get_compute_dtype(CPU, "bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="--dtype must be auto, float32 or bfloat16"):
        get_compute_dtype(CPU, "fp16")


def test_auto_on_cpu_follows_the_hardware():
    assert get_compute_dtype(CPU) == (torch.bfloat16 if cpu_has_fast_bf16() else torch.float32)
    assert get_compute_dtype(torch.device("mps"), "auto") == torch.float32
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = f.read().split()
        assert cpu_has_fast_bf16() == ("amx_bf16" in flags and "amx_tile" in flags)


def test_autocast_context_switches_matmul_dtype():
    a = torch.randn(4, 4)
    with autocast_context(CPU, torch.float32):
        assert (a @ a).dtype == torch.float32
    with autocast_context(CPU, torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
