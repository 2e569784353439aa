"""The inference engine: continuous batching over a preallocated KV cache.

Each `step()` admits waiting requests into free cache rows and prefills them in one batched forward,
then runs one batched decode forward over every running request, each at its own length, with its own
sampling settings, seed, stop strings and token budget. Finished and cancelled requests leave between
steps and free their row at once, so a new request never waits for the slowest one in a batch
(Yu et al. 2022, "Orca"). `lmforge.generate`, `LM.generate/stream/chat`, `lmforge chat` and the HTTP
server all decode through this class.
"""

from __future__ import annotations

import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import ConfigError
from lmforge.infer.beam import beam_search
from lmforge.infer.cache import SlotCache
from lmforge.infer.fast import decode_model
from lmforge.infer.sampling import SamplingParams, sample_batch
from lmforge.infer.text import TextStream, special_stop_ids
from lmforge.tokenizer import Tokenizer


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (before penalties and temperature) and the top alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Output:
    """What one step produced for one request: new tokens, the text now safe to show, and why it ended."""

    request: Request
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"


@dataclass(eq=False)
class Request:
    """One prompt to continue. `prompt_logprobs` = n also scores every prompt token after the first
    (with n alternatives): what `echo` + `logprobs` need for loglikelihood evaluation."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    prompt_logprobs: int | None = None
    on_output: Callable[[Output], None] | None = None
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False
    length: int = 0  # positions held in the cache
    next_token: int = -1  # sampled, not yet fed
    budget: int = 0  # tokens it may still generate
    generator: torch.Generator | None = None
    text: TextStream | None = None
    stop_ids: set[int] = field(default_factory=set)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Engine:
    """Runs many requests through one model at once; see the module docstring.

    Args:
        model: A decoder with `forward(idx, cache, positions=, attention_mask=)` and a `config`.
        tokenizer: Turns tokens into text and stop strings into stops; without one, outputs carry ids only.
        max_batch: Most requests decoded together (cache rows).
        max_length: Positions per row; the model's context by default.
        eos_id: The end-of-sequence id when there is no tokenizer.
        fast: Decode through `decode_model`'s prepacked view (bf16 on CPU); False uses the model as it is.
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer | None = None, *, max_batch: int = 16,
                 max_length: int | None = None, eos_id: int | None = None, fast: bool = True) -> None:
        if max_batch < 1:
            raise ConfigError(f"max_batch={max_batch} must be at least 1")
        self.model, self.tokenizer = decode_model(model) if fast else model, tokenizer
        self.config = model.config
        self.context = self.config.max_position_embeddings
        self.max_length = min(max_length or self.context, self.context)
        self.max_batch = max_batch
        self.eos_id = tokenizer.eos_id if tokenizer is not None and eos_id is None else eos_id
        # Tokens that end a sequence: eos, plus e.g. Llama 3's <|eot_id|> from generation_config.json
        self.end_ids: set[int] = set(getattr(tokenizer, "stop_ids", ()) or ())
        if self.eos_id is not None:
            self.end_ids.add(self.eos_id)
        weight = next(model.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        with torch.inference_mode():
            self.cache = SlotCache(self.config, max_batch, self.max_length, self.device, self.dtype)
        self._penalty_state: tuple[Tensor, Tensor] | None = None  # seen [B, V] and counts [B, V], made on first use
        self.running: list[Request] = []
        self.waiting: deque[Request] = deque()
        self._lock = threading.Lock()
        # The vocabulary head on the last position only: scoring every prompt position costs T×vocab for nothing.
        self._split_head = hasattr(model, "hidden") and hasattr(model, "lm_head")

    # ----- requests in and out -----------------------------------------------------------------

    def add(self, request: Request) -> Request:
        """Queue a request; it joins the running batch at the next step with a free row. Thread-safe."""
        n = len(request.prompt_ids)
        if n == 0:
            raise ConfigError("prompt is empty: the model needs at least one token to condition on")
        if n > self.max_length or (request.params.max_new_tokens > 0 and n >= self.max_length):
            raise ConfigError(f"prompt of {n} tokens leaves no room in the context of {self.max_length}")
        if request.params.stop and self.tokenizer is None:
            raise ConfigError("stop strings need a tokenizer to read the generated text")
        request.budget = min(request.params.max_new_tokens, self.max_length - n)
        if request.params.seed is not None:
            request.generator = torch.Generator(device=self.device).manual_seed(request.params.seed)
        if self.tokenizer is not None:
            request.text = TextStream(self.tokenizer, request.params.stop)
            request.stop_ids = special_stop_ids(self.tokenizer, request.params.stop)
        with self._lock:
            self.waiting.append(request)
        return request

    def cancel(self, request_id: str) -> None:
        """Stop a request at the next step (a client went away); it ends with finish_reason "cancelled"."""
        with self._lock:
            for request in (*self.running, *self.waiting):
                if request.id == request_id:
                    request.cancelled = True

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def generate(self, request: Request) -> Iterator[Output]:
        """Add one request and step until it finishes, yielding its outputs (for single-caller use)."""
        self.add(request)
        try:
            while not request.finished:
                for out in self.step():
                    if out.request is request:
                        yield out
        finally:
            if not request.finished:
                self.cancel(request.id)
                self.step()

    def abort(self, reason: str = "error") -> list[Output]:
        """End every request now (the engine failed, or the server stops)."""
        with self._lock:
            requests = [*self.running, *self.waiting]
            self.running, self.waiting = [], deque()
        outputs = [self._finish(r, reason) for r in requests if not r.finished]
        self._deliver(outputs)
        return outputs

    # ----- one step --------------------------------------------------------------------------

    def step(self) -> list[Output]:
        """Admit, prefill, decode once; return (and pass to each request's `on_output`) what was produced."""
        outputs: list[Output] = []
        with torch.inference_mode():
            for r in [r for r in self.running if r.cancelled]:
                outputs.append(self._finish(r, "cancelled"))
                self._release(r)
            new: list[Request] = []
            with self._lock:
                while self.waiting and len(self.running) < self.max_batch:
                    r = self.waiting.popleft()
                    if r.cancelled:
                        outputs.append(self._finish(r, "cancelled"))
                    elif r.params.num_beams > 1:
                        new.append(r)  # beam search runs whole, in its own cache, below
                    else:
                        self.running.append(r)
                        new.append(r)
            for r in [r for r in new if r.params.num_beams > 1]:
                outputs.append(self._beam(r))
            new = [r for r in new if r.params.num_beams == 1]
            if new:
                self._prefill(new, outputs)
            if self.running:
                self._decode(outputs)
        self._deliver(outputs)
        return outputs

    def _deliver(self, outputs: list[Output]) -> None:
        for out in outputs:
            if out.request.on_output is not None:
                out.request.on_output(out)

    def _logits(self, idx: Tensor, positions: Tensor, mask: Tensor | None) -> Tensor:
        """Logits [B, V] at each row's final position."""
        if self._split_head:
            hidden = self.model.hidden(idx, self.cache, positions=positions, attention_mask=mask)
            return self.model.lm_head(hidden[:, -1])
        return self.model(idx, self.cache, positions=positions, attention_mask=mask)[:, -1]

    def _prefill(self, new: list[Request], outputs: list[Output]) -> None:
        """All new prompts in one forward, right-padded to the longest: under the causal mask a real
        position never sees padding, and padding written to the cache is masked until overwritten."""
        first = len(self.running) - len(new)
        lengths = [len(r.prompt_ids) for r in new]
        T = max(lengths)
        idx = torch.zeros(len(new), T, dtype=torch.long)
        for i, r in enumerate(new):
            idx[i, :lengths[i]] = torch.tensor(r.prompt_ids)
            self._reset_penalties(first + i, r)
        idx = idx.to(self.device)
        self.cache.prepare(slice(first, first + len(new)), [0] * len(new), T)
        positions = torch.arange(T, device=self.device)
        rows = torch.arange(len(new), device=self.device)
        last = torch.tensor(lengths, device=self.device) - 1
        full = hidden = None
        if self._split_head:  # the vocabulary head on the last positions only, unless the prompt is scored
            hidden = self.model.hidden(idx, self.cache, positions=positions)
            logits = self.model.lm_head(hidden[rows, last])
        else:
            full = self.model(idx, self.cache, positions=positions)
            logits = full[rows, last]
        prompt_logprobs: dict[int, list[TokenLogprob | None]] = {}
        for i, r in enumerate(new):
            r.length = lengths[i]
            if r.prompt_logprobs is not None:
                n = lengths[i] - 1
                row_logits = self.model.lm_head(hidden[i, :n]) if hidden is not None else full[i, :n]
                prompt_logprobs[i] = [None, *self._token_logprobs(row_logits, r.prompt_ids[1:], r.prompt_logprobs)]
        live = [(i, r) for i, r in enumerate(new) if r.budget > 0]
        if live:
            rows = torch.tensor([i for i, _ in live], device=logits.device)
            start = len(outputs)
            self._sample([r for _, r in live], logits[rows], [first + i for i, _ in live], outputs)
            for (i, _), out in zip(live, outputs[start:]):
                out.prompt_logprobs = prompt_logprobs.get(i)
        for i, r in enumerate(new):
            if r.budget == 0:  # scoring only (echo with max_tokens=0)
                outputs.append(self._finish(r, "length", prompt_logprobs=prompt_logprobs.get(i)))
                self._release(r)

    def _decode(self, outputs: list[Output]) -> None:
        """Feed every running request its last sampled token, each at its own position."""
        n = len(self.running)
        starts = [r.length for r in self.running]
        idx = torch.tensor([[r.next_token] for r in self.running], device=self.device)
        positions = torch.tensor(starts, device=self.device)[:, None]
        mask = None
        if any(s != starts[0] for s in starts):
            span = torch.arange(max(starts) + 1, device=self.device)
            mask = (span[None, :] <= positions)[:, None, None, :]
        self.cache.prepare(slice(0, n), starts, 1)
        logits = self._logits(idx, positions, mask)
        for r in self.running:
            r.length += 1
        self._sample(list(self.running), logits, list(range(n)), outputs)

    # ----- choosing tokens and finishing ---------------------------------------------------

    def _penalties(self) -> tuple[Tensor, Tensor]:
        if self._penalty_state is None:
            shape = (self.max_batch, self.config.vocab_size)
            self._penalty_state = (torch.zeros(shape, dtype=torch.bool, device=self.device),
                                   torch.zeros(shape, dtype=torch.int32, device=self.device))
        return self._penalty_state

    def _reset_penalties(self, row: int, r: Request) -> None:
        if r.params.penalized:
            seen, counts = self._penalties()
            seen[row] = False
            counts[row] = 0
            seen[row, torch.tensor(r.prompt_ids, device=self.device)] = True

    def _sample(self, requests: list[Request], logits: Tensor, rows: list[int], outputs: list[Output]) -> None:
        params = [r.params for r in requests]
        seen = counts = None
        if any(p.penalized for p in params):
            index = torch.tensor(rows, device=self.device)
            seen, counts = (t[index] for t in self._penalties())
        tokens = sample_batch(logits, params, [r.generator for r in requests], seen, counts).tolist()
        finished = []
        for i, (r, token) in enumerate(zip(requests, tokens)):
            logprobs = None
            if r.params.logprobs is not None:
                logprobs = self._token_logprobs(logits[i:i + 1], [token], r.params.logprobs)
            out = self._accept(r, rows[i], token, logprobs)
            outputs.append(out)
            if r.finished:
                finished.append(r)
        for r in finished:
            self._release(r)

    def _accept(self, r: Request, row: int, token: int, logprobs: list[TokenLogprob] | None) -> Output:
        if token in r.stop_ids or (r.params.stop_at_eos and token in self.end_ids):
            return self._finish(r, "stop")
        r.output_ids.append(token)
        r.next_token = token
        r.budget -= 1
        if r.params.penalized:
            seen, counts = self._penalties()
            seen[row, token] = True
            counts[row, token] += 1
        text = r.text.push(token) if r.text is not None else ""
        out = Output(r, [token], text, logprobs)
        if r.text is not None and r.text.stopped:
            r.finish_reason = out.finish_reason = "stop"
        elif r.budget == 0 or r.length >= self.max_length:
            out.text += r.text.finish() if r.text is not None else ""
            r.finish_reason = out.finish_reason = "length"
        return out

    def _finish(self, r: Request, reason: str, **extra: object) -> Output:
        text = r.text.finish() if r.text is not None and reason in ("stop", "length") else ""
        r.finish_reason = reason
        return Output(r, [], text, finish_reason=reason, **extra)

    def _release(self, r: Request) -> None:
        """Free a finished request's row; the last row moves into the hole so rows stay contiguous."""
        with self._lock:
            if r not in self.running:
                return
            i, last = self.running.index(r), len(self.running) - 1
            if i != last:
                moved = self.running[last]
                self.cache.move(last, i, moved.length)
                if moved.params.penalized:
                    for t in self._penalties():
                        t[i] = t[last]
                self.running[i] = moved
            self.running.pop()

    def _token_logprobs(self, logits: Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
        """log_softmax of the raw logits [N, V] at `tokens`, with the `top` most likely alternatives."""
        logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        chosen = logp.gather(-1, torch.tensor(tokens, dtype=torch.long, device=logp.device)[:, None])[:, 0].tolist()
        if top > 0:
            values, ids = logp.topk(min(top, logp.shape[-1]), dim=-1)
            alts = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        else:
            alts = [[] for _ in tokens]
        return [TokenLogprob(t, c, a) for t, c, a in zip(tokens, chosen, alts)]

    def _beam(self, r: Request) -> Output:
        """Beam search runs to the end at once in its own cache (it is deterministic, and its rows reorder
        every step, which a shared batch cannot do cheaply)."""
        ends = r.stop_ids | (self.end_ids if r.params.stop_at_eos else set())
        tokens = beam_search(self.model, r.prompt_ids, r.params, ends, max_new=r.budget)
        text = ""
        for token in tokens:
            r.output_ids.append(token)
            text += r.text.push(token) if r.text is not None else ""
            if r.text is not None and r.text.stopped:
                break
        text += r.text.finish() if r.text is not None else ""
        stopped = (r.text is not None and r.text.stopped) or len(tokens) < r.budget
        r.finish_reason = "stop" if stopped else "length"
        return Output(r, list(r.output_ids), text, finish_reason=r.finish_reason)
