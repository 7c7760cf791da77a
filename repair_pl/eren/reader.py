"""Readers: the black-box model EREN reads notes with. A reader is any callable
``generate(prompt) -> text``; nothing else about the model is used.

- :class:`HFReader`: a local Hugging Face causal LM (the default), greedy decoding, batched
  with left padding, the tokenizer's chat template applied when it has one.
- :class:`OpenAIReader`: any OpenAI-compatible ``/v1/chat/completions`` endpoint, standard
  library only (``urllib``).
- :class:`CachedReader`: remembers answers by prompt. Greedy decoding is deterministic, so a
  closed-book answer computed once for the unedited baseline is reused when EREN falls back to
  closed-book for the same question, and duplicate questions cost one generation.

Readers may also offer ``generate_batch(prompts) -> texts``; :func:`generate_all` uses it when
present and calls the reader once per prompt otherwise.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

import torch
from transformers import StoppingCriteria

Reader = Callable[[str], str]
"""Any callable from a prompt to the generated text (the prompt excludes the chat template)."""


class ReaderError(RuntimeError):
    """The reader could not produce an answer (endpoint unreachable, bad reply, ...)."""


def generate_all(reader: Reader, prompts: Sequence[str]) -> list[str]:
    """Answers for ``prompts`` in order, batched when the reader supports it."""
    if not prompts:
        return []
    batch = getattr(reader, "generate_batch", None)
    return list(batch(list(prompts))) if batch is not None else [reader(p) for p in prompts]


def check_stop(stop: Sequence[str]) -> tuple[str, ...]:
    """``stop`` as a tuple of non-empty strings (a reader option; a bare string is an error,
    since it would otherwise be read as one stop string per character)."""
    if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")
    return tuple(stop)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    ends = [text.find(s) for s in stop if s in text]
    return text[:min(ends)] if ends else text


class StopOnStrings(StoppingCriteria):
    """A ``generate`` stopping criterion: a row is done once its new text holds a stop string
    (decoded each step, so it works with any tokenizer; cheap next to a forward pass)."""

    def __init__(self, tokenizer, stop: Sequence[str], prompt_length: int):
        self.tokenizer, self.stop, self.prompt_length = tokenizer, tuple(stop), prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


class HFReader:
    """Greedy generation with a local causal LM.

    Args:
        model, tokenizer: a Hugging Face causal LM and its tokenizer (see
            :func:`repair_pl.models.load_model`).
        max_new_tokens: answer budget; EREN's answers are short spans or "unanswerable".
        batch_size: prompts per ``generate`` call (prompts are sorted by length first so a
            batch holds little padding).
        chat: apply the tokenizer's chat template (``None``: when the tokenizer has one).
        system: system message for chat models (``None``: the template's default, if any).
        stop: strings that end an answer: generation of a prompt stops once its new text holds
            one, and the text is cut before it (e.g. ``("\n",)`` for one-line answers, so a
            few-shot prompt's next example is neither generated nor paid for).
    """

    def __init__(self, model, tokenizer, max_new_tokens: int = 12, batch_size: int = 8,
                 chat: bool | None = None, system: str | None = None, stop: Sequence[str] = ()):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.batch_size, self.system = max_new_tokens, batch_size, system
        self.stop = check_stop(stop)
        self.chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    def format(self, prompt: str) -> str:
        """The model input for ``prompt`` (chat template applied when enabled)."""
        if not self.chat:
            return prompt
        messages = ([{"role": "system", "content": self.system}] if self.system is not None else [])
        messages.append({"role": "user", "content": prompt})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def __call__(self, prompt: str) -> str:
        return self.generate_batch([prompt])[0]

    @torch.no_grad()
    def generate_batch(self, prompts: list[str]) -> list[str]:
        """Greedy answers for ``prompts``, in order."""
        texts = [self.format(p) for p in prompts]
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=not self.chat).input_ids]
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
        out: list[str] = [""] * len(texts)
        side, self.tokenizer.padding_side = self.tokenizer.padding_side, "left"  # generation pads left
        try:
            device = next(self.model.parameters()).device
            for start in range(0, len(order), self.batch_size):
                chunk = order[start: start + self.batch_size]
                batch = self.tokenizer([texts[i] for i in chunk], return_tensors="pt", padding=True,
                                       add_special_tokens=not self.chat).to(device)
                stopping = ([StopOnStrings(self.tokenizer, self.stop, batch["input_ids"].shape[1])]
                            if self.stop else [])
                generated = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                                pad_token_id=self.tokenizer.pad_token_id, stopping_criteria=stopping)
                new = generated[:, batch["input_ids"].shape[1]:]
                for i, text in zip(chunk, self.tokenizer.batch_decode(new, skip_special_tokens=True)):
                    out[i] = cut_at_stop(text, self.stop).strip()
        finally:
            self.tokenizer.padding_side = side
        return out


class OpenAIReader:
    """A model behind an OpenAI-compatible chat completions endpoint.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1`` (``/chat/completions`` is
            appended).
        model: the model name the server expects.
        api_key: sent as a Bearer token when given.
        max_tokens, temperature: generation settings (temperature 0: greedy, as EREN reads).
        timeout: seconds per request.
        system: an optional system message.
        stop: stop strings, sent as the API's ``stop`` (and cut here too, for servers that ignore it).
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, max_tokens: int = 32,
                 temperature: float = 0.0, timeout: float = 60.0, system: str | None = None,
                 stop: Sequence[str] = ()):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.max_tokens = model, api_key, max_tokens
        self.temperature, self.timeout, self.system = temperature, timeout, system
        self.stop = check_stop(stop)

    def __call__(self, prompt: str) -> str:
        messages = ([{"role": "system", "content": self.system}] if self.system is not None else [])
        messages.append({"role": "user", "content": prompt})
        request_body = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                        "temperature": self.temperature}
        if self.stop:
            request_body["stop"] = list(self.stop)
        body = json.dumps(request_body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read()[:300].decode(errors="replace")
            raise ReaderError(f"{self.url} answered HTTP {err.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ReaderError(f"cannot reach {self.url}: {reason}") from None
        try:
            content = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise ReaderError(f"{self.url} sent no chat completion: {payload[:300]!r}") from None
        if not isinstance(content, str):
            raise ReaderError(f"{self.url} sent no chat completion: {payload[:300]!r}")
        return cut_at_stop(content, self.stop).strip()


class CachedReader:
    """Wraps a reader and remembers its answer to each distinct prompt."""

    def __init__(self, reader: Reader):
        self.reader, self.cache, self.calls = reader, {}, 0

    def __call__(self, prompt: str) -> str:
        return self.generate_batch([prompt])[0]

    def generate_batch(self, prompts: list[str]) -> list[str]:
        todo = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        if todo:
            self.calls += len(todo)
            self.cache.update(zip(todo, generate_all(self.reader, todo)))
        return [self.cache[p] for p in prompts]
