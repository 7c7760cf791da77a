"""Method presets: the memory and components each ``method`` name stands for.

``RepairModule(model, method="wise")`` builds its parts from here; :func:`preset` also takes
flat options (``preset("repair", lr=5.0, cluster_size=20)``) and hands each to the part that
owns it, which is handy for scripts and sweeps. An option that no part of the method has is an
error that names it.
"""

from __future__ import annotations

from typing import Any

from repair_pl.components import RepairComponents
from repair_pl.memory import EditableLayer, FineTunedLayer, GraceCodebook, SideMemory
from repair_pl.memory.base import held_args, init_params

METHODS = ("none", "wise", "repair", "ft_l", "ft_m", "grace")
"""``none`` edits nothing (the unedited model is evaluated); the others name a memory and components."""

MODULE_OPTIONS = ("layer", "max_steps", "dtype", "device_map", "eval_batch_size", "max_length", "seed", "tokenizer")
COMPONENT_NAMES = ("progressive", "closed_loop", "distribution_aware", "error_feedback", "distillation")


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"model.method must be one of {METHODS}, got {method!r}")


def default_memory(method: str) -> EditableLayer | None:
    """A fresh memory with the method's defaults (``None`` for ``none``)."""
    check_method(method)
    return {"none": lambda: None, "wise": SideMemory, "repair": lambda: SideMemory(score_tokens="last"),
            "ft_l": lambda: FineTunedLayer(objective="prompt_last"), "ft_m": lambda: FineTunedLayer(objective="target"),
            "grace": GraceCodebook}[method]()


def default_components(method: str) -> RepairComponents | None:
    """REPAIR's components for ``repair``; ``None`` (no components) for every other method."""
    check_method(method)
    return RepairComponents.all_on() if method == "repair" else None


def preset(method: str = "repair", base: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
    """``RepairModule`` keyword arguments for ``method`` with ``options`` applied.

    ``base``: arguments to start from instead of the method's defaults (e.g. from config files,
    :func:`repair_pl.cli.module_arguments`); its ``method`` must be ``method``. Options go to the
    module (``layer``, ``max_steps``, ...), to the memory (e.g. ``lr``, ``act_ratio``), to
    ``RepairComponents`` (``edit_batch_size``, ``recalibration_margin``) or to one of its
    components (e.g. ``cluster_size``); a component's name with ``True``/``False`` switches it on
    or off (on adds it with its defaults).
    """
    import copy

    check_method(method)
    base = copy.deepcopy(base or {})
    if base.get("method", method) != method:
        raise ValueError(f"preset({method!r}) was given arguments of method {base['method']!r}")
    memory = base.pop("memory") if "memory" in base else default_memory(method)
    components = base.pop("components") if "components" in base else default_components(method)
    module_kwargs = {k: v for k, v in base.items() if k != "method"}
    module_kwargs.update({k: options.pop(k) for k in list(options) if k in MODULE_OPTIONS})
    memory_kwargs = {k: options.pop(k) for k in list(options) if memory is not None and k in init_params(type(memory))}
    if memory_kwargs:
        memory = type(memory)(**{**held_args(memory), **memory_kwargs})
    switches = {k: options.pop(k) for k in list(options) if k in COMPONENT_NAMES}
    if switches and any(switches.values()) and components is None:
        components = RepairComponents()
    if components is not None:
        for name, on in switches.items():
            current = getattr(components, name)
            setattr(components, name, (current or _component_class(name)()) if on else None)
        for field in ("edit_batch_size", "recalibration_margin"):
            if field in options:
                setattr(components, field, options.pop(field))
        components.__post_init__()
        for name in COMPONENT_NAMES:
            part = getattr(components, name)
            mine = {k: options.pop(k) for k in list(options) if part is not None and k in init_params(type(part))}
            if mine:
                setattr(components, name, type(part)(**{**held_args(part), **mine}))
    if options:
        raise ValueError(f"options {sorted(options)} do not apply to method {method!r} (its memory is "
                         f"{type(memory).__name__ if memory is not None else 'none'}; components: "
                         f"{[c for c in COMPONENT_NAMES if components is not None and getattr(components, c)] or 'none'})")
    return {"method": method, "memory": memory, "components": components, **module_kwargs}


def _component_class(name: str):
    from repair_pl import components as c

    return {"progressive": c.ProgressiveIntervention, "closed_loop": c.ClosedLoopFeedback,
            "distribution_aware": c.DistributionAwareMemory, "error_feedback": c.ErrorFeedback,
            "distillation": c.InBatchDistillation}[name]
