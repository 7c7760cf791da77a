"""Tiny random models and tokenizers for fast tests (no download, milliseconds to build)."""

from __future__ import annotations

import string

import torch


def char_tokenizer():
    """A character-level fast tokenizer over printable ASCII (every string tokenises)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
"""A minimal chat template: ``<user>question\n<assistant>`` for one user turn."""


def chat_tokenizer():
    """:func:`char_tokenizer` with :data:`CHAT_TEMPLATE`."""
    tokenizer = char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(vocab_size: int = 128, layers: int = 4, hidden: int = 32, seed: int = 0):
    """A randomly initialised, frozen ``LlamaForCausalLM`` with a few layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                         initializer_range=0.2)  # large enough that logits are not near-uniform
    model = LlamaForCausalLM(config)
    model.requires_grad_(False)
    return model.eval()


def attached(memory, main, seed: int = 0, disjoint: bool = False):
    """``memory`` (an :class:`~repair_pl.memory.EditableLayer`) attached to the layer ``main``
    and reset, as :class:`~repair_pl.module.RepairModule` does; ``disjoint`` sets a side
    memory's disjoint masks (REPAIR's distribution-aware memory does it in a module)."""
    memory.attach(main.requires_grad_(False), seed)
    if disjoint:
        memory.disjoint = True
    memory.reset(seed)
    return memory


def tiny_editor(method: str = "wise", model=None, **options):
    """A ``RepairModule`` over ``model`` (default: a fresh :func:`tiny_llama`) with the character
    tokenizer, built from :func:`repair_pl.presets.preset` with flat ``options``."""
    from repair_pl.module import RepairModule
    from repair_pl.presets import preset

    return RepairModule(tiny_llama() if model is None else model, char_tokenizer(), **preset(method, **options))


def load_script(path) -> object:
    """The Python file at ``path`` (a script of ``scripts/`` or ``tools/``) loaded as a module, so
    a test can call its functions; it is not added to ``sys.modules``."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
