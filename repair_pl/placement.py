"""Where the frozen model lives: one device, or several with a ``device_map``.

The frozen model is placed once: on one device (``module.to(device)``) or spread over several
devices with an accelerate ``device_map`` (``"auto"`` for a 70B model over several GPUs). The
side memory always sits on the device of the layer it edits, because it is built from that
layer's weight.

Each edit is a short ``Trainer.fit``. Lightning's strategies move the whole LightningModule to
their device when a fit starts and to the CPU when it ends; for a model spread over several
GPUs that would gather it on one, and for any GPU model it copies all weights twice per edit.
:class:`PlacedStrategy` runs the fit where the model already is and moves nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.accelerators import Accelerator, CUDAAccelerator
from lightning.pytorch.strategies import SingleDeviceStrategy

AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
"""``device_map`` strings that let accelerate choose the placement from the free memory."""


class PlacedStrategy(SingleDeviceStrategy):
    """A single-process strategy for an already placed model: batches go to ``device`` (where
    the model takes its inputs); the module itself is never moved, neither at the start of a
    fit nor (unlike Lightning's strategies) back to the CPU at its end."""

    strategy_name = "placed"

    def model_to_device(self) -> None:
        pass  # placed once by the caller (``.to()`` or ``device_map``); per-edit fits keep it there

    def teardown(self) -> None:
        # Strategy.teardown minus ``lightning_module.cpu()`` (the next edit runs on the same
        # device) and minus the accelerator's teardown, which on CUDA empties the cache and the
        # cuBLAS workspaces after every fit; the next edit would only allocate them again.
        self.precision_plugin.teardown()
        self.checkpoint_io.teardown()


class PlacedCUDAAccelerator(CUDAAccelerator):
    """Lightning's CUDA accelerator without its per-fit setup, which empties the CUDA cache and
    the cuBLAS workspaces at the start of every fit: with one short fit per edit, every edit
    would allocate them again (synchronising ``cudaMalloc`` calls). The device is set once,
    where the model was placed."""

    def setup(self, trainer) -> None:
        pass


def accelerator_for(device: torch.device) -> str | Accelerator:
    """Lightning's accelerator for a torch device (for CUDA, :class:`PlacedCUDAAccelerator`)."""
    if device.type == "cuda":
        return PlacedCUDAAccelerator()
    return {"mps": "mps"}.get(device.type, "cpu")


def module_device(module: torch.nn.Module) -> torch.device:
    """The device a module computes on: its accelerate hook's execution device when it has one
    (offloaded weights sit on ``meta``), else the device of its first parameter."""
    hook = getattr(module, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        device = hook.execution_device
        return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return next(module.parameters()).device


def dispatch(model, device_map: str | dict[str, Any], force_hooks: bool = False):
    """Place an already built model with accelerate: ``device_map`` is ``"auto"`` (or
    ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``), one device for everything
    (``"cuda:0"``, ``"cpu"``), or a ``{module name: device}`` dict as transformers takes it.
    Decoder layers are never split. ``force_hooks`` attaches accelerate's device hooks even
    when every module lands on one device (tests use it to run the multi-device path on CPU)."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    if isinstance(device_map, str):
        if device_map in AUTO_MAPS:
            max_memory = None
            if device_map != "sequential":
                max_memory = get_balanced_memory(model, no_split_module_classes=no_split,
                                                 low_zero=device_map == "balanced_low_0")
            device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
        else:
            device_map = {"": device_map}
    return dispatch_model(model, device_map=dict(device_map), force_hooks=force_hooks)


def check_device_map(device_map) -> None:
    """Refuse a ``device_map`` that is not a known string or a dict, with a clear message."""
    if device_map is None or isinstance(device_map, dict):
        return
    if isinstance(device_map, str):
        if device_map in AUTO_MAPS:
            return
        try:
            torch.device(device_map)
            return
        except RuntimeError:
            pass
    raise ValueError(f"model.device_map={device_map!r}: give one of {AUTO_MAPS}, a device such as 'cuda:0', "
                     f"or a mapping {{module name: device}}")
