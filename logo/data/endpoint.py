"""Generation through an OpenAI-compatible server (vLLM, SGLang, ``transformers serve``) for the data builder.

``endpoint_generator(tokenizer, options, endpoint)`` is a drop-in for the builder's in-process generator: it takes the
prompts the builder rendered with the tokenizer's chat template (token ids) and returns the decoded continuations.
Each prompt is one ``POST {url}/completions`` (the legacy completions API: the prompt is rendered here, so the
template is the one in-process generation uses), with the builder's sampling parameters: ``max_tokens`` =
``--max-new-tokens``, ``temperature`` (0: greedy), ``top_p`` and ``top_k`` (as in-process; only when sampling),
and a ``seed`` derived from ``--seed`` and the prompt (a resumed build asks the same). ``--prompt-format text``
(default; every server) sends the prompt as text — checked here to re-tokenize to the builder's ids, a leading BOS
left to the server's tokenizer — and ``tokens`` sends the ids themselves (vLLM, SGLang; ``transformers serve`` takes
text only).

At most ``concurrency`` requests are in flight. A connection error, a timeout (``--request-timeout``), HTTP 408 / 429
/ 5xx or a malformed answer is retried ``--retries`` times, waiting ``--retry-backoff`` × 1, 2, 4, ... seconds; then
the build stops with one line (:class:`~logo.errors.ServiceError`, exit code 75; an HTTP error or malformed answer
names the record whose prompt got it) and the records already built stay in the build's ``.partial`` for the rerun
to resume from. Any other HTTP error is a user error (exit code 2): 401 / 403 a refused (or unset) API key, 400 /
413 a prompt the server refuses (too long for its context, or a wrong ``--endpoint-model``; the record and its
prompt's length named), others a wrong model name or URL. The API key is read from the environment variable
``--api-key-env`` names (default ``OPENAI_API_KEY``; none sent when it is unset), never from the command line; a
URL is printed without its ``user:password@``.
"""
from __future__ import annotations

import asyncio
import re
import zlib
from dataclasses import dataclass
from typing import Callable, List

from ..errors import ConfigError, ServiceError

PROMPT_FORMATS = ("text", "tokens")
RETRY_STATUS = (408, 429)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def redact(url: str) -> str:
    """``url`` without a ``user:password@`` part, as it may be printed."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#@]*@", r"\1***@", url)


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
        try:
            import httpx
        except ImportError:
            raise ConfigError("--endpoint needs httpx: pip install 'logo-kernels[data]'") from None
        try:
            url = httpx.URL(self.url)
            port = url.port
        except (httpx.InvalidURL, TypeError, ValueError) as error:
            raise ConfigError(f"--endpoint: not a valid URL ({str(error).splitlines()[0]}): {self.shown!r}") from None
        if url.scheme not in ("http", "https") or not url.host or not (port is None or 1 <= port <= 65535):
            raise ConfigError(f"--endpoint must be an http:// or https:// URL with a host (and a port in "
                              f"1..65535), got {self.shown!r}")
        if not _ENV_NAME.fullmatch(self.api_key_env or ""):
            raise ConfigError("--api-key-env must name an environment variable (letters, digits, _), not hold the "
                              "key itself")
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
    def shown(self) -> str:
        """The URL as printed (:func:`redact`)."""
        return redact(self.url)

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
            out.update(top_p=options.top_p, top_k=options.top_k)
        return out

    def failure(cls, index: int, prompt: List[int], describe: Callable[[str], str]):
        """An error about one prompt; the builder names its record through ``describe`` (:func:`name_record`)."""
        error = cls(describe(f"prompt {index} of the round ({len(prompt)} tokens)"))
        error.prompt_index, error.describe = index, describe
        return error

    async def one(client, gate: asyncio.Semaphore, index: int, prompt: List[int]) -> str:
        payload = body(prompt)
        async with gate:
            reason, status = "", None
            for attempt in range(endpoint.retries + 1):
                if attempt:
                    await asyncio.sleep(endpoint.backoff * 2 ** (attempt - 1))
                try:
                    response = await client.post(endpoint.completions_url, json=payload, headers=headers)
                except httpx.TimeoutException:
                    reason, status = f"no answer within --request-timeout {endpoint.timeout:g} s", None
                    continue
                except httpx.TransportError as error:
                    reason = f"{type(error).__name__}: {redact(str(error))}" if str(error) else type(error).__name__
                    status = None
                    continue
                status = response.status_code
                if status == 200:
                    try:
                        answer = response.json()
                        text = answer["choices"][0]["text"]
                        if not isinstance(text, str):
                            raise TypeError(f"text is {type(text).__name__}")
                    except (ValueError, KeyError, IndexError, TypeError):
                        reason = f"an answer that is not a completion: {response.text[:120]!r}"
                        continue
                    usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
                    count = usage.get("completion_tokens")
                    generate.tokens += count if isinstance(count, int) else len(tokenizer(text)["input_ids"])
                    return text.strip()
                detail = " ".join(response.text.split())[:200]
                if status in RETRY_STATUS or status >= 500:
                    reason = f"HTTP {status}: {detail}"
                    continue
                if status in (401, 403):
                    raise ConfigError(f"--endpoint {endpoint.shown}: the key in ${endpoint.api_key_env} was refused "
                                      f"(or unset) (HTTP {status}: {detail})")
                if status in (400, 413):
                    raise failure(ConfigError, index, prompt, lambda who: (
                        f"--endpoint {endpoint.shown}: the server refused {who} (HTTP {status}: {detail}); a prompt "
                        "longer than the server's context is refused (shorten --chunk-tokens or --context-chunks, "
                        f"or raise the server's limit); check --endpoint-model {endpoint.model!r} too"))
                raise ConfigError(f"--endpoint {endpoint.shown}: the server refused the request (HTTP {status}: "
                                  f"{detail}); check --endpoint-model {endpoint.model!r}")
            attempts = f"(after {endpoint.retries + 1} attempts)"
            if status is None:  # the server is not answering at all: no one record is to blame
                raise ServiceError(f"--endpoint {endpoint.shown}: {reason} {attempts}")
            raise failure(ServiceError, index, prompt,
                          lambda who: f"--endpoint {endpoint.shown}: {reason} for {who} {attempts}")

    async def run(prompts: List[List[int]]) -> List[str]:
        gate = asyncio.Semaphore(endpoint.concurrency)
        limits = httpx.Limits(max_connections=endpoint.concurrency)
        async with httpx.AsyncClient(timeout=endpoint.timeout, limits=limits) as client:
            tasks = [asyncio.ensure_future(one(client, gate, i, p)) for i, p in enumerate(prompts)]
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


def name_record(error: Exception, prompts: List[List[int]], owners: List[str]) -> Exception:
    """``error`` (from a generator) naming the record whose prompt it is about, when it is about one."""
    index = getattr(error, "prompt_index", None)
    if index is None or not 0 <= index < len(owners):
        return error
    return type(error)(error.describe(f"record {owners[index]!r} (a prompt of {len(prompts[index])} tokens)"))
