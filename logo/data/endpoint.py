"""Generation through an OpenAI-compatible server (vLLM, SGLang, ``transformers serve``) for the data builder.

``endpoint_generator(tokenizer, options, endpoint)`` is a drop-in for the builder's in-process generator: it takes the
prompts the builder rendered with the tokenizer's chat template (token ids) and returns the decoded continuations.
Each prompt is one ``POST {url}/completions`` (the legacy completions API: the prompt is rendered here, so the
template is the one in-process generation uses), with the builder's sampling parameters: ``max_tokens`` =
``--max-new-tokens``, ``temperature`` (0: greedy), ``top_p``, and a ``seed`` derived from ``--seed`` and the prompt (a
resumed build asks the same). ``--prompt-format text`` (default; every server) sends the prompt as text — checked
here to re-tokenize to the builder's ids, a leading BOS left to the server's tokenizer — and ``tokens`` sends the ids
themselves (vLLM, SGLang; ``transformers serve`` takes text only).

At most ``concurrency`` requests are in flight. A connection error, a timeout (``--request-timeout``), HTTP 408 / 429
/ 5xx or a malformed answer is retried ``--retries`` times, waiting ``--retry-backoff`` × 1, 2, 4, ... seconds; then
the build stops with one line (:class:`~logo.errors.ServiceError`, exit code 75) and the records already built stay
in the build's ``.partial`` for the rerun to resume from. Any other HTTP error (a wrong model name, a missing API
key) is a user error (exit code 2). The API key is read from the environment variable ``--api-key-env`` (default
``OPENAI_API_KEY``; none sent when it is unset), never from the command line.
"""
from __future__ import annotations

import asyncio
import zlib
from dataclasses import dataclass
from typing import Callable, List

from ..errors import ConfigError, ServiceError

PROMPT_FORMATS = ("text", "tokens")
RETRY_STATUS = (408, 429)


@dataclass
class EndpointOptions:
    url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    timeout: float = 600.0
    retries: int = 4
    backoff: float = 1.0
    prompt_format: str = "text"

    def validate(self) -> "EndpointOptions":
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"--endpoint must be an http:// or https:// URL, got {self.url!r}")
        if not self.model:
            raise ConfigError("--endpoint-model must not be empty")
        for name, low in (("concurrency", 1), ("retries", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"--{name} must be an integer >= {low}, got {value!r}")
        if not self.timeout > 0:
            raise ConfigError(f"--request-timeout must be > 0 seconds, got {self.timeout}")
        if not self.backoff >= 0:
            raise ConfigError(f"--retry-backoff must be >= 0 seconds, got {self.backoff}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ConfigError(f"--prompt-format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}")
        return self

    @property
    def completions_url(self) -> str:
        base = self.url.rstrip("/")
        return (base if base.endswith("/v1") else base + "/v1") + "/completions"


def request_seed(seed: int, prompt: List[int]) -> int:
    """The seed one request carries: a function of ``--seed`` and the prompt only."""
    return (seed * 1_000_003 + zlib.crc32(repr(prompt).encode())) % 2**31


class _Text:
    """Prompt ids -> the text a server re-tokenizes to the same ids (``mismatches`` counts the prompts that do not)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        probe = tokenizer("x")["input_ids"]
        bos = getattr(tokenizer, "bos_token_id", None)
        self.adds_bos = bos is not None and bool(probe) and probe[0] == bos
        self.mismatches = 0

    def __call__(self, ids: List[int]) -> str:
        tokenizer = self.tokenizer
        if self.adds_bos and ids and ids[0] == tokenizer.bos_token_id:
            ids = ids[1:]  # the server's tokenizer adds it back
            expected = [tokenizer.bos_token_id] + list(ids)
        else:
            expected = list(ids)
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if list(tokenizer(text)["input_ids"]) != expected:
            self.mismatches += 1
        return text


def endpoint_generator(tokenizer, options, endpoint: EndpointOptions, environ=None,
                       log: Callable[[str], None] = print) -> Callable[[List[List[int]]], List[str]]:
    """The builder's generator (module doc); ``options`` are its BuildOptions. The returned callable counts the
    tokens it received in ``.tokens``."""
    import os

    try:
        import httpx
    except ImportError:
        raise ConfigError("--endpoint needs httpx: pip install 'logo-kernels[data]'") from None

    environ = os.environ if environ is None else environ
    key = environ.get(endpoint.api_key_env) or None
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    as_text = _Text(tokenizer) if endpoint.prompt_format == "text" else None
    warned = [False]

    def body(prompt: List[int]) -> dict:
        out = {"model": endpoint.model, "prompt": as_text(prompt) if as_text else list(prompt),
               "max_tokens": options.max_new_tokens, "temperature": options.temperature,
               "seed": request_seed(options.seed, prompt)}
        if options.temperature > 0:
            out["top_p"] = options.top_p
        return out

    async def one(client, gate: asyncio.Semaphore, prompt: List[int]) -> str:
        payload = body(prompt)
        async with gate:
            reason = ""
            for attempt in range(endpoint.retries + 1):
                if attempt:
                    await asyncio.sleep(endpoint.backoff * 2 ** (attempt - 1))
                try:
                    response = await client.post(endpoint.completions_url, json=payload, headers=headers)
                except httpx.TimeoutException:
                    reason = f"no answer within --request-timeout {endpoint.timeout:g} s"
                    continue
                except httpx.TransportError as error:
                    reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
                    continue
                if response.status_code == 200:
                    try:
                        answer = response.json()
                        text = answer["choices"][0]["text"]
                    except (ValueError, KeyError, IndexError, TypeError):
                        reason = f"an answer that is not a completion: {response.text[:120]!r}"
                        continue
                    usage = answer.get("usage") or {}
                    count = usage.get("completion_tokens")
                    generate.tokens += count if isinstance(count, int) else len(tokenizer(text)["input_ids"])
                    return text.strip()
                detail = " ".join(response.text.split())[:200]
                if response.status_code in RETRY_STATUS or response.status_code >= 500:
                    reason = f"HTTP {response.status_code}: {detail}"
                    continue
                raise ConfigError(f"--endpoint {endpoint.url}: the server refused the request (HTTP "
                                  f"{response.status_code}: {detail}); check --endpoint-model {endpoint.model!r}"
                                  f"{'' if key else f' and the API key (${endpoint.api_key_env} is not set)'}")
            raise ServiceError(f"--endpoint {endpoint.url}: {reason} (after {endpoint.retries + 1} attempts)")

    async def run(prompts: List[List[int]]) -> List[str]:
        gate = asyncio.Semaphore(endpoint.concurrency)
        limits = httpx.Limits(max_connections=endpoint.concurrency)
        async with httpx.AsyncClient(timeout=endpoint.timeout, limits=limits) as client:
            tasks = [asyncio.ensure_future(one(client, gate, p)) for p in prompts]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
            if failed:  # the first failure ends the round: the requests still in flight are cancelled
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise failed[0].exception()
            return [t.result() for t in tasks]

    def generate(prompts: List[List[int]]) -> List[str]:
        texts = asyncio.run(run(prompts))
        if as_text is not None and as_text.mismatches and not warned[0]:
            warned[0] = True
            log(f"logo.data: {as_text.mismatches} prompt(s) sent as text re-tokenize to other ids than the builder's; "
                "--prompt-format tokens sends the ids themselves (vLLM, SGLang)")
        return texts

    generate.tokens = 0
    return generate

