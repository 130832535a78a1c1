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
        assert cpu_has_fast_bf16() == (("amx_bf16" in flags and "amx_tile" in flags) or "avx512_bf16" in flags)


def test_autocast_context_switches_matmul_dtype():
    a = torch.randn(4, 4)
    with autocast_context(CPU, torch.float32):
        assert (a @ a).dtype == torch.float32
    with autocast_context(CPU, torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16


def test_wandb_without_a_login_stops_at_once_and_offline_runs_stay_in_the_base_dir(tmp_path, monkeypatch):
    from nanochat.common import get_wandb

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))  # no `wandb login` on this machine
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit, match=r"wandb login.*WANDB_MODE=offline"):
        get_wandb("myrun")
    assert get_wandb("myrun", master_process=False).__class__.__name__ == "DummyWandb"  # other ranks never check
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password " + "0" * 40 + "\n")
    (tmp_path / "netrc").chmod(0o600)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    from nanochat.common import wandb_logged_in
    assert wandb_logged_in()
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    run = get_wandb("myrun", config={"depth": 4})
    run.log({"step": 1, "train/loss": 1.0})
    run.finish()
    assert (tmp_path / "base" / "wandb").is_dir() and any((tmp_path / "base" / "wandb").iterdir())
    assert not (tmp_path / "wandb").exists()  # nothing in the current directory
