"""Tests for repair_pl.evaluate with the character tokenizer and the tiny random Llama."""

from __future__ import annotations

import string
from types import SimpleNamespace

import pytest
import torch

from repair_pl.data import EditDataError, EditRecord
from repair_pl.evaluate import encode_pairs, evaluate_records, model_logits_fn, predict_answers
from repair_pl.testing import tiny_llama


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tiny model gains nothing from threads; on a busy 2-core box OpenMP spinning makes
    2 threads ~100x slower than 1. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text).input_ids


# ---------------------------------------------------------------------------------------------
# encode_pairs
# ---------------------------------------------------------------------------------------------


def test_char_tokenizer_is_one_token_per_character(tokenizer):
    assert len(ids_of(tokenizer, "abcd yz")) == 7
    assert ids_of(tokenizer, "ab x") == ids_of(tokenizer, "ab") + ids_of(tokenizer, " x")


def test_encode_pairs_right_padding_and_masks(tokenizer):
    enc = encode_pairs(tokenizer, ["ab", "abcd"], ["x", "yz"])
    seq0, seq1 = ids_of(tokenizer, "ab x"), ids_of(tokenizer, "abcd yz")
    n0, n1 = len(ids_of(tokenizer, "ab")), len(ids_of(tokenizer, "abcd"))
    width = max(len(seq0), len(seq1))
    assert (len(seq0), len(seq1), n0, n1, width) == (4, 7, 2, 4, 7)
    pad = tokenizer.pad_token_id
    assert pad == 0
    assert enc.input_ids.tolist() == [seq0 + [pad] * (width - len(seq0)), seq1]
    assert enc.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0, 0], [1] * 7]
    assert enc.prompt_mask.tolist() == [[True, True] + [False] * 5, [True] * 4 + [False] * 3]
    # the answer part is " " + answer (EasyEdit feeds prompt + " " + target)
    assert enc.answer_mask.tolist() == [[False, False, True, True, False, False, False],
                                        [False] * 4 + [True] * 3]
    assert enc.input_ids[0][enc.answer_mask[0]].tolist() == ids_of(tokenizer, " x")
    assert enc.input_ids[1][enc.answer_mask[1]].tolist() == ids_of(tokenizer, " yz")
    assert enc.input_ids[0][enc.prompt_mask[0]].tolist() == ids_of(tokenizer, "ab")
    assert not (enc.prompt_mask & enc.answer_mask).any()
    assert enc.input_ids.dtype == torch.long and enc.prompt_mask.dtype == torch.bool


def test_encode_pairs_max_length_cuts_prompt_from_the_left(tokenizer):
    enc = encode_pairs(tokenizer, ["abcdefgh", "ab"], ["xy", "z"], max_length=6)
    # row 0: "abcdefgh xy" is 11 tokens; the 5 leftmost prompt tokens go
    assert enc.input_ids.shape == (2, 6)
    assert enc.input_ids[0].tolist() == ids_of(tokenizer, "fgh xy")
    assert enc.prompt_mask[0].tolist() == [True] * 3 + [False] * 3
    assert enc.answer_mask[0].tolist() == [False] * 3 + [True] * 3
    # row 1: "ab z" fits and is untouched
    assert enc.input_ids[1].tolist() == ids_of(tokenizer, "ab z") + [0, 0]
    assert enc.prompt_mask[1].tolist() == [True, True, False, False, False, False]
    assert enc.answer_mask[1].tolist() == [False, False, True, True, False, False]


def test_encode_pairs_max_length_keeps_one_prompt_token(tokenizer):
    # " xy" is 3 tokens; max_length=4 leaves exactly the last prompt token
    enc = encode_pairs(tokenizer, ["abcdefgh"], ["xy"], max_length=4)
    assert enc.input_ids[0].tolist() == ids_of(tokenizer, "h xy")
    assert enc.prompt_mask[0].tolist() == [True, False, False, False]
    with pytest.raises(EditDataError, match="max_length=3"):
        encode_pairs(tokenizer, ["abcdefgh"], ["xy"], max_length=3)


def test_encode_pairs_answer_longer_than_max_length(tokenizer):
    with pytest.raises(EditDataError, match=r"'abcdefghij'.*max_length=5"):
        encode_pairs(tokenizer, ["q"], ["abcdefghij"], max_length=5)


def test_encode_pairs_no_max_length_never_cuts(tokenizer):
    prompt = "p" * 300
    enc = encode_pairs(tokenizer, [prompt], ["a"])
    assert enc.input_ids.shape == (1, 302)


class WordTokenizer:
    """Whitespace-splitting tokenizer: the separator space becomes no token at all."""

    pad_token_id = 0
    eos_token_id = 1

    def __call__(self, texts):
        return SimpleNamespace(input_ids=[[2 + len(w) for w in text.split()] for text in texts])


def test_encode_pairs_answer_that_tokenises_to_nothing():
    with pytest.raises(EditDataError, match=r"answer '' tokenises to nothing after prompt 'hello world'"):
        encode_pairs(WordTokenizer(), ["a b", "hello world"], ["c", ""])
    enc = encode_pairs(WordTokenizer(), ["a b"], ["cc"])
    assert enc.answer_mask.tolist() == [[False, False, True]]


# ---------------------------------------------------------------------------------------------
# predict_answers / evaluate_records with hand-made logits functions
# ---------------------------------------------------------------------------------------------

VOCAB = 128


def oracle(wrong_at_prompt_end: bool = False):
    """Logits that predict the true next token everywhere (optionally a wrong token right
    after the prompt, i.e. for the first answer token)."""

    def logits_fn(input_ids, attention_mask, prompt_mask):
        logits = torch.zeros(*input_ids.shape, VOCAB)
        nxt = torch.roll(input_ids, -1, dims=1)
        logits.scatter_(-1, nxt.unsqueeze(-1), 1.0)
        if wrong_at_prompt_end:
            last = prompt_mask.long().sum(1) - 1
            rows = torch.arange(input_ids.shape[0])
            logits[rows, last] = 0.0
            logits[rows, last, VOCAB - 1] = 1.0
        return logits

    return logits_fn


def test_predict_answers_alignment(tokenizer):
    enc = encode_pairs(tokenizer, ["ab", "abcd"], ["x", "yz"])
    preds, target, mask = predict_answers(oracle(), enc)
    assert preds.shape == target.shape == mask.shape == (2, 6)
    assert target.tolist() == enc.input_ids[:, 1:].tolist()
    assert mask.tolist() == enc.answer_mask[:, 1:].tolist()
    assert (preds[mask] == target[mask]).all()


def make_records(n: int = 10) -> list[EditRecord]:
    return [EditRecord(prompt=f"Question {i}: what is {'x' * i}?", target="ans" + "y" * (i % 4),
                       rephrases=tuple(f"Rephrase {j} of {i}?" for j in range(1 + i % 3)),
                       locality=tuple((f"nq {i}.{j} unrelated" + "z" * i, f"loc answer {i}{j}")
                                      for j in range(i % 2 + 1)),
                       ood_rephrases=(f"ood {i}",) if i % 2 else (), case_id=i)
            for i in range(n)]


def answer_tokens(tokenizer, records) -> list[list[list[int]]]:
    """Each record's locality answers as tokens: the locality reference of a model that predicts
    every answer exactly."""
    return [[ids_of(tokenizer, " " + answer) for _, answer in record.locality] for record in records]


def test_evaluate_oracle_scores_one_everywhere(tokenizer):
    records = make_records(6)
    reference = answer_tokens(tokenizer, records)
    ev = evaluate_records(oracle(), tokenizer, records, reference=reference, batch_size=3)
    for case in ev.cases:
        assert case["rewrite_acc"] == [1.0] and case["rewrite_em"] == [1.0]
        assert all(v == 1.0 for v in case["rephrase_acc"] + case["ood_acc"])
    assert ev.means["rewrite_acc"] == ev.means["rephrase_acc"] == ev.means["locality"] == 1.0
    # the same predictions against a reference whose first answer token differs: one token lost per answer
    changed = [[[VOCAB - 1] + ids[1:] for ids in answers] for answers in reference]
    off = evaluate_records(oracle(), tokenizer, records, reference=changed, batch_size=3)
    assert [case["locality"]["neighborhood_acc"] for case in off.cases] == \
        [[pytest.approx(1 - 1 / len(ids)) for ids in answers] for answers in reference]
    assert off.means["rewrite_acc"] == 1.0


def test_evaluate_first_answer_token_wrong_by_hand(tokenizer):
    # " xyz" is 4 answer tokens; the first is predicted wrongly -> 3/4, and no exact match
    records = [EditRecord(prompt="abc", target="xyz", rephrases=("pq",)),
               EditRecord(prompt="abcdefg", target="k")]
    ev = evaluate_records(oracle(wrong_at_prompt_end=True), tokenizer, records, batch_size=2)
    assert ev.cases[0]["rewrite_acc"] == [0.75]
    assert ev.cases[0]["rephrase_acc"] == [0.75]
    assert ev.cases[0]["rewrite_em"] == [0.0]
    assert ev.cases[1]["rewrite_acc"] == [0.5]  # " k": 2 tokens, the first wrong
    assert ev.means["rewrite_acc"] == pytest.approx((0.75 + 0.5) / 2)
    assert ev.means["rewrite_em"] == 0.0


# ---------------------------------------------------------------------------------------------
# evaluate_records on the tiny model
# ---------------------------------------------------------------------------------------------


def greedy_target(model, tokenizer, prompt: str, k: int = 6) -> str:
    """A target made of the model's greedy letters/digits after ``prompt + " "`` (so that some
    answer positions are predicted right and scores are not all zero)."""
    allowed = torch.tensor([tokenizer.convert_tokens_to_ids(c) for c in string.ascii_letters + string.digits])
    ids = ids_of(tokenizer, prompt + " ")
    out = ""
    for _ in range(k):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        nxt = int(allowed[logits[allowed].argmax()])
        ids.append(nxt)
        out += tokenizer.convert_ids_to_tokens(nxt)
    return out


def hand_predictions(model, tokenizer, prompt: str, answer: str) -> torch.Tensor:
    """The model's greedy token at each answer position of ``prompt + " " + answer``, one
    unpadded sequence at a time."""
    ids = ids_of(tokenizer, prompt + " " + answer)
    n = len(ids_of(tokenizer, prompt))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return logits.argmax(-1)[n - 1: len(ids) - 1]  # position t predicts token t+1


def hand_accuracy(model, tokenizer, prompt: str, answer: str) -> float:
    ids = ids_of(tokenizer, prompt + " " + answer)
    preds = hand_predictions(model, tokenizer, prompt, answer)
    return (preds == torch.tensor(ids[-len(preds):])).float().mean().item()


def test_locality_reference_is_the_models_greedy_answer(tokenizer, tiny_model):
    """What a pre-edit evaluation hands on as the locality reference: the unedited model's own
    greedy token at every answer position, as a plain forward pass gives it."""
    records = make_records(10)
    ev = evaluate_records(model_logits_fn(tiny_model), tokenizer, records, batch_size=4)
    for preds, record in zip(ev.locality_preds, records):
        assert len(preds) == len(record.locality)
        for pred, (prompt, answer) in zip(preds, record.locality):
            assert pred == hand_predictions(tiny_model, tokenizer, prompt, answer).tolist()


def test_batched_equals_per_record(tokenizer, tiny_model):
    records = make_records(10)
    records[3] = EditRecord(prompt=records[3].prompt, target=greedy_target(tiny_model, tokenizer, records[3].prompt),
                            rephrases=records[3].rephrases, locality=records[3].locality, case_id=3)
    fn = model_logits_fn(tiny_model)
    one = evaluate_records(fn, tokenizer, records, batch_size=1)
    four = evaluate_records(fn, tokenizer, records, batch_size=4)
    everything = evaluate_records(fn, tokenizer, records, batch_size=64)
    # perplexity is a float reduction over the vocabulary: equal up to rounding, not bit for bit
    ppl = [[c.pop("rewrite_ppl")[0] for c in ev.cases] for ev in (one, four, everything)]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-4) and ppl[0] == pytest.approx(ppl[2], rel=1e-4)
    assert one.means.pop("rewrite_ppl") == pytest.approx(four.means.pop("rewrite_ppl"), rel=1e-4)
    assert one.cases == four.cases == everything.cases
    assert one.locality_preds == four.locality_preds == everything.locality_preds
    assert one.means == four.means == {k: v for k, v in everything.means.items() if k != "rewrite_ppl"}
    assert one.cases[3]["rewrite_acc"][0] > 0  # a non-trivial score took part in the comparison


def test_rewrite_accuracy_by_hand(tokenizer, tiny_model):
    prompt = "Who wrote the novel?"
    target = greedy_target(tiny_model, tokenizer, prompt)
    records = [EditRecord(prompt=prompt, target=target, rephrases=("Novel author?",)),
               EditRecord(prompt="Capital of France?", target="Paris", rephrases=("France's capital city?",))]
    ev = evaluate_records(model_logits_fn(tiny_model), tokenizer, records, batch_size=2)
    for case, record in zip(ev.cases, records):
        assert case["rewrite_acc"][0] == pytest.approx(hand_accuracy(tiny_model, tokenizer, record.prompt,
                                                                     record.target), abs=1e-7)
        assert case["rephrase_acc"][0] == pytest.approx(hand_accuracy(tiny_model, tokenizer, record.rephrases[0],
                                                                      record.target), abs=1e-7)
    assert ev.cases[0]["rewrite_acc"][0] > 0  # the comparison involves a non-trivial score


def test_locality_against_a_different_reference_model(tokenizer, tiny_model):
    records = make_records(8)
    other = evaluate_records(model_logits_fn(tiny_llama(seed=1)), tokenizer, records, batch_size=4)
    own = evaluate_records(model_logits_fn(tiny_model), tokenizer, records, batch_size=4)
    ev = evaluate_records(model_logits_fn(tiny_model), tokenizer, records, reference=other.locality_preds,
                          batch_size=4)
    assert ev.means["locality"] < 1.0
    # each score is the share of answer positions whose argmax equals the reference's
    for r, case in enumerate(ev.cases):
        for j, score in enumerate(case["locality"]["neighborhood_acc"]):
            a, b = own.locality_preds[r][j], other.locality_preds[r][j]
            assert len(a) == len(b) == len(ids_of(tokenizer, " " + records[r].locality[j][1]))
            assert score == pytest.approx(sum(x == y for x, y in zip(a, b)) / len(a), abs=1e-7)
    # rewrite/rephrase do not depend on the reference
    assert [c["rewrite_acc"] for c in ev.cases] == [c["rewrite_acc"] for c in own.cases]
    # the model's own predictions as reference give exactly 1.0
    same = evaluate_records(model_logits_fn(tiny_model), tokenizer, records, reference=own.locality_preds)
    assert same.means["locality"] == 1.0


def test_reference_that_does_not_match_the_records(tokenizer, tiny_model):
    records = make_records(2)
    ev = evaluate_records(model_logits_fn(tiny_model), tokenizer, records)
    bad = [[preds[:-1] for preds in record] for record in ev.locality_preds]
    with pytest.raises(ValueError, match="does not match"):
        evaluate_records(model_logits_fn(tiny_model), tokenizer, records, reference=bad)


def test_results_have_easyedit_shape(tokenizer, tiny_model):
    records = make_records(5)
    ev = evaluate_records(model_logits_fn(tiny_model), tokenizer, records, batch_size=4)
    assert len(ev.cases) == len(ev.locality_preds) == 5
    for case, record, preds in zip(ev.cases, records, ev.locality_preds):
        assert set(case) == {"rewrite_acc", "rephrase_acc", "locality", "ood_acc", "rewrite_em", "rewrite_ppl"}
        assert set(case["locality"]) == {"neighborhood_acc"}
        assert len(case["rewrite_acc"]) == len(case["rewrite_em"]) == len(case["rewrite_ppl"]) == 1
        assert len(case["rephrase_acc"]) == len(record.rephrases)
        assert len(case["locality"]["neighborhood_acc"]) == len(record.locality) == len(preds)
        assert len(case["ood_acc"]) == len(record.ood_rephrases)
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0
                   for v in case["rewrite_acc"] + case["rephrase_acc"] + case["ood_acc"])
    assert set(ev.means) == {"rewrite_acc", "rephrase_acc", "locality", "ood_acc", "rewrite_em", "rewrite_ppl"}
    # means pool all prompts of a kind (EasyEdit/WISE average over prompts)
    rephrase = [v for c in ev.cases for v in c["rephrase_acc"]]
    assert ev.means["rephrase_acc"] == pytest.approx(sum(rephrase) / len(rephrase), abs=1e-6)
    rewrite = [c["rewrite_acc"][0] for c in ev.cases]
    assert ev.means["rewrite_acc"] == pytest.approx(sum(rewrite) / len(rewrite), abs=1e-6)


def test_means_leave_out_kinds_without_prompts(tokenizer, tiny_model):
    ev = evaluate_records(model_logits_fn(tiny_model), tokenizer, [EditRecord(prompt="q?", target="a")])
    assert set(ev.means) == {"rewrite_acc", "rewrite_em", "rewrite_ppl"}
    assert ev.cases[0]["rephrase_acc"] == [] and ev.cases[0]["locality"]["neighborhood_acc"] == []
