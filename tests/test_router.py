"""Retrieval routing (PromptRouter) and answer ends (end_answer) of the side memory, on the tiny model."""

import pytest
import torch

from repair_pl.data import EditRecord
from repair_pl.memory import PromptRouter
from repair_pl.testing import CHAT_TEMPLATE, tiny_editor

A = EditRecord("capital of france?", "xyz", rephrases=("france capital city?",), routing_prompt="unrelated text here")
B = EditRecord("ceo of microsoft?", "qwe", routing_prompt="some other thing")
TINY = dict(n_prefixes=2, layer=2, lr=10.0, max_steps=30, alpha=1.0, beta=5.0, gamma=3.0, mask_ratio=0.5,
            norm_constraint=None)

pytestmark = pytest.mark.usefixtures("one_thread")


def bound_router(threshold: float = 0.3) -> PromptRouter:
    router = PromptRouter(threshold, encoder="hash")
    router.bind()
    return router


def test_router_picks_the_memory_of_the_most_similar_prompt_above_its_threshold():
    router = bound_router(0.3)
    router.add("capital of france?", 0)
    router.add("ceo of microsoft?", 1)
    choice, similarity = router.route(["what is the capital of france?", "ceo of microsoft", "who is bob"])
    assert choice.tolist() == [0, 1, -1] and len(router) == 2
    router.add("capital of france?", 5)  # edited again into another memory: the newest wins, one key
    assert router.route(["what is the capital of france?"])[0].tolist() == [5] and len(router) == 2
    assert similarity[2] < 0.3 <= float(similarity[0])
    strict = bound_router(0.99)
    strict.add("capital of france?", 0)
    assert strict.route(["what is the capital of france?"])[0].tolist() == [-1]


def routing_module(**options):
    return tiny_editor("repair", **{**TINY, "router": PromptRouter(0.5, encoder="hash"), "score_tokens": "mean",
                                    "undo_unreached": False, "error_feedback": False, **options})


def side_output_used(module, prompt: str) -> int:
    ids = module.tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        module(ids.input_ids, ids.attention_mask)
    return int(module.memory.last_choice[0])


def test_edited_prompts_and_their_rephrasings_route_by_text_and_unrelated_ones_do_not():
    module = routing_module()
    assert side_output_used(module, A.prompt) == -1  # no keys yet
    list(module.edit_stream([A, B], progress=False))
    keys = [module.prompt_texts(module.tokenizer([r.prompt], return_tensors="pt").input_ids)[0] for r in (A, B)]
    assert module.memory.router.prompts == keys  # keyed as queries are decoded
    assert side_output_used(module, A.prompt) == 0 and side_output_used(module, "france capital city?") == 0
    assert side_output_used(module, "who is bob") == -1
    unedited = module.generate(["who is bob"], max_new_tokens=3, edited=False)
    assert module.generate(["who is bob"], max_new_tokens=3) == unedited


def test_each_batch_kept_apart_is_reached_by_its_own_prompts():
    module = routing_module(retrieve=True, edit_batch_size=1)
    list(module.edit_stream([A, B], progress=False))
    memory = module.memory
    assert len(memory.memories) == 2 and memory.router.memory_of == [0, 1]
    ids = module.tokenizer([B.prompt], return_tensors="pt").input_ids
    assert side_output_used(module, B.prompt) == 1
    # B's logits are the model's with memory 1 (not memory 0, not the frozen layer) at the edited layer
    layer = module.model.model.layers[module.layer].mlp
    with torch.no_grad():
        routed = module(ids)
        layer.down_proj = torch.nn.Linear(memory.side.shape[1], memory.side.shape[0], bias=False)
        layer.down_proj.weight.copy_(memory.memories[1])
        expected = module.model(input_ids=ids).logits
    layer.down_proj = memory
    torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(memory.memories[0], memory.memories[1])


def test_router_keys_are_saved_restored_and_reset(tmp_path):
    module = routing_module()
    list(module.edit_stream([A], progress=False))
    module.save_edits(tmp_path / "edits")
    fresh = routing_module()
    fresh.load_edits(tmp_path / "edits")
    assert fresh.memory.router.prompts == module.memory.router.prompts and len(fresh.memory.router) == 1
    assert torch.equal(fresh.memory.router.keys, module.memory.router.keys)
    assert side_output_used(fresh, A.prompt) == 0
    snapshot = module.snapshot_edits()
    list(module.edit_stream([B], progress=False))
    assert len(module.memory.router) == 2
    module.restore_edits(*snapshot)  # an undone error-feedback round takes its keys back too
    assert module.memory.router.prompts == fresh.memory.router.prompts
    module.reset_edits()
    assert len(module.memory.router) == 0 and side_output_used(module, A.prompt) == -1


def test_end_answer_trains_the_end_of_sequence_token_after_the_target():
    plain, ended = tiny_editor("wise", **TINY), tiny_editor("wise", **TINY, end_answer=True)
    eos = ended.tokenizer.eos_token_id
    a, b = plain.prepare_edit(A), ended.prepare_edit(A)
    n = len(a["labels"]) // (TINY["n_prefixes"] + 1)  # answer tokens per edit row
    assert len(b["labels"]) == len(a["labels"]) + TINY["n_prefixes"] + 1  # one more per edit row
    assert int(b["labels"][n]) == eos and eos not in a["labels"].tolist()
    assert int(b["n_first"]) == int(a["n_first"]) + 1


def test_chat_turn_trains_the_edit_as_a_chat_reply_too():
    from repair_pl.evaluate import evaluate_records
    from repair_pl.generation import chat_prompt

    plain, chat = tiny_editor("wise", **TINY), tiny_editor("wise", **TINY, chat_turn=True)
    assert plain.prepare_edit(A)["input_ids"].shape == chat.prepare_edit(A)["input_ids"].shape  # no template
    for module in (plain, chat):
        module.tokenizer.chat_template = CHAT_TEMPLATE
    a, b = plain.prepare_edit(A), chat.prepare_edit(A)
    n_edit = int(a["is_edit"].sum())
    assert int(b["is_edit"].sum()) == n_edit + 1 and int(b["n_first"]) == int(a["n_first"])
    tok = chat.tokenizer
    asked = chat_prompt(tok, A.prompt)
    row = tok.decode(b["input_ids"][n_edit], skip_special_tokens=True)
    assert row.strip() == tok.decode(tok(asked + " " + A.target).input_ids, skip_special_tokens=True).strip()
    scores = {}
    for name, module in (("plain", plain), ("chat", chat)):
        torch.manual_seed(0)
        list(module.edit_stream([A], progress=False))
        evaluation = evaluate_records(module.logits_fn(edited=True), module.tokenizer,
                                      [EditRecord(asked, A.target, routing_prompt=A.routing_prompt)])
        scores[name] = evaluation.means["rewrite_acc"]
    assert scores["chat"] > scores["plain"]  # the chat question itself was trained


def test_chat_turn_also_replays_the_shards_other_edits_as_chat_replies():
    from repair_pl.generation import chat_prompt

    C = EditRecord("capital of germany?", "zzz", routing_prompt="a third thing")
    plain, chat = (tiny_editor("wise", **TINY, n_replay=2, chat_turn=on) for on in (False, True))
    for module in (plain, chat):
        module.tokenizer.chat_template = CHAT_TEMPLATE
        module.memory.plan_replay([A, B, C], module.tokenizer)
    a, b = plain.prepare_edit(A), chat.prepare_edit(A)
    tok = chat.tokenizer
    rows = [tok.decode(ids, skip_special_tokens=True).strip() for ids in b["input_ids"][b["is_edit"]]]
    replayed = rows[-4:]
    asked = [(B.prompt, B), (C.prompt, C), (chat_prompt(tok, B.prompt), B), (chat_prompt(tok, C.prompt), C)]
    expected = [tok.decode(tok(p + " " + r.target).input_ids, skip_special_tokens=True).strip() for p, r in asked]
    assert replayed == expected
    assert int(b["is_edit"].sum()) == int(a["is_edit"].sum()) + 3  # its own chat row and two replayed ones
    assert b["replay_weight"] == a["replay_weight"] == 2.0  # each replayed edit still weighs as much as the edit


def test_shards_kept_apart_become_memories_of_their_own_that_their_prompts_reach():
    C = EditRecord("capital of germany?", "zzz", routing_prompt="a third thing")
    module = routing_module(retrieve=True, cluster_size=1, shards_apart=True)
    list(module.edit_stream([A, B, C], progress=False))
    memory = module.memory
    assert len(memory.memories) == 3 and sorted(memory.router.memory_of) == [0, 1, 2]
    main = memory.main.weight.float()
    for k, record in enumerate(module.shard_plan):  # each memory holds one shard's change alone
        assert side_output_used(module, record[0].prompt) == memory.router.memory_of[k]
    changed = [(m != main).any().item() for m in memory.memories]
    assert changed == [True, True, True]
    with pytest.raises(ValueError, match="shards_apart .* needs model.memory.retrieve true"):
        routing_module(shards_apart=True)


def test_preset_options_keep_the_memorys_router():
    """Changing a memory option with ``preset`` rebuilds the memory with its router (a
    PromptRouter, not its serialised class_path form, which the memory cannot bind)."""
    from repair_pl.memory import SideMemory
    from repair_pl.presets import preset

    router = PromptRouter(threshold=0.6, encoder="hash:64")
    base = preset("repair")
    base["memory"] = SideMemory(router=router, retrieve=True, n_replay=3)
    kwargs = preset("repair", base=base, n_replay=5, n_prefixes=2)
    assert isinstance(kwargs["memory"].router, PromptRouter) and kwargs["memory"].router.threshold == 0.6
    assert (kwargs["memory"].n_replay, kwargs["memory"].n_prefixes, kwargs["memory"].retrieve) == (5, 2, True)


def test_a_question_asked_as_a_chat_turn_reaches_its_edit():
    from tokenizers import decoders

    module = routing_module()
    tokenizer = module.tokenizer
    tokenizer.backend_tokenizer.decoder = decoders.Fuse()  # decode characters without spaces between them
    tokenizer.chat_template = ("<|start|>system\nbe brief<|end|>\n{% for m in messages %}<|start|>{{ m['role'] }}\n"
                               "{{ m['content'] }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|start|>assistant\n"
                               "{% endif %}")
    list(module.edit_stream([A, B], progress=False))

    def chat(question: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)

    ids = tokenizer([chat(A.prompt)], return_tensors="pt").input_ids
    assert module.prompt_texts(ids) == [A.prompt]  # the user's message, not the template around it
    assert side_output_used(module, chat(A.prompt)) == 0 and side_output_used(module, chat(B.prompt)) == 0
    assert side_output_used(module, chat("who is bob")) == -1  # an unrelated question stays with the frozen layer
