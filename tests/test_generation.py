"""The generated-answer evaluation (repair_pl.generation): normalisation and exact match, the
answer cut, locality against the unedited model's answers, plain vs chat inputs, and how it
reaches results.json, summary.json, the pre-edit cache and the run's fingerprint."""

import json

import pytest
import torch

from repair_pl import EditRecord, RepairModule
from repair_pl.distributed import case_scores, run_lifelong_sharded
from repair_pl.generation import (NO_CHAT_TEMPLATE, GenerationCheck, answer_line_done, chat_prompt, cut_answer,
                                  evaluate_generation, exact_match_answer, generation_means, module_generate_fn,
                                  normalize_answer, stop_token_ids, user_message, user_turn_markers)
from repair_pl.lifelong import GEN_KEYS, pre_edit_evaluation, run_lifelong
from repair_pl.resume import run_fingerprint
from repair_pl.presets import preset
from repair_pl.testing import CHAT_TEMPLATE, char_tokenizer, chat_tokenizer, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

RECORDS = [EditRecord(f"capital of c{i}?", f"x{i}y", rephrases=(f"c{i} capital?",),
                      locality=((f"who is p{i}", "abc"),), routing_prompt=f"unrelated text {i}", case_id=i)
           for i in range(4)]
TINY = dict(n_prefixes=1, layer=2, lr=10.0, max_steps=4, alpha=1.0, beta=5.0, gamma=3.0, mask_ratio=0.5,
            norm_constraint=None, eval_batch_size=4, routing_weight=0.1)


class Scripted:
    """A generate function answering from a table (question text -> continuation) and
    recording what it was fed."""

    def __init__(self, answers: dict[str, str], default: str = "?"):
        self.answers, self.default, self.calls = answers, default, []

    def __call__(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        self.calls.append((list(prompts), max_new_tokens))
        return [self.answers.get(p, self.default) for p in prompts]


def test_normalisation_is_squad_style():
    assert normalize_answer("  The Tim   Cook! ") == "tim cook"
    assert normalize_answer("An apple, a day.") == "apple day"
    assert normalize_answer("“Paris” — France") == "paris france"  # Unicode quotes and dashes too
    assert normalize_answer("Theatre of Anne") == "theatre of anne"  # articles only as whole words
    assert normalize_answer("") == ""


def test_exact_match_after_normalisation():
    assert exact_match_answer("Tim Cook.", "tim cook") == 1.0
    assert exact_match_answer("the Beatles", "Beatles") == 1.0
    assert exact_match_answer("Tim Cook, Tim Cook", "Tim Cook") == 0.0  # a run-on answer is not the target
    assert exact_match_answer("Tim", "Tim Cook") == 0.0
    assert exact_match_answer("", "Tim Cook") == 0.0


def test_answer_is_the_first_line_with_a_letter_or_digit():
    assert cut_answer(" Tim Cook") == "Tim Cook"
    assert cut_answer("\n\nSatya Nadella\nQ: who else?") == "Satya Nadella"
    assert cut_answer(" Tim Cook, Tim Cook, Tim Cook") == "Tim Cook, Tim Cook, Tim Cook"
    assert cut_answer("Paris  \n") == "Paris"
    assert cut_answer("?\n\nThe answer is: Crema\nmore") == "The answer is: Crema"  # the question's "?" first
    assert cut_answer(" 1997.\nlater") == "1997."
    assert cut_answer(" \n ") == "" and cut_answer("") == "" and cut_answer("?\n!") == ""


def test_generation_ends_at_the_first_special_token():
    """The tiny model emits a special token mid-answer for some prompts: its own generate()
    goes on past it (decoding hides the token, gluing the text after it on); the evaluation's
    stops there."""
    module = RepairModule(tiny_llama(), char_tokenizer(), **preset("wise", **TINY))
    tokenizer = module.tokenizer
    assert stop_token_ids(tokenizer) == [0, 1, 2]  # <pad>, <eos>, <unk>
    found = None
    for i in range(40):
        prompt = f"who is p{i}"
        ids = tokenizer([prompt], return_tensors="pt").input_ids
        with torch.no_grad():
            out = module.model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
        specials = [k for k, t in enumerate(out.tolist()) if t in (0, 2)]
        if specials and specials[0] > 0:
            found = prompt, out, specials[0]
            break
    assert found is not None, "the fixture model no longer emits a special token mid-answer"
    prompt, out, first = found
    stopped = module_generate_fn(module, edited=False)([prompt], 20)[0]
    assert stopped == tokenizer.decode(out[:first])
    assert module.generate([prompt], max_new_tokens=20, edited=False)[0].startswith(stopped)
    assert len(module.generate([prompt], max_new_tokens=20, edited=False)[0]) > len(stopped)


def test_budget_is_the_answer_tokens_plus_the_extra():
    generate = Scripted({})
    evaluate_generation(generate, char_tokenizer(), RECORDS[:1], check=GenerationCheck(extra_tokens=5))
    # char tokens of " x0y" (target) and " abc" (locality answer): 4 each, plus 5
    assert sorted(n for _, n in generate.calls) == [9]
    with pytest.raises(ValueError, match="extra_tokens"):
        GenerationCheck(extra_tokens=-1)


def test_scores_and_texts_per_record():
    record = RECORDS[0]
    generate = Scripted({record.prompt: " X0Y.\nmore text", record.rephrases[0]: " x0y, x0y", "who is p0": " abc"})
    entry, = evaluate_generation(generate, char_tokenizer(), [record])
    plain = entry["plain"]
    assert plain["rewrite_em"] == [1.0] and plain["rephrase_em"] == [0.0] and plain["locality_unchanged"] == [1.0]
    assert plain["texts"] == {"rewrite": [" X0Y.\nmore text"], "rephrase": [" x0y, x0y"], "locality": [" abc"]}
    assert plain["answers"] == {"rewrite": ["X0Y."], "rephrase": ["x0y, x0y"], "locality": ["abc"]}
    assert generation_means([entry]) == {"rewrite_gen_em": 1.0, "rephrase_gen_em": 0.0, "locality_gen": 1.0}


def test_locality_is_scored_against_the_reference_answers():
    """The unedited run's answers are the reference: a changed locality answer scores 0, an
    unchanged one 1, and the expected (dataset) locality answer plays no part."""
    tokenizer = char_tokenizer()
    unedited = Scripted({"who is p0": " Bob", "who is p1": " Ann\nand more"})
    reference = evaluate_generation(unedited, tokenizer, RECORDS[:2])
    edited = Scripted({"who is p0": " x0y", "who is p1": "ANN!"})  # p0 changed; p1 the same after normalising
    entries = evaluate_generation(edited, tokenizer, RECORDS[:2], reference=reference)
    assert [e["plain"]["locality_unchanged"] for e in entries] == [[0.0], [1.0]]
    assert [r["plain"]["locality_unchanged"] for r in reference] == [[1.0], [1.0]]  # no reference: itself
    with pytest.raises(ValueError, match="reference has 1 entries for 2 records"):
        evaluate_generation(edited, tokenizer, RECORDS[:2], reference=reference[:1])


def test_locality_against_another_models_answers():
    """With real models: the answers of one tiny model scored against another's reference, row
    by row equal to comparing the two models' answers directly, and some rows differ."""
    tokenizer = char_tokenizer()
    records = [EditRecord("q", "t", locality=tuple((f"who is p{i}", "abc") for i in range(8)))]
    first = RepairModule(tiny_llama(seed=0), tokenizer, **preset("wise", **TINY))
    second = RepairModule(tiny_llama(seed=1), tokenizer, **preset("wise", **TINY))
    check = GenerationCheck(extra_tokens=3)
    reference = evaluate_generation(module_generate_fn(first, edited=False), tokenizer, records, check=check)
    scored = evaluate_generation(module_generate_fn(second, edited=False), tokenizer, records, reference=reference,
                                 check=check)
    ref_answers = reference[0]["plain"]["answers"]["locality"]
    answers = scored[0]["plain"]["answers"]["locality"]
    expected = [float(normalize_answer(a) == normalize_answer(b)) for a, b in zip(answers, ref_answers)]
    assert scored[0]["plain"]["locality_unchanged"] == expected
    assert 0.0 in expected


def test_chat_and_plain_columns_feed_different_prompts():
    tokenizer = chat_tokenizer()
    generate = Scripted({})
    entry, = evaluate_generation(generate, tokenizer, RECORDS[:1], check=GenerationCheck(extra_tokens=1))
    assert set(entry) == {"plain", "chat"}
    fed = [set(prompts) for prompts, _ in generate.calls]
    questions = {RECORDS[0].prompt, RECORDS[0].rephrases[0], "who is p0"}
    assert fed[0] == questions  # plain: the question as it is
    assert fed[1] == {chat_prompt(tokenizer, q) for q in questions}  # chat: one user turn of the template
    assert chat_prompt(tokenizer, "who is p0") == "<user>who is p0\n<assistant>"
    # without a chat template only the plain column is made
    entry, = evaluate_generation(Scripted({}), char_tokenizer(), RECORDS[:1])
    assert set(entry) == {"plain"}


def test_chat_answers_differ_from_plain_on_a_real_model():
    module = RepairModule(tiny_llama(), chat_tokenizer(), **preset("wise", **TINY))
    entry, = evaluate_generation(module_generate_fn(module, edited=False), module.tokenizer, RECORDS[:1],
                                 check=GenerationCheck(extra_tokens=6))
    assert entry["plain"]["texts"] != entry["chat"]["texts"]


def run(tmp_path, tokenizer, generation, name="run", T=2):
    torch.manual_seed(0)
    module = RepairModule(tiny_llama(), tokenizer, **preset("wise", **TINY))
    return run_lifelong(module, RECORDS, tmp_path / name, T=T, progress=False, generation=generation)


def test_run_writes_generation_keys(tmp_path, capsys):
    summary = run(tmp_path, chat_tokenizer(), GenerationCheck(extra_tokens=2))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    for case in results:
        for stage in ("pre", "post"):
            assert set(case[stage]["gen"]) == {"plain", "chat"}
            for column in case[stage]["gen"].values():
                assert set(column) == {"rewrite_em", "rephrase_em", "locality_unchanged", "texts", "answers"}
                assert len(column["rewrite_em"]) == 1 and len(column["texts"]["locality"]) == 1
            assert "rewrite_acc" in case[stage]  # the teacher-forced scores stay as they were
    for stage in ("pre", "post"):
        assert set(GEN_KEYS) <= set(summary[stage])
    assert summary["pre"]["locality_gen"] == 1.0 and summary["pre"]["locality_gen_chat"] == 1.0
    assert summary["generation"] == {"extra_tokens": 2, "templates": ["plain", "chat"], "chat": "evaluated"}
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["generation"] == summary["generation"]
    markdown = (tmp_path / "run" / "summary.md").read_text()
    assert "| post | chat |" in markdown and "rewrite_gen_em" in markdown
    printed = capsys.readouterr().out
    assert "pre-edit:" in printed and "post-edit:" in printed and printed.count("rewrite_gen_em_chat=") == 2


def test_post_edit_locality_reference_is_the_same_records_pre_edit_answers(tmp_path):
    """Chunks of T=2: each case's post-edit locality is scored against its own pre-edit answer
    (not another record's, e.g. the first chunk's)."""
    run(tmp_path, char_tokenizer(), GenerationCheck(extra_tokens=4))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    pre_answers = [c["pre"]["gen"]["plain"]["answers"]["locality"][0] for c in results]
    assert len({normalize_answer(a) for a in pre_answers}) > 1  # else a wrong slice would go unseen
    for case in results:
        post = case["post"]["gen"]["plain"]
        expected = float(normalize_answer(post["answers"]["locality"][0])
                         == normalize_answer(case["pre"]["gen"]["plain"]["answers"]["locality"][0]))
        assert post["locality_unchanged"] == [expected]


def test_without_chat_template_the_summary_says_so(tmp_path):
    summary = run(tmp_path, char_tokenizer(), GenerationCheck(extra_tokens=1), T=4)
    assert summary["generation"]["chat"] == NO_CHAT_TEMPLATE and "rewrite_gen_em_chat" not in summary["post"]
    assert "rewrite_gen_em" in summary["post"]
    assert NO_CHAT_TEMPLATE in (tmp_path / "run" / "summary.md").read_text()


def test_generation_off_keeps_the_old_shape(tmp_path):
    summary = run(tmp_path, chat_tokenizer(), None, T=4)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert "generation" not in summary and not set(GEN_KEYS) & set(summary["post"])
    assert all("gen" not in case["pre"] and "gen" not in case["post"] for case in results)
    assert "Generated answers" not in (tmp_path / "run" / "summary.md").read_text()


def test_sharded_run_in_one_process_has_the_generation_means(tmp_path):
    torch.manual_seed(0)
    module = RepairModule(tiny_llama(), char_tokenizer(), **preset("wise", **TINY))
    summary = run_lifelong_sharded(module, RECORDS, tmp_path, T=2, generation=GenerationCheck(extra_tokens=1))
    results = json.loads((tmp_path / "results.json").read_text())
    assert summary["post"]["rewrite_gen_em"] == pytest.approx(generation_means([c["post"]["gen"] for c in results])[
        "rewrite_gen_em"])
    assert "locality_gen" in case_scores([results[0]["post"]]) and "generation" in summary


def test_pre_edit_cache_is_keyed_by_the_generation_settings(tmp_path, monkeypatch):
    import repair_pl.lifelong as lifelong

    calls = []
    real = lifelong.evaluate_generation
    monkeypatch.setattr(lifelong, "evaluate_generation", lambda *a, **k: calls.append(k["check"]) or real(*a, **k))
    module = RepairModule("tiny-random", eval_batch_size=4)
    plain = pre_edit_evaluation(module, RECORDS[:2], tmp_path)
    short = pre_edit_evaluation(module, RECORDS[:2], tmp_path, generation=GenerationCheck(extra_tokens=1))
    again = pre_edit_evaluation(module, RECORDS[:2], tmp_path, generation=GenerationCheck(extra_tokens=1))
    longer = pre_edit_evaluation(module, RECORDS[:2], tmp_path, generation=GenerationCheck(extra_tokens=3))
    assert calls == [GenerationCheck(1), GenerationCheck(3)]  # the second extra_tokens=1 read back
    assert len(list(tmp_path.glob("pre_edit_*.json"))) == 3
    assert "gen" not in plain.cases[0] and again == short and "gen" in longer.cases[0]
    assert short.cases[0]["gen"] != longer.cases[0]["gen"]  # longer budgets, longer texts


def test_run_fingerprint_covers_generation():
    module = RepairModule(tiny_llama(), char_tokenizer(), **preset("wise", **TINY))
    off = run_fingerprint(module, RECORDS, 2)
    assert "generation" not in off  # checkpoints written before generation existed still resume
    assert run_fingerprint(module, RECORDS, 2, GenerationCheck(2)) != off
    assert run_fingerprint(module, RECORDS, 2, GenerationCheck(2)) != run_fingerprint(module, RECORDS, 2,
                                                                                        GenerationCheck(3))


def test_answer_line_done_agrees_with_cut_answer():
    assert answer_line_done(" Paris\n") and answer_line_done("?\n\nThe answer: Crema\nmo")
    assert not answer_line_done(" Paris") and not answer_line_done("?\n\n") and not answer_line_done("")
    for text in [" Paris\n", "?\n\nThe answer: Crema\n", " 1997.\n"]:
        assert answer_line_done(text) and cut_answer(text) == cut_answer(text + "more\nlines")


def test_generation_stops_once_the_answer_line_is_complete():
    """Stopping at the end of the answer's line leaves every cut answer as it was: each stopped
    text is a prefix of the full one, and for some prompts it is shorter."""
    model, tokenizer = tiny_llama(), char_tokenizer()
    newline, carriage_return = tokenizer.convert_tokens_to_ids(["\n", "\r"])
    with torch.no_grad():  # the random model writes "\r" often and "\n" never: make it "\n" instead
        model.lm_head.weight[newline] = model.lm_head.weight[carriage_return] * 1.01
    module = RepairModule(model, tokenizer, **preset("wise", **TINY))
    prompts = [f"who is p{i}" for i in range(40)]
    stopped = module_generate_fn(module, edited=False)(prompts, 30)
    stops = stop_token_ids(module.tokenizer)
    full = module.generate(prompts, max_new_tokens=30, edited=False, eos_token_id=stops)
    assert [cut_answer(t) for t in stopped] == [cut_answer(t) for t in full]
    assert all(f.startswith(s) for s, f in zip(stopped, full))
    shorter = [i for i, (s, f) in enumerate(zip(stopped, full)) if len(s) < len(f)]
    assert shorter and all(answer_line_done(stopped[i]) for i in shorter)


SYSTEM_TEMPLATE = ("{% if messages[0]['role'] != 'system' %}<|start|>system\nbe brief<|end|>\n{% endif %}"
                   "{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}")


def test_the_user_turn_is_found_in_a_chat_prompt_whatever_comes_before_it():
    tokenizer = chat_tokenizer()
    tokenizer.chat_template = SYSTEM_TEMPLATE  # a default system turn before the first user turn
    markers = user_turn_markers(tokenizer)
    assert markers == ("<|end|>\n<|start|>user\n", "<|end|>")  # not the system prompt: any user turn opens so
    assert user_message(chat_prompt(tokenizer, "capital of c1?\nsay it"), markers) == "capital of c1?\nsay it"
    later = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                           {"role": "user", "content": "ceo of c2?"}], tokenize=False,
                                          add_generation_prompt=True)
    assert user_message(later, markers) == "ceo of c2?"  # the last user turn
    assert user_message("capital of c1?", markers) is None  # a plain prompt has none
    assert user_message("capital of c1?", None) is None
    tokenizer.chat_template = CHAT_TEMPLATE  # no special tokens: the newline ends the turn
    assert user_message(chat_prompt(tokenizer, "ceo of c2?"), user_turn_markers(tokenizer)) == "ceo of c2?"


def test_no_markers_without_a_template_or_when_it_changes_the_message():
    assert user_turn_markers(char_tokenizer()) is None
    tokenizer = chat_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    assert user_turn_markers(tokenizer) is None
