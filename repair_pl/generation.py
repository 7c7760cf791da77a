"""Generated-answer evaluation beside the teacher-forced one (docs/evaluation.md).

Teacher-forced scores read the target's tokens after the prompt; they do not show what the model
says when it must produce the answer itself, or whether it stops. Here the model answers each
edit prompt, rephrasing and locality prompt greedily, as a user would see it:

- the budget is the expected answer's token count plus ``GenerationCheck.extra_tokens``, so an
  answer that runs on past the target shows as such;
- generation ends at the first special token (end of sequence or of turn), or once the answer's
  line is complete (nothing after it is scored); the decoded text is then cut
  (:func:`cut_answer`): its first line that holds a letter or digit;
- rewrite and rephrase: exact match of the normalised answer with the target
  (:func:`normalize_answer`, SQuAD's rule);
- locality: whether the normalised answer equals the unedited model's (the pre-edit run's
  answers are the reference, as its token predictions are for teacher-forced locality).

Each query is asked as plain text and, when the tokenizer has a chat template, as a single user
turn of that template (``"chat"``).
"""

from __future__ import annotations

import os
import re
import string
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from repair_pl.data.records import EditRecord
from repair_pl.evaluate import record_queries

GenerateFn = Callable[[list[str], int], list[str]]
"""``(prompts, max_new_tokens) -> generated texts`` (the continuation only), greedy."""

KINDS = ("rewrite", "rephrase", "locality")
SCORE_KEYS = {"rewrite": "rewrite_em", "rephrase": "rephrase_em", "locality": "locality_unchanged"}
MEAN_KEYS = {"rewrite": "rewrite_gen_em", "rephrase": "rephrase_gen_em", "locality": "locality_gen"}
"""Summary names of the plain columns; the chat columns add ``_chat``."""
NO_CHAT_TEMPLATE = "skipped: the tokenizer has no chat template"


@dataclass(frozen=True)
class GenerationCheck:
    """Settings of the generated-answer evaluation.

    Args:
        extra_tokens: tokens allowed beyond the expected answer's own count (its target, or the
            dataset's answer for a locality prompt). Room to stop, or to show that it does not.
    """

    extra_tokens: int = 16

    def __post_init__(self):
        if not isinstance(self.extra_tokens, int) or self.extra_tokens < 0:
            raise ValueError(f"GenerationCheck.extra_tokens must be a non-negative integer, got {self.extra_tokens!r}")

    def key(self) -> dict:
        """What the generated answers depend on besides the model and records (cache keys)."""
        return asdict(self)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, drop punctuation (ASCII and Unicode), drop the
    articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower()
                   if ch not in string.punctuation and not unicodedata.category(ch).startswith("P"))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match_answer(answer: str, target: str) -> float:
    """1.0 when ``answer`` and ``target`` are equal after :func:`normalize_answer`, else 0.0."""
    return float(normalize_answer(answer) == normalize_answer(target))


def cut_answer(text: str) -> str:
    """The answer in a generated continuation: its first line that holds a letter or digit,
    stripped ("" when none does). Lines before it are blank or punctuation only: a plain prompt
    without its question mark is often continued with "?" and the answer follows on a new line."""
    for line in text.split("\n"):
        if any(ch.isalnum() for ch in line):
            return line.strip()
    return ""


def chat_prompt(tokenizer, question: str) -> str:
    """``question`` as the single user turn of ``tokenizer``'s chat template, ready for the reply."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


_PLACEHOLDER = "\x1fuser message\x1f"


def user_turn_markers(tokenizer) -> tuple[str, str] | None:
    """``(opener, closer)``: the text of ``tokenizer``'s chat template just before and just after
    a user message (special tokens included), found by rendering a placeholder message; ``None``
    without a chat template or when the template does not show the message as given."""
    if not has_chat_template(tokenizer):
        return None

    def around(messages: list[dict]) -> tuple[str, str] | None:
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:  # a template may refuse a conversation, e.g. one that does not alternate
            return None
        if not isinstance(text, str) or text.count(_PLACEHOLDER) != 1:
            return None
        before, after = text.split(_PLACEHOLDER)
        return before, after

    single = around([{"role": "user", "content": _PLACEHOLDER}])
    if single is None:
        return None
    opener, closer = single
    later = around([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": _PLACEHOLDER}])
    if later is not None:  # what a user turn opens with wherever it stands, not the system prompt before the first
        common = os.path.commonprefix([opener[::-1], later[0][::-1]])[::-1]
        opener = common or opener
    closer = closer.rstrip() or closer  # the end-of-turn token, not the newline after it
    return (opener, closer) if opener else None


def user_message(text: str, markers: tuple[str, str] | None) -> str | None:
    """The last user message of a chat-formatted ``text`` (decoded with its special tokens), by
    the template's ``markers`` (:func:`user_turn_markers`); ``None`` when ``text`` holds no user turn."""
    if markers is None:
        return None
    opener, closer = markers
    at = text.rfind(opener)
    if at < 0:
        return None
    message = text[at + len(opener):]
    end = message.find(closer) if closer else -1
    return (message if end < 0 else message[:end]).strip()


def answer_budget(tokenizer, answer: str, check: GenerationCheck) -> int:
    """``max_new_tokens`` for a query whose expected answer is ``answer``."""
    return len(tokenizer(" " + answer, add_special_tokens=False).input_ids) + check.extra_tokens


def stop_token_ids(tokenizer) -> list[int]:
    """Generation ends at any of the tokenizer's special tokens (EOS, end of turn, document
    separator): decoding drops them, so text after one would be glued to the answer."""
    return sorted(set(tokenizer.all_special_ids))


def answer_line_done(text: str) -> bool:
    """Whether ``text`` already holds a complete line with a letter or digit: :func:`cut_answer`
    of ``text`` and of any continuation of it is then the same."""
    *complete, _ = text.split("\n")
    return any(any(ch.isalnum() for ch in line) for line in complete)


class AnswerLineEnd(StoppingCriteria):
    """A ``generate()`` stopping criterion: a sequence is done once its continuation holds a
    complete answer line (:func:`answer_line_done`). Tokens after it would only be cut off, so
    stopping there changes no answer and saves the rest of the budget. One per ``generate()``
    call: the first call marks where the continuation starts."""

    def __init__(self, tokenizer):
        self.tokenizer, self.start = tokenizer, None

    def __call__(self, input_ids, scores, **kwargs):
        if self.start is None:  # called once a token was added to the prompt
            self.start = input_ids.shape[1] - 1
        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor([answer_line_done(t) for t in texts], dtype=torch.bool, device=input_ids.device)


def _queries(records: Sequence[EditRecord]) -> list[tuple[int, str, int, str, str]]:
    """``(record, kind, slot, question, expected answer)`` for every generated query: the
    evaluation's queries without the OOD rephrasings, which the generation check does not score."""
    return [q for q in record_queries(records) if q[1] != "ood"]


def _generate_all(generate_fn: GenerateFn, prompts: list[str], budgets: list[int], batch_size: int,
                  progress: bool, desc: str) -> list[str]:
    """Generate every prompt with its own budget: batches of one budget, similar lengths."""
    order = sorted(range(len(prompts)), key=lambda i: (budgets[i], len(prompts[i])))
    batches, start = [], 0
    while start < len(order):
        end = start + 1
        while end < len(order) and end - start < batch_size and budgets[order[end]] == budgets[order[start]]:
            end += 1
        batches.append(order[start:end])
        start = end
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=desc, unit="batch", leave=False)
    texts: list[str] = [""] * len(prompts)
    for idx in batches:
        out = generate_fn([prompts[i] for i in idx], budgets[idx[0]])
        if len(out) != len(idx):
            raise ValueError(f"generate_fn returned {len(out)} texts for {len(idx)} prompts")
        for i, text in zip(idx, out):
            texts[i] = text
    return texts


def evaluate_generation(generate_fn: GenerateFn, tokenizer, records: Sequence[EditRecord],
                        reference: Sequence[dict] | None = None, check: GenerationCheck = GenerationCheck(),
                        batch_size: int = 16, progress: bool = False) -> list[dict]:
    """Generate and score the answers of ``records``; one ``"gen"`` entry per record.

    ``reference``: the unedited model's entries for the same records (a pre-edit run's); without
    it locality is scored against this run's own answers, 1.0 by definition (the pre-edit case).
    An entry is ``{"plain": {...}, "chat": {...}}`` (``"chat"`` only with a chat template), each
    ``{"rewrite_em": [..], "rephrase_em": [..], "locality_unchanged": [..], "texts": {kind: [..]},
    "answers": {kind: [..]}}``: ``texts`` as generated (special tokens dropped), ``answers`` as cut.
    """
    if reference is not None and len(reference) != len(records):
        raise ValueError(f"the generation reference has {len(reference)} entries for {len(records)} records")
    queries = _queries(records)
    budgets = [answer_budget(tokenizer, answer, check) for *_, answer in queries]
    templates = {"plain": lambda q: q}
    if has_chat_template(tokenizer):
        templates["chat"] = lambda q: chat_prompt(tokenizer, q)
    entries: list[dict] = [{} for _ in records]
    for name, template in templates.items():
        texts = _generate_all(generate_fn, [template(q) for _, _, _, q, _ in queries], budgets, batch_size,
                              progress, f"generate ({name})")
        columns = [{**{key: [] for key in SCORE_KEYS.values()}, "texts": {k: [] for k in KINDS},
                    "answers": {k: [] for k in KINDS}} for _ in records]
        for (r, kind, slot, _, expected), text in zip(queries, texts):
            answer = cut_answer(text)
            if kind == "locality":
                expected = answer if reference is None else _reference_answer(reference, r, name, slot)
            columns[r][SCORE_KEYS[kind]].append(exact_match_answer(answer, expected))
            columns[r]["texts"][kind].append(text)
            columns[r]["answers"][kind].append(answer)
        for entry, column in zip(entries, columns):
            entry[name] = column
    return entries


def _reference_answer(reference: Sequence[dict], record: int, template: str, slot: int) -> str:
    try:
        return reference[record][template]["answers"]["locality"][slot]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"the generation reference has no {template!r} locality answer {slot} for record "
                         f"{record} (was the pre-edit run made with other records or another tokenizer?)") from None


def generation_scores(entry: dict | None) -> dict[str, list[float]]:
    """The scored rows of one record's ``"gen"`` entry, by summary name (``rewrite_gen_em``,
    ``locality_gen_chat``, ...)."""
    scores: dict[str, list[float]] = {}
    for template, column in (entry or {}).items():
        suffix = "" if template == "plain" else f"_{template}"
        for kind, key in SCORE_KEYS.items():
            scores[MEAN_KEYS[kind] + suffix] = list(column[key])
    return scores


def generation_means(entries: Sequence[dict]) -> dict[str, float]:
    """Means over every scored row of ``"gen"`` entries, by summary name."""
    pools: dict[str, list[float]] = {}
    for entry in entries:
        for key, values in generation_scores(entry).items():
            pools.setdefault(key, []).extend(values)
    return {key: sum(values) / len(values) for key, values in pools.items() if values}


def generation_summary(tokenizer, check: GenerationCheck) -> dict:
    """What a run's summary says about its generated-answer evaluation."""
    return {**check.key(), "templates": ["plain", "chat"] if has_chat_template(tokenizer) else ["plain"],
            "chat": "evaluated" if has_chat_template(tokenizer) else NO_CHAT_TEMPLATE}


def module_generate_fn(module, edited: bool) -> GenerateFn:
    """A :data:`GenerateFn` through :meth:`~repair_pl.module.RepairModule.generate`, ending at the
    first special token (:func:`stop_token_ids`) or at the end of the answer's line (:class:`AnswerLineEnd`)."""
    stops = stop_token_ids(module.tokenizer)
    return lambda prompts, max_new_tokens: module.generate(
        prompts, max_new_tokens=max_new_tokens, edited=edited, eos_token_id=stops,
        stopping_criteria=StoppingCriteriaList([AnswerLineEnd(module.tokenizer)]))
