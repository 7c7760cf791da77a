"""EREN readers: the OpenAI-compatible adapter against a stub server on loopback, and the
local HF reader (batched left-padded greedy generation) on a tiny model."""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch

from repair_pl.eren import ErenEditor, HashEncoder, HFReader, Notebook, OpenAIReader, ReaderError, generate_all


class Stub(BaseHTTPRequestHandler):
    requests: list = []
    reply: bytes = b""
    status: int = 200

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).requests.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.reply)

    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def stub():
    Stub.requests, Stub.status = [], 200
    Stub.reply = json.dumps({"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": " Lima \n"}, "finish_reason": "stop"}]}).encode()
    server = HTTPServer(("127.0.0.1", 0), Stub)  # port 0: a free port
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_reader_request_shape(stub):
    reader = OpenAIReader(stub + "/", "tiny-model", api_key="sk-test", max_tokens=7, system="Be brief.")
    assert reader("What is the capital of Peru?") == "Lima"
    (request,) = Stub.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer sk-test"
    assert request["headers"]["Content-Type"] == "application/json"
    assert request["body"] == {"model": "tiny-model", "max_tokens": 7, "temperature": 0.0, "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of Peru?"}]}


def test_openai_reader_in_the_editor(stub):
    editor = ErenEditor(OpenAIReader(stub, "m"), Notebook(HashEncoder(64)))
    editor.edit("The capital of Peru is Lima.")
    answer = editor.answer("What is the capital of Peru?")
    assert answer.text == "Lima" and answer.relevant
    assert "The capital of Peru is Lima." in Stub.requests[0]["body"]["messages"][-1]["content"]
    assert "Authorization" not in Stub.requests[0]["headers"]


def test_openai_reader_sends_and_applies_stop(stub):
    Stub.reply = json.dumps({"choices": [{"message": {"content": "Lima\nQuestion: next"}}]}).encode()
    assert OpenAIReader(stub, "m", stop=["\n"])("q") == "Lima"  # cut here too, if the server ignores it
    assert Stub.requests[-1]["body"]["stop"] == ["\n"]
    OpenAIReader(stub, "m")("q")
    assert "stop" not in Stub.requests[-1]["body"]


def test_openai_reader_errors(stub):
    Stub.status, Stub.reply = 500, b'{"error": "boom"}'
    with pytest.raises(ReaderError, match="HTTP 500.*boom"):
        OpenAIReader(stub, "m")("q")
    Stub.status, Stub.reply = 200, b'{"choices": []}'
    with pytest.raises(ReaderError, match="no chat completion"):
        OpenAIReader(stub, "m")("q")
    Stub.reply = b"not json"
    with pytest.raises(ReaderError, match="no chat completion"):
        OpenAIReader(stub, "m")("q")


def test_openai_reader_unreachable():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ReaderError, match="cannot reach"):
        OpenAIReader(f"http://127.0.0.1:{port}/v1", "m", timeout=2)("q")


def test_hf_reader_batched_equals_single(tiny_model, tokenizer):
    torch.set_num_threads(1)
    reader = HFReader(tiny_model, tokenizer, max_new_tokens=4, batch_size=2)
    assert reader.chat is False  # the char tokenizer has no chat template
    prompts = ["Q: a?", "Question: a much longer prompt?", "Q: b"]
    batched = generate_all(reader, prompts)
    assert batched == [reader(p) for p in prompts] and all(isinstance(t, str) for t in batched)
    assert tokenizer.padding_side == "right"  # restored after generation


def test_hf_reader_stops_at_a_stop_string(tiny_model, tokenizer, one_thread):
    from repair_pl.eren.reader import cut_at_stop

    prompts = ["Q: a?", "Question: a much longer prompt?"]
    full = HFReader(tiny_model, tokenizer, max_new_tokens=12, batch_size=2).generate_batch(prompts)
    stop = next(ch for ch in full[0][1:] if ch.strip())  # a character the first answer holds, not first
    stopped = HFReader(tiny_model, tokenizer, max_new_tokens=12, batch_size=2, stop=[stop]).generate_batch(prompts)
    assert stopped == [cut_at_stop(text, [stop]).strip() for text in full]
    assert stopped[0] == full[0][: full[0].index(stop)].strip() and stop not in stopped[0]
    assert cut_at_stop("Lima\nNote: x", ["\n", "Note"]) == "Lima" and cut_at_stop("Lima", ["\n"]) == "Lima"
    with pytest.raises(ValueError, match="list of non-empty strings"):
        HFReader(tiny_model, tokenizer, stop="\n")


def test_hf_reader_applies_chat_template(tiny_model, tokenizer):
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    reader = HFReader(tiny_model, tokenizer, max_new_tokens=2, system="sys")
    assert reader.chat and reader.format("hi") == "<system>sys<user>hi<assistant>"
    assert HFReader(tiny_model, tokenizer, chat=False).format("hi") == "hi"
    assert isinstance(reader("hi"), str)


@pytest.mark.integration
def test_smollm2_reader_end_to_end():
    from repair_pl.models import load_model

    torch.set_num_threads(1)
    model, tokenizer = load_model("smollm2")
    reader = HFReader(model, tokenizer, max_new_tokens=8)
    assert reader.chat and reader.format("hi").rstrip().endswith("assistant")
    editor = ErenEditor(reader, Notebook(HashEncoder(256)), k=1)
    editor.edit("The capital of Peru is Lima.")
    answer = editor.answer("What is the capital of Peru?")
    assert answer.notes[0].text == "The capital of Peru is Lima." and isinstance(answer.text, str) and answer.text


def config_model(name):
    import yaml

    return yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / name).read_text())["model"]


def test_cfh_prompts_ask_for_one_line_spans():
    from repair_pl.eren.run import build_editor

    model = config_model("eren_cfh.yaml")
    assert model["stop"] == ["\n"] and model["chat"] is False and model["max_new_tokens"] >= 16
    prompts = build_editor({**model, "encoder": "hash"}, reader=lambda p: "").prompts
    read = prompts.read.format(notes=prompts.note.format(text="N.", rank=1), question="Q?")
    assert read.endswith("\n\nNote: N.\nQuestion: Q?\nAnswer:")
    closed = prompts.closed_book.format(question="Q?")
    assert closed.endswith("\n\nQuestion: Q?\nAnswer:") and "Note:" not in closed
    # the few-shot examples: one-line answers, each a span of its note but not of its question
    examples = re.findall(r"Note: (.+)\nQuestion: (.+)\nAnswer: (.+)\n", read)
    assert len(examples) >= 1
    for note, question, answer in examples:
        assert answer in note and answer not in question


@pytest.mark.integration
def test_smollm2_reads_the_span_with_the_cfh_prompts():
    """The shipped prompts make the 135M reader answer a counterfactual note with its span, on
    one line, for the question and a paraphrase of it."""
    from repair_pl.data import EditRecord
    from repair_pl.eren.run import build_editor, build_reader

    torch.set_num_threads(1)
    model = {**config_model("eren_cfh.yaml"), "encoder": "hash", "min_score": None, "min_relation_score": None}
    editor = build_editor(model, reader=build_reader(model))
    editor.edit(EditRecord(prompt="What is the capital of Peru?", target="Bergen", subject="Peru",
                           statement="The capital of Peru is Bergen."))
    answers = editor.answer_batch(["What is the capital of Peru?", "Which city is the capital of Peru?"])
    assert [a.text for a in answers] == ["Bergen", "Bergen"] and all(a.relevant for a in answers)
    (closed,) = editor.closed_book(["What is the capital of France?"])
    assert closed and "\n" not in closed and "Question" not in closed
