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
        self.model_dir, self.log_path, self.process, self.log = model_dir, log_path, None, None

    def start(self, timeout: float = 120.0, tries: int = 3) -> str:
        """The server's base URL once it answers /health; a new port when the last one was taken meanwhile."""
        for attempt in range(tries):
            try:
                return self._start(timeout)
            except OSError:  # the free port was taken before the server bound it: another one
                if attempt + 1 == tries:
                    raise
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> str:
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
                self.kill()
                with open(self.log_path, "rb") as handle:
                    if b"address already in use" in handle.read().lower():
                        raise OSError(f"port {self.port} taken")
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
        """Kills the whole process group (also when the server already exited) and closes its log."""
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)  # the group outlives its leader: kill it anyway
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        if self.log is not None and not self.log.closed:
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
        assert len(err) == 1 and "the server refused record 'r0'" in err[0] and "(HTTP 400" in err[0], err
        assert "--endpoint-model 'nope'" in err[0]

        partial = tmp_path / "served.jsonl.partial"
        killed = threading.Event()

        def kill_after_three_records():
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not killed.is_set():
                if partial.exists() and partial.read_text().count("\n") >= 3:
                    server.kill()
                    killed.set()
                time.sleep(0.01)

        watcher = threading.Thread(target=kill_after_three_records, daemon=True)
        watcher.start()
        try:
            code = main(build_args(raw, tiny_model, out) + endpoint)
        finally:
            killed.set()
            watcher.join(timeout=30)
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
    (["--endpoint", "http://h:abc"], "--endpoint: not a valid URL"),
    (["--endpoint", "http://[::1"], "--endpoint: not a valid URL"),
    (["--endpoint", "http://"], "--endpoint must be an http:// or https:// URL with a host"),
    (["--endpoint", "http://h:70000/v1"], "a port in 1..65535"),
    (["--endpoint", "http://user:s3cret@h:abc/v1"], "--endpoint: not a valid URL"),
    (["--endpoint", "http://x", "--api-key-env", "sk-s3cret"], "--api-key-env must name an environment variable"),
    (["--top-k", "-1"], "--top-k must be an integer >= 0"),
    (["--endpoint", "http://x", "--concurrency", "0"], "--concurrency must be an integer >= 1"),
    (["--endpoint", "http://x", "--request-timeout", "0"], "--request-timeout must be > 0 seconds"),
    (["--temperature", "-1"], "--temperature must be in [0, 10]"),
])
def test_endpoint_option_errors_are_one_line(tmp_path, tiny_model, capsys, args, message):
    code = main(build_args(raw_records(tmp_path), tiny_model, tmp_path / "o.jsonl") + args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert "s3cret" not in err[0]  # a password in the URL, a key pasted for a variable name: never printed


def test_request_body_and_seed():
    options = EndpointOptions("http://h:1/", "m")
    assert options.validate().completions_url == "http://h:1/v1/completions"
    assert EndpointOptions("http://h:1/v1", "m").completions_url == "http://h:1/v1/completions"
    assert request_seed(0, [1, 2, 3]) == request_seed(0, [1, 2, 3]) != request_seed(1, [1, 2, 3])


class Stub:
    """A stdlib OpenAI-compatible stub on 127.0.0.1 for fault injection: answers ``/v1/completions`` after a delay
    that varies with the prompt (so answers come back out of order), records the peak number of requests in flight
    and the Authorization headers, and fails as ``mode`` says: ``flaky`` (503 to each prompt's first request),
    ``null`` (a null completion text), or an HTTP status for every request."""

    def __init__(self, mode: str = "ok"):
        import http.server
        import zlib

        self.mode, self.headers, self.in_flight, self.peak, self.seen = mode, [], 0, 0, set()
        lock, stub = threading.Lock(), self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                digest = zlib.crc32(json.dumps(body["prompt"]).encode())
                with lock:
                    stub.headers.append(self.headers.get("Authorization"))
                    stub.in_flight += 1
                    stub.peak = max(stub.peak, stub.in_flight)
                    first = digest not in stub.seen
                    stub.seen.add(digest)
                time.sleep(0.01 * (digest % 7))
                with lock:
                    stub.in_flight -= 1
                status, text = 200, f"answer {digest}"
                if stub.mode == "flaky" and first:
                    status = 503
                elif stub.mode == "null":
                    text = None
                elif stub.mode.isdigit():
                    status = int(stub.mode)
                data = json.dumps({"choices": [{"text": text}]} if status == 200 else {"error": "injected"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def stub_args(raw, model_dir, out, url) -> list:
    return build_args(raw, model_dir, out) + ["--endpoint", url, "--api-key-env", "LOGO_TEST_KEY", "--concurrency",
                                              "4", "--batch-size", "4", "--retries", "2", "--retry-backoff", "0"]


def test_a_stub_server_out_of_order_and_flaky_builds_in_order_with_the_key_sent(tmp_path, tiny_model, capsys,
                                                                                 monkeypatch):
    """Answers out of order, at most --concurrency in flight, a 503 retried; the key is sent and never printed."""
    monkeypatch.setenv("LOGO_TEST_KEY", "sk-never-printed")
    raw = raw_records(tmp_path)
    stub = Stub("flaky")
    with stub as url:
        assert main(stub_args(raw, tiny_model, tmp_path / "o.jsonl", url)) == 0
    captured = capsys.readouterr()
    assert "sk-never-printed" not in captured.out + captured.err
    assert set(stub.headers) == {"Bearer sk-never-printed"} and 1 < stub.peak <= 4
    assert [json.loads(line)["id"] for line in lines(tmp_path / "o.jsonl")] == [f"r{i}" for i in range(RECORDS)]


@pytest.mark.parametrize("mode, code, message", [
    ("401", 2, "the key in $LOGO_TEST_KEY was refused (or unset) (HTTP 401"),
    ("413", 2, "the server refused record 'r0' (a prompt of "),
    ("500", 75, "HTTP 500: {\"error\": \"injected\"} for record 'r0' (a prompt of "),
    ("null", 75, "an answer that is not a completion: '{\"choices\": [{\"text\": null}]}' for record 'r0'"),
])
def test_stub_server_errors_are_one_line_naming_the_record(tmp_path, tiny_model, capsys, monkeypatch, mode, code,
                                                          message):
    monkeypatch.setenv("LOGO_TEST_KEY", "sk-never-printed")
    with Stub(mode) as url:
        args = stub_args(raw_records(tmp_path), tiny_model, tmp_path / "o.jsonl", url) + ["--concurrency", "1"]
        assert main(args) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert "sk-never-printed" not in err[0] and "Traceback" not in err[0]
