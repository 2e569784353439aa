"""Any OpenAI-compatible endpoint as a model for the harness: `lmforge eval --model http://host:8000/v1`.

Generation and code tasks go to /v1/completions (prompt, max_tokens, temperature, stop, seed), or, where an
endpoint has no completions route (chat-only APIs), to /v1/chat/completions with the prompt as one user
message. Loglikelihood and multiple-choice tasks need the endpoint to score a given text: /v1/completions
with `echo` + `logprobs` and `max_tokens: 0` returns every prompt token's log-probability (`lmforge serve`,
vLLM and llama.cpp's server do; OpenAI's hosted chat models do not). Where an endpoint has none, those tasks
are refused by name and skipped, as a classification task is for a model without a head.

With `tokenizer` (the served model's tokenizer directory) prompts go as token ids, built exactly as a local
evaluation builds them (`harness.encode_pair`: eos before the context, the context's trailing whitespace
moved to the continuation; prompts cut from the left to the endpoint's context), so an lmforge model served
over HTTP scores the numbers its checkpoint scores locally (up to float32 rounding of the log-softmax).
Without one, prompts go as text and the endpoint tokenizes them: the continuation is scored as the tokens
that end after the context, and the first token is conditioned on nothing, so the numbers are close to, not
equal to, a local run's.

Requests run `concurrency` at a time. 429 and 5xx answers and failed connections are retried with exponential
back-off and jitter (a Retry-After header wins); every answer is kept in an on-disk cache keyed by endpoint,
model and request body (never the API key), so a rerun, or a run continued after a crash, does not pay twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError, DataError
from lmforge.eval.harness import Score, Unsupported, check_pair, encode_pair
from lmforge.eval.tasks import Example, Task
from lmforge.io import atomic_write_json
from lmforge.progress import Progress
from lmforge.tokenizer import Tokenizer

RETRIED = (429, 500, 502, 503, 504)
NO_CONTEXT = 1 << 30  # an endpoint that does not say its context: nothing is cut here, it refuses what is too long
LOGPROBS_NEEDED = ("loglikelihood and multiple-choice tasks need prompt logprobs (echo + logprobs with "
                   "max_tokens 0 on /v1/completions), as `lmforge serve`, vLLM and llama.cpp's server give")


def is_endpoint(model: Any) -> bool:
    return isinstance(model, str) and model.startswith(("http://", "https://"))


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmforge" / "remote"


@dataclass
class EndpointConfig:
    """What the harness reads from a model's config: the context it may fill (the endpoint's max_model_len)."""

    max_position_embeddings: int


class RemoteError(ConfigError):
    """The endpoint answered with an error that a retry will not fix."""


class RemoteLM:
    """An endpoint with the methods the harness calls on an `LM` (`generate`, and `loglikelihoods` for scoring).

    Args:
        url: Base URL, e.g. http://127.0.0.1:8000/v1.
        api_key: Sent as `Authorization: Bearer`; default $LMFORGE_API_KEY or $OPENAI_API_KEY.
        model: The endpoint's model id; default the only one /v1/models lists.
        tokenizer: The served model's tokenizer directory: prompts go as token ids, as a local evaluation's.
        concurrency: Requests in flight at once.
        cache: Directory of cached answers (default ~/.cache/lmforge/remote).
        max_retries: Retries of one request on 429 / 5xx / connection errors before giving up.
        timeout: Seconds to wait for one answer.
        sleep: How to wait between retries (tests pass a recorder).
    """

    def __init__(self, url: str, *, api_key: str | None = None, model: str | None = None,
                 tokenizer: Path | None = None, concurrency: int = 8, cache: Path | None = None,
                 max_retries: int = 6, timeout: float = 600.0, sleep: Callable[[float], None] = time.sleep) -> None:
        try:
            import openai
        except ImportError:
            raise ConfigError("evaluating an HTTP endpoint needs the openai client: pip install 'lmforge[remote]'"
                              ) from None
        if concurrency < 1:
            raise ConfigError(f"concurrency={concurrency} must be at least 1")
        self._openai, self.url = openai, url.rstrip("/")
        key = api_key or os.environ.get("LMFORGE_API_KEY") or os.environ.get("OPENAI_API_KEY") or "none"
        self.client = openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=timeout)
        self.concurrency, self.max_retries, self.sleep = concurrency, max_retries, sleep
        self.cache = Path(cache) if cache is not None else default_cache()
        self.tokenizer = Tokenizer.load(tokenizer) if tokenizer is not None else None
        self.tokenizer_path = Path(tokenizer).resolve() if tokenizer is not None else None
        self.path, self.device, self.api = None, "remote", "completions"
        card = self._model_card(model)
        self.model_id = card["id"]
        self.owned_by = card.get("owned_by")
        self.context = card.get("max_model_len")
        self.config = EndpointConfig(self.context or NO_CONTEXT)

    def _model_card(self, wanted: str | None) -> dict[str, Any]:
        """The /v1/models entry of the model to evaluate (which also says its context, where vLLM-style)."""
        try:
            # two tries, not max_retries: a wrong URL should fail in seconds, not after minutes of back-off
            cards = [card.model_dump() for card in self._call(lambda: self.client.models.list(), retries=1).data]
        except Unsupported:
            cards = []
        if wanted is not None:
            return next((c for c in cards if c["id"] == wanted), {"id": wanted})
        if len(cards) != 1:
            listed = ", ".join(c["id"] for c in cards) or "none"
            raise ConfigError(f"{self.url}: lists {len(cards)} models ({listed}); name the one to evaluate "
                              "with --served-model")
        return cards[0]

    def provenance(self) -> dict[str, Any]:
        """The report's model entry: which endpoint and which model behind it (the key is never recorded)."""
        info: dict[str, Any] = {"type": "RemoteLM", "url": self.url, "model_id": self.model_id, "api": self.api}
        if self.owned_by:
            info["owned_by"] = self.owned_by
        if self.context:
            info["max_model_len"] = self.context
        if self.tokenizer_path is not None:
            info["tokenizer"] = str(self.tokenizer_path)
            info["tokenizer_sha256"] = hashlib.sha256((self.tokenizer_path / "tokenizer.json").read_bytes()).hexdigest()
        return info

    # ----- one request: cache, retries, errors -----------------------------------------------------

    def _call(self, send: Callable[[], Any], retries: int | None = None) -> Any:
        """`send()` with retries on 429 / 5xx / failed connections, exponential back-off with jitter."""
        openai = self._openai
        retries = self.max_retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                return send()
            except openai.APIStatusError as e:
                if e.status_code not in RETRIED or attempt == retries:
                    raise self._refusal(e) from None
                wait = _retry_after(e.response) or min(60.0, 2.0 ** attempt) * (0.5 + random.random() / 2)
            except openai.APIConnectionError as e:
                if attempt == retries:
                    raise RemoteError(f"{self.url}: no answer after {attempt + 1} tries ({e})") from None
                wait = min(60.0, 2.0 ** attempt) * (0.5 + random.random() / 2)
            self.sleep(wait)
        raise AssertionError("unreachable")

    def _refusal(self, e: Any) -> Exception:
        message = _message(e)
        if e.status_code in (401, 403):
            return RemoteError(f"{self.url}: refused the API key ({e.status_code}: {message}); pass --api-key")
        if e.status_code in (404, 405, 501):
            return Unsupported(f"{self.url} answered {e.status_code} ({message})")
        return RemoteError(f"{self.url}: {e.status_code}: {message}")

    def _post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST `body` to /route, or its cached answer from an earlier run."""
        body = {"model": self.model_id, **body}
        key = hashlib.sha256(json.dumps({"url": self.url, "route": route, "body": body}, sort_keys=True)
                             .encode()).hexdigest()
        path = self.cache / key[:2] / f"{key}.json"
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
        create = self.client.completions.create if route == "completions" else self.client.chat.completions.create
        answer = self._call(lambda: create(**body)).model_dump()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, answer)
        return answer

    def _map(self, fn: Callable[[Any], Any], items: Sequence[Any], progress: Progress | None) -> list[Any]:
        """fn over items, `concurrency` at a time, in order; the first item alone first, so an endpoint that
        refuses the kind of request is found out for the price of one."""
        if not items:
            return []
        results = [fn(items[0])]
        if progress is not None:
            progress.update(progress.done + 1)
        with ThreadPoolExecutor(self.concurrency) as pool:
            futures = [pool.submit(fn, item) for item in items[1:]]
            try:
                for _ in as_completed(futures):
                    if progress is not None:
                        progress.update(progress.done + 1)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        return results + [f.result() for f in futures]

    # ----- what the harness calls ------------------------------------------------------------------

    def generate(self, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.0,
                 stop: list[str] | None = None, seed: list[int] | int | None = None) -> list[str]:
        """Completions of `prompts` (the signature of `LM.generate` for a list, as the harness calls it)."""
        seeds = seed if isinstance(seed, list) else [None if seed is None else seed + i for i in range(len(prompts))]

        def one(item: tuple[str, int | None]) -> str:
            prompt, s = item
            body: dict[str, Any] = {"max_tokens": max_new_tokens, "temperature": temperature, "stop": stop or None}
            if s is not None:
                body["seed"] = s
            if self.api == "completions":
                sent, body["max_tokens"] = self._fit(prompt, max_new_tokens)
                try:
                    return self._post("completions", {"prompt": sent, **body})["choices"][0]["text"] or ""
                except Unsupported:
                    warnings.warn(f"{self.url} has no /v1/completions; generating through /v1/chat/completions "
                                  "with each prompt as one user message", stacklevel=2)
                    self.api = "chat"
            answer = self._post("chat", {"messages": [{"role": "user", "content": prompt}], **body})
            return answer["choices"][0]["message"]["content"] or ""

        items = list(zip(prompts, seeds))
        first = one(items[0]) if items else None  # settles completions or chat before the rest go out
        return [first, *self._map(one, items[1:], None)] if items else []

    def _fit(self, prompt: str, max_new_tokens: int) -> tuple[str | list[int], int]:
        """The prompt as sent (token ids cut from the left as `fit_prompt` cuts them, where a tokenizer and the
        endpoint's context are known; else the text) and the token budget that fits beside it."""
        if self.tokenizer is None:
            return prompt, max_new_tokens
        ids = self.tokenizer.encode(prompt)
        if self.context is None:
            return ids, max_new_tokens
        ids = ids[-max(1, self.context - max_new_tokens):]
        return ids, min(max_new_tokens, self.context - len(ids))

    def loglikelihoods(self, task: Task, requests: list[tuple[Example, str, str]], *,
                       progress: Progress | None = None, bos_prefix: str = "eos") -> list[Score]:
        """Σ log p(continuation | context) for each (example, context, continuation) through echo + logprobs;
        `bos_prefix` applies where prompts go as token ids (a --tokenizer given), else the endpoint decides."""
        if self.tokenizer is not None:
            pairs = [check_pair(self, task, e, encode_pair(self, c, cont, bos_prefix)) for e, c, cont in requests]
            return self._map(self._score_ids, pairs, progress)
        return self._map(self._score_text, requests, progress)

    def _echo(self, prompt: str | list[int]) -> dict[str, Any]:
        try:
            answer = self._post("completions", {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1,
                                                "temperature": 0.0})
        except Unsupported as e:
            raise Unsupported(f"{e}; {LOGPROBS_NEEDED}") from None
        except RemoteError as e:
            if "echo" in str(e) or "logprobs" in str(e):  # OpenAI: echo is not supported for this model
                raise Unsupported(f"{e}; {LOGPROBS_NEEDED}") from None
            raise
        logprobs = (answer.get("choices") or [{}])[0].get("logprobs") or {}
        if not logprobs.get("token_logprobs"):
            raise Unsupported(f"{self.url} returned no prompt logprobs; {LOGPROBS_NEEDED}")
        return logprobs

    def _score_ids(self, pair: tuple[list[int], list[int]]) -> Score:
        ctx, cont = pair
        ids = ctx + cont
        window = self.config.max_position_embeddings
        truncated = len(ids) - 1 > window
        if self.context is not None:
            ids = ids[-(self.context - 1):]  # an endpoint scores a prompt shorter than its context
        logprobs = self._echo(ids)
        return _score(logprobs, len(logprobs["token_logprobs"]) - len(cont), truncated)

    def _score_text(self, request: tuple[Example, str, str]) -> Score:
        example, context, continuation = request
        spaces = len(context) - len(context.rstrip())  # as encode_pair moves them
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        text = context + continuation
        logprobs = self._echo(text)
        offsets = logprobs.get("text_offset") or []
        ends = [*offsets[1:], len(text)]
        first = next((i for i, end in enumerate(ends) if end > len(context)), None)
        if first is None or first == 0:
            raise DataError(f"{example.source}:{example.line}: the endpoint's tokens leave no context before the "
                            "continuation to condition on; pass --tokenizer")
        return _score(logprobs, first, False)


def _score(logprobs: dict[str, Any], first: int, truncated: bool) -> Score:
    """The Score of the prompt tokens from index `first` on: their summed logprob, and whether each was the top."""
    values = logprobs["token_logprobs"][first:]
    tops = (logprobs.get("top_logprobs") or [None] * len(logprobs["token_logprobs"]))[first:]
    if any(v is None for v in values):
        raise DataError("the endpoint gave no logprob for a continuation token")
    greedy = all(top is not None and max(top.values()) <= v + 1e-6 for v, top in zip(values, tops))
    return Score(float(sum(values)), greedy, len(values), truncated)


def _retry_after(response: Any) -> float | None:
    try:
        return float(response.headers.get("retry-after"))
    except (TypeError, ValueError, AttributeError):
        return None


def _message(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    return str(getattr(e, "message", e))
