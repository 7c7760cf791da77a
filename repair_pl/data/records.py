"""The edit record every loader produces, and the error every loader raises."""

from __future__ import annotations

from dataclasses import dataclass, field


class EditDataError(ValueError):
    """Bad edit data. The message names the file, the record index and the field."""

    def __init__(self, message: str, path: str | None = None, index: int | None = None,
                 field: str | None = None):
        where = ", ".join(p for p in (path and f"file {path}", index is not None and f"record {index}",
                                      field and f"field {field!r}") if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.path, self.index, self.field = path, index, field


@dataclass(frozen=True)
class EditRecord:
    """One requested edit and the prompts it is evaluated on.

    Attributes:
        prompt: the edit prompt (``src`` in ZsRE); the model must answer it with ``target``.
        target: the new answer.
        subject: the entity the edit is about.
        rephrases: paraphrases of ``prompt`` (generalisation is measured on them).
        locality: ``(prompt, answer)`` pairs unrelated to the edit (locality is measured on them).
        routing_prompt: an unrelated text used as the out-of-scope example in the routing
            (margin) loss while editing; ``None`` means the datamodule picks one.
        ood_rephrases: out-of-distribution paraphrases (WISE Temporal's ``ood_rephrase``).
        statement: the edit as a sentence ("The capital of X is Y."), used by EREN's notebook.
        ground_truth: the old answer, when the dataset has it.
        case_id: index of the record in its source file.
        meta: format-specific extras (e.g. CounterFact-Hard's per-question answers).
    """

    prompt: str
    target: str
    subject: str = ""
    rephrases: tuple[str, ...] = ()
    locality: tuple[tuple[str, str], ...] = ()
    routing_prompt: str | None = None
    ood_rephrases: tuple[str, ...] = ()
    statement: str | None = None
    ground_truth: str | None = None
    case_id: int = 0
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        for name in ("prompt", "target"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise EditDataError(f"must be a non-empty string, got {value!r}", index=self.case_id, field=name)

    def requested_rewrite(self) -> dict:
        """The record in EasyEdit's ``requested_rewrite`` shape (for results JSON)."""
        return {
            "prompt": self.prompt,
            "target_new": self.target,
            "ground_truth": self.ground_truth,
            "subject": self.subject,
            "rephrase_prompt": self.rephrases[0] if self.rephrases else None,
            "locality": {"neighborhood": {"prompt": [p for p, _ in self.locality],
                                          "ground_truth": [a for _, a in self.locality]}},
        }
