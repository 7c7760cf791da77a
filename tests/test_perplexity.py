"""Target perplexity (WISE's Hallucination metric) and its place in the evaluator."""

import math

import pytest
import torch

from repair_pl.data.records import EditRecord
from repair_pl.evaluate import encode_pairs, evaluate_records, model_logits_fn
from repair_pl.metrics import TargetPerplexity, target_perplexity


def test_uniform_logits_give_the_vocabulary_size():
    logits = torch.zeros(2, 3, 7)
    target = torch.tensor([[1, 2, 3], [4, 5, 6]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    ppl = target_perplexity(logits, target, mask)
    assert ppl[0].item() == pytest.approx(7.0)
    assert math.isnan(ppl[1].item())  # nothing to score


def test_masked_positions_only_and_by_hand():
    logits = torch.randn(1, 4, 5, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([[0, 3, 1, 4]])
    mask = torch.tensor([[False, True, True, False]])
    logp = logits.log_softmax(-1)[0]
    expected = math.exp(-(logp[1, 3] + logp[2, 1]).item() / 2)
    assert target_perplexity(logits, target, mask).item() == pytest.approx(expected, rel=1e-5)
    # a confident correct prediction has perplexity near 1
    sure = torch.full((1, 1, 5), -30.0)
    sure[0, 0, 2] = 30.0
    assert target_perplexity(sure, torch.tensor([[2]]), torch.tensor([[True]])).item() == pytest.approx(1.0)


def test_metric_is_the_mean_over_rows_and_lower_is_better():
    metric = TargetPerplexity()
    assert metric.higher_is_better is False
    metric.update(torch.zeros(1, 2, 4), torch.tensor([[0, 1]]), torch.tensor([[True, True]]))  # ppl 4
    metric.update(torch.zeros(2, 1, 8), torch.tensor([[0], [1]]), torch.tensor([[True], [False]]))  # 8, skipped
    assert metric.compute().item() == pytest.approx(6.0)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="vocabulary"):
        target_perplexity(torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool))


def test_evaluator_reports_the_target_perplexity_of_each_edit_prompt(tokenizer, tiny_model):
    records = [EditRecord(prompt="Who wrote it?", target="Ann Lee", case_id=0),
               EditRecord(prompt="Capital of X is", target="Yz", rephrases=("X's capital?",), case_id=1)]
    ev = evaluate_records(model_logits_fn(tiny_model), tokenizer, records, batch_size=4)
    by_hand = []
    for record in records:  # one unpadded forward per prompt, NLL of the answer tokens only
        enc = encode_pairs(tokenizer, [record.prompt], [record.target])
        with torch.no_grad():
            logp = tiny_model(input_ids=enc.input_ids).logits[0, :-1].log_softmax(-1)
        answer = enc.answer_mask[0, 1:]
        nll = -logp[answer].gather(-1, enc.input_ids[0, 1:][answer][:, None]).mean()
        by_hand.append(math.exp(nll.item()))
    assert [c["rewrite_ppl"][0] for c in ev.cases] == pytest.approx(by_hand, rel=1e-4)
    assert ev.means["rewrite_ppl"] == pytest.approx(sum(by_hand) / 2, rel=1e-4)
