"""Where this process runs: the one owner of device placement outside accelerate's own training loops.

Training and importance place their models through their `Accelerator`; every other command puts its model on
`device()`: this process's GPU under `accelerate launch`/torchrun, the one GPU when there is one, else the CPU.
"""

from __future__ import annotations


def process_state():
    """This process's place in an `accelerate launch` (or torchrun) run. accelerate treats several processes on CPUs
    as one distributed run only when asked for the CPU, so a machine without GPUs asks for it."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def device():
    """The device this process's models and tensors go to (see the module docstring)."""
    return process_state().device


def on_device(model):
    """The model, moved to `device()` (the same file runs unchanged on CPU and GPU)."""
    return model.to(device())


def precision_of(setting: str) -> str:
    """accelerate's mixed_precision ("no" or "bf16") for a TrainConfig.precision: fp32, bf16, or auto (bf16 on a GPU,
    fp32 on a CPU). ACCELERATE_MIXED_PRECISION overrides it. The one rule, for `fit` and for `autocast`."""
    import os

    import torch

    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return os.environ["ACCELERATE_MIXED_PRECISION"]
    if setting == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    if setting not in ("fp32", "bf16"):
        from textkeep.errors import TextkeepError

        raise TextkeepError(f"precision must be fp32, bf16 or auto, got {setting!r}.")
    return {"fp32": "no", "bf16": "bf16"}[setting]


def autocast(precision: str, device):
    """bf16 autocast for a precision setting (fp32, bf16, auto) outside `fit`'s own: generation, evaluation,
    perplexity, importance, teacher passes. The weights stay as they are (fp32 master weights), and what
    accumulates (importance, losses) is fp32."""
    import torch

    device = torch.device(device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision_of(precision) == "bf16")
