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


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX), where bf16 autocast measured 1.5–2.7× fp32's
    speed. Elsewhere oneDNN emulates bf16, and fp32 is the safer default."""
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


def precision_of(setting: str) -> str:
    """accelerate's mixed_precision ("no" or "bf16") for a TrainConfig.precision: fp32, bf16, or auto (bf16 on a GPU
    and on a CPU with native bf16, else fp32; benchmarks/bench_precision.py measured bf16 against fp32 on this
    one). ACCELERATE_MIXED_PRECISION overrides it. The one rule, for `fit` and for `autocast`."""
    import os

    import torch

    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return os.environ["ACCELERATE_MIXED_PRECISION"]
    if setting == "auto":
        return "bf16" if torch.cuda.is_available() or cpu_has_bf16() else "no"
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


ATTENTIONS = ("auto", "eager", "sdpa")


def attention_of(setting: str, device) -> str:
    """transformers' attn_implementation for an `attention` setting. auto: sdpa on a GPU, eager on a CPU, where
    sdpa's CPU flash-attention backward in bf16 cost a SmolLM2-135M training step 1.2x its time at 8×128 tokens
    (benchmarks/bench_train.py measures both)."""
    if setting not in ATTENTIONS:
        from textkeep.errors import TextkeepError

        raise TextkeepError(f"attention must be one of {', '.join(ATTENTIONS)}, got {setting!r}.")
    if setting == "auto":
        import torch

        return "sdpa" if torch.device(device).type == "cuda" else "eager"
    return setting


def speed_up(llm, attention: str = "auto", compile: bool = False, device="cpu") -> None:
    """Set the LLM's attention kernel and, with `compile`, compile each decoder layer in place (torch.compile,
    dynamic shapes, so length-grouped batches of any length reuse one graph). Per-layer compilation, as torchtune
    does: the identical layers share one compiled graph, so it costs ~1 min on 2 CPU cores where the whole model
    took 8; parameter names and state dicts are unchanged."""
    impl = attention_of(attention, device)
    if hasattr(llm, "set_attn_implementation"):
        llm.set_attn_implementation(impl)
    else:  # transformers < 4.56 reads it from the config at every forward
        llm.config._attn_implementation = impl
    if compile:
        from textkeep.importance.maps import decoder_layers

        layers = llm.get_submodule(decoder_layers(llm)[0])
        for layer in layers:
            layer.compile(dynamic=True)
