"""The data builder generating through a real OpenAI-compatible server (``transformers serve`` on 127.0.0.1 with a
saved tiny model): the same records as in-process greedy generation, a server killed mid-build stops the build with
one line and exit code 75, and the rerun against a restarted server resumes to the same output. No mocks."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

transformers = pytest.importorskip("transformers")
httpx = pytest.importorskip("httpx")
for _module in ("fastapi", "uvicorn", "openai"):  # transformers[serving]
    pytest.importorskip(_module, reason="transformers serve needs transformers[serving] (the test extra)")

from logo.data.builder import main  # noqa: E402
from logo.data.endpoint import EndpointOptions, request_seed  # noqa: E402
from logo.data.tokenizer import default_tokenizer  # noqa: E402
from test_builder import raw_lines, write_jsonl  # noqa: E402

RECORDS = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``transformers serve MODEL`` on 127.0.0.1:port, in its own process group."""

    def __init__(self, model_dir: str, log_path: str):
        self.model_dir, self.log_path, self.process = model_dir, log_path, None

    def start(self, timeout: float = 120.0) -> str:
        self.port = free_port()
        code = "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; main()"
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen([sys.executable, "-c", code, "serve", self.model_dir, "--host", "127.0.0.1",
                                         "--port", str(self.port), "--device", "cpu", "--log-level", "warning"],
                                        stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {self.process.returncode}: see {self.log_path}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return url + "/v1"
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.kill()
        raise RuntimeError(f"transformers serve not ready after {timeout} s: see {self.log_path}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        if self.process is not None:
            self.log.close()


@pytest.fixture
def tiny_model(tmp_path):
    """A 1-layer Llama with weights large enough that greedy answers depend on the prompt (no degenerate drops)."""
    import torch

    tokenizer = default_tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=2048, initializer_range=1.0,
                                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    transformers.LlamaForCausalLM(config).save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    return str(model_dir)


def raw_records(tmp_path) -> str:
    first = raw_lines()[0]
    rows = [dict(first, id=f"r{i}", question=f"{first['question']} Answer in {i + 2} words.") for i in range(RECORDS)]
    path = tmp_path / "raw.jsonl"
    write_jsonl(path, rows)
    return str(path)


def build_args(raw: str, model_dir: str, out) -> list:
    return ["build", "--input", raw, "--model", model_dir, "--out", str(out), "--chunk-tokens", "64",
            "--context-chunks", "6", "--max-critical", "2", "--max-new-tokens", "12", "--scorer", "words",
            "--temperature", "0", "--batch-size", "1", "--no-progress"]


def lines(path) -> list:
    return [line for line in open(path, encoding="utf-8").read().splitlines() if line.strip()]


def test_build_through_transformers_serve_matches_in_process_and_resumes_after_a_kill(tmp_path, tiny_model, capsys):
    raw = raw_records(tmp_path)
    reference = tmp_path / "in-process.jsonl"
    assert main(build_args(raw, tiny_model, reference) + ["--batch-size", "4"]) == 0
    expected = lines(reference)
    assert len(expected) == RECORDS
    capsys.readouterr()

    server = Server(tiny_model, str(tmp_path / "serve.log"))
    out = tmp_path / "served.jsonl"
    endpoint = ["--endpoint", server.start(), "--concurrency", "3", "--retries", "2", "--retry-backoff", "0.05",
                "--request-timeout", "60"]
    try:
        # a model name the server does not serve: refused, a user error of one line
        assert main(build_args(raw, tiny_model, tmp_path / "x.jsonl") + endpoint + ["--endpoint-model", "nope"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "the server refused the request (HTTP 400" in err[0] and "--endpoint-model" in err[0]

        partial = tmp_path / "served.jsonl.partial"
        killed = threading.Event()

        def kill_after_three_records():
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not killed.is_set():
                if partial.exists() and partial.read_text().count("\n") >= 3:
                    server.kill()
                    killed.set()
                time.sleep(0.01)

        watcher = threading.Thread(target=kill_after_three_records)
        watcher.start()
        code = main(build_args(raw, tiny_model, out) + endpoint)
        killed.set()
        watcher.join()
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 75, err
        assert len(err) == 1 and err[0].startswith(f"logo.data: error: --endpoint {endpoint[1]}: ")
        assert "after 3 attempts" in err[0] and "safe in" in err[0] and "rerun the same command to resume" in err[0]
        built = lines(partial)
        assert 3 <= len(built) < RECORDS and not out.exists()
        assert built == expected[:len(built)]  # greedy: the in-process records, in order

        endpoint[1] = server.start()  # a restarted server (on another port: the URL is not part of the build)
        assert main(build_args(raw, tiny_model, out) + endpoint) == 0
        counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert counts["already_built"] == len(built) and counts["built"] == RECORDS - len(built)
        assert lines(out) == expected and not partial.exists()
    finally:
        server.kill()


def test_a_dead_endpoint_is_one_line_and_exit_75(tmp_path, tiny_model, capsys):
    raw = raw_records(tmp_path)
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    code = main(build_args(raw, tiny_model, tmp_path / "o.jsonl") + ["--endpoint", url, "--retries", "1",
                                                                      "--retry-backoff", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 75 and len(err) == 1 and "ConnectError" in err[0] and "after 2 attempts" in err[0]
    assert "0 record(s) built so far are safe" in err[0] and not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("args, message", [
    (["--endpoint", "127.0.0.1:8000"], "--endpoint must be an http:// or https:// URL"),
    (["--endpoint", "http://x", "--concurrency", "0"], "--concurrency must be an integer >= 1"),
    (["--endpoint", "http://x", "--request-timeout", "0"], "--request-timeout must be > 0 seconds"),
    (["--temperature", "-1"], "--temperature must be in [0, 10]"),
])
def test_endpoint_option_errors_are_one_line(tmp_path, tiny_model, capsys, args, message):
    code = main(build_args(raw_records(tmp_path), tiny_model, tmp_path / "o.jsonl") + args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]


def test_request_body_and_seed():
    options = EndpointOptions("http://h:1/", "m")
    assert options.validate().completions_url == "http://h:1/v1/completions"
    assert EndpointOptions("http://h:1/v1", "m").completions_url == "http://h:1/v1/completions"
    assert request_seed(0, [1, 2, 3]) == request_seed(0, [1, 2, 3]) != request_seed(1, [1, 2, 3])
