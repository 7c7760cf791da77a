"""In-batch distillation: later edits of a homogeneous shard keep the shard's first edit intact."""

from __future__ import annotations

from repair_pl.components.base import EditStreamCallback


class InBatchDistillation(EditStreamCallback):
    """REPAIR's in-batch distillation, as we read it: inside one shard (a cluster of similar
    edits), the output of the shard's first edit right after it was made is the teacher; every
    later edit of that shard adds ``weight * T^2 * KL(teacher || current)`` on the first edit's
    answer positions to its loss, so that similar edits written into the same shard do not
    overwrite each other. Re-edits by error feedback train without it.

    Needs a shard plan (``DistributionAwareMemory`` before it in the callback list); without
    one the whole edit batch counts as one shard.
    """

    def __init__(self, weight: float = 0.2, temperature: float = 2.0):
        if weight < 0 or temperature <= 0:
            raise ValueError("InBatchDistillation.weight must be >= 0 and its temperature > 0")
        self.weight, self.temperature = weight, temperature

    def bind(self, module) -> None:
        self.counts = {"distilled_edits": 0}
        self._first: dict[int, int] = {}  # id(record) -> id(first record of its shard)
        self._teachers: dict[int, tuple] = {}  # id(first record) -> teacher inputs and logits
        self._batch: list = []  # edits outside edit_stream() have no batch: each is its own shard

    def on_edit_batch_start(self, module, records: list) -> list:
        self._teachers, self._first = {}, {}
        self._batch = records
        return records

    def _shard_first(self, module, record) -> int:
        if not self._first:
            for group in getattr(module, "shard_plan", None) or [self._batch]:
                for r in group:
                    self._first[id(r)] = id(group[0])
        return self._first.get(id(record), id(record))

    def on_edit_start(self, module, record) -> None:
        first = self._shard_first(module, record)
        teacher = self._teachers.get(first) if first != id(record) else None
        module.distill_teacher = None if teacher is None else (*teacher, self.weight, self.temperature)
        if teacher is not None:
            self.counts["distilled_edits"] += 1

    def on_edit_end(self, module, record, result) -> None:
        module.distill_teacher = None
        if result.retry or not result.success or self._shard_first(module, record) != id(record):
            return
        self._teachers[id(record)] = module.answer_logits(record)

    def on_edit_batch_end(self, module, records: list, results: list) -> None:
        self._teachers, self._first = {}, {}
