"""The inference engine: continuous batching over a preallocated KV cache.

Each `step()` admits waiting requests into free cache rows and prefills them in one batched forward,
then runs one batched decode forward over every running request, each at its own length, with its own
sampling settings, seed, stop strings and token budget. A beam search holds `num_beams` rows and
advances one token per step like everything else. Finished and cancelled requests leave between
steps and free their row at once, so a new request never waits for the slowest one in a batch
(Yu et al. 2022, "Orca"). `lmforge.generate`, `LM.generate/stream/chat`, `lmforge chat` and the HTTP
server all decode through this class.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import ConfigError
from lmforge.infer.beam import BeamSearch
from lmforge.infer.cache import GiB, SlotCache, available_memory, kv_bytes, plan_max_model_len
from lmforge.infer.compiled import CompiledStep
from lmforge.infer.fast import decode_model
from lmforge.infer.recompute import Recompute, TokenCache, keeps_kv_cache
from lmforge.infer.sampling import SamplingParams, sample_batch
from lmforge.infer.text import TextStream, special_stop_ids
from lmforge.model.gpt import causal_mask
from lmforge.tokenizer import Tokenizer

log = logging.getLogger("lmforge.infer")


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
    beam: BeamSearch | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def width(self) -> int:
        """Cache rows it holds: one, or one per beam."""
        return self.params.num_beams


class Engine:
    """Runs many requests through one model at once; see the module docstring.

    Args:
        model: A decoder with `forward(idx, cache, positions=, attention_mask=)` and a `config`; a model whose
            class sets `kv_cache = False` (the LSTM and n-gram baselines) is decoded by recomputing from its
            tokens (`lmforge.infer.recompute`).
        tokenizer: Turns tokens into text and stop strings into stops; without one, outputs carry ids only.
        max_batch: Most cache rows decoded together (a request takes one, a beam search one per beam).
        max_model_len: Most positions (prompt + new tokens) per request. By default the model's context, or
            less where `max_batch` rows of it would not fit a quarter of the free memory.
        eos_id: The end-of-sequence id when there is no tokenizer.
        fast: Decode through `decode_model`'s prepacked view (bf16 on CPU); False uses the model as it is.
        preallocate: Allocate the whole cache now (a server: memory known at start); False grows it as
            requests need, up to `max_batch` × `max_model_len` (one caller decoding short requests).
        compile: Decode through an inductor-compiled step (`lmforge.infer.compiled`): much faster per token,
            20-90 s to compile on first use. Implies `preallocate` (the graph writes the cache in place).
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer | None = None, *, max_batch: int = 16,
                 max_model_len: int | None = None, eos_id: int | None = None, fast: bool = True,
                 preallocate: bool = True, compile: bool = False) -> None:
        if max_batch < 1:
            raise ConfigError(f"max_batch={max_batch} must be at least 1")
        self.recompute = not keeps_kv_cache(model)
        self.source, self.fast, self.tokenizer = model, fast and not self.recompute, tokenizer
        self.model = Recompute(model) if self.recompute else decode_model(model) if self.fast else model
        self.config = model.config
        self.context = self.config.max_position_embeddings
        self.max_batch = max_batch
        self.eos_id = tokenizer.eos_id if tokenizer is not None and eos_id is None else eos_id
        # Tokens that end a sequence: eos, plus e.g. Llama 3's <|eot_id|> from generation_config.json
        self.end_ids: set[int] = set(getattr(tokenizer, "stop_ids", ()) or ())
        if self.eos_id is not None:
            self.end_ids.add(self.eos_id)
        weight = next(model.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        # The vocabulary head on the last position only: scoring every prompt position costs T×vocab for nothing.
        self._split_head = hasattr(model, "hidden") and hasattr(model, "lm_head") and not self.recompute
        self.compile = compile  # as asked; a model without a KV cache or a `hidden` stage decodes eagerly
        compile = compile and self._split_head
        preallocate = preallocate or compile
        self.max_model_len = self._plan(max_model_len, preallocate)
        self.cache_bytes = (8 * max_batch * self.max_model_len if self.recompute
                            else kv_bytes(self.config, max_batch, self.max_model_len, self.dtype))
        log.log(logging.INFO if preallocate else logging.DEBUG, "max_model_len %d (model context %d): KV cache "
                "%.2f GiB for %d rows", self.max_model_len, self.context, self.cache_bytes / GiB, max_batch)
        with torch.inference_mode():
            rows, length = (max_batch, self.max_model_len) if preallocate else (0, 0)
            self.cache = (TokenCache(rows, length, self.device) if self.recompute
                          else SlotCache(self.config, rows, length, self.device, self.dtype))
        self._penalty_state: tuple[Tensor, Tensor] | None = None  # seen [B, V] and counts [B, V], made on first use
        self.running: list[Request] = []
        self.waiting: deque[Request] = deque()
        self._lock = threading.Lock()
        self.compiled = CompiledStep(model, self.cache) if compile else None

    def _plan(self, max_model_len: int | None, preallocate: bool) -> int:
        """The chosen max_model_len, refused where the model or the memory cannot hold it."""
        if max_model_len is None and self.recompute:
            return self.context  # a token cache: 8 bytes a position
        if max_model_len is None:
            planned = plan_max_model_len(self.config, self.max_batch, self.device, self.dtype)
            if planned < 1:
                raise ConfigError(f"not enough free memory for a KV cache of max_batch={self.max_batch} rows; "
                                  "lower max_batch")
            return planned
        if not 0 < max_model_len <= self.context:
            raise ConfigError(f"max_model_len={max_model_len} must be between 1 and the model's context "
                              f"({self.context})")
        if preallocate and not self.recompute:
            wanted = kv_bytes(self.config, self.max_batch, max_model_len, self.dtype)
            free = available_memory(self.device)
            if wanted > free:
                raise ConfigError(f"max_model_len={max_model_len} with max_batch={self.max_batch} needs a "
                                  f"{wanted / GiB:.1f} GiB KV cache; {free / GiB:.1f} GiB is free: lower either")
        return max_model_len

    # ----- requests in and out -----------------------------------------------------------------

    def add(self, request: Request) -> Request:
        """Queue a request; it joins the running batch at the next step with free rows. Thread-safe."""
        n, max_new = len(request.prompt_ids), request.params.max_new_tokens
        if n == 0:
            raise ConfigError("prompt is empty: the model needs at least one token to condition on")
        if n + max_new > self.max_model_len:
            more = "" if self.max_model_len == self.context else (
                f"; the model's context is {self.context}, and a longer max_model_len needs more KV-cache memory")
            raise ConfigError(f"prompt of {n} tokens + max_new_tokens={max_new} needs {n + max_new} positions, "
                              f"more than max_model_len={self.max_model_len}{more}")
        if request.width > self.max_batch:
            raise ConfigError(f"num_beams={request.width} needs {request.width} batch rows; "
                              f"max_batch is {self.max_batch}")
        if request.params.stop and self.tokenizer is None:
            raise ConfigError("stop strings need a tokenizer to read the generated text")
        request.budget = max_new
        if request.params.seed is not None:
            request.generator = torch.Generator(device=self.device).manual_seed(request.params.seed)
        if self.tokenizer is not None:
            request.text = TextStream(self.tokenizer, request.params.stop)
            request.stop_ids = special_stop_ids(self.tokenizer, request.params.stop)
        if request.width > 1:
            ends = request.stop_ids | (self.end_ids if request.params.stop_at_eos else set())
            request.beam = BeamSearch(request.params, ends, max_new)
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
        """Add one request and step until it finishes, yielding its outputs. Requests added by other callers
        advance in the same steps and get their outputs through their own `on_output` (or `generate`)."""
        pending: deque[Output] = deque()
        chained = request.on_output

        def keep(out: Output) -> None:
            pending.append(out)
            if chained is not None:
                chained(out)

        request.on_output = keep
        self.add(request)
        try:
            while True:
                while pending:
                    out = pending.popleft()
                    yield out
                    if out.finish_reason is not None:
                        return
                self.step()
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

    def warm_up(self) -> None:
        """Compile now what the first requests would otherwise wait for: the compiled step's graph for one
        row and the one for several (a server calls this before it listens). No-op when not compiling."""
        if self.compiled is None:
            return
        token = self.eos_id if self.eos_id is not None else 0
        for rows in sorted({1, min(2, self.max_batch)}):
            params = SamplingParams(max_new_tokens=2, temperature=0, stop_at_eos=False)
            requests = [self.add(Request([token], params)) for _ in range(rows)]
            while not all(r.finished for r in requests):
                self.step()

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
                rows = self._rows_before(len(self.running))
                while self.waiting and rows + self.waiting[0].width <= self.max_batch:
                    r = self.waiting.popleft()
                    if r.cancelled:
                        outputs.append(self._finish(r, "cancelled"))
                    else:
                        self.running.append(r)
                        new.append(r)
                        rows += r.width
            if new:
                self._reserve(rows)
                if self.fast:  # weights may have changed since the last request (an optimizer step)
                    self.model = decode_model(self.source)
                if self.compiled is not None and self.compiled.stale:
                    self.compiled = CompiledStep(self.source, self.cache)
                self._prefill(new, outputs)
            if self.running:
                self._decode(outputs)
        self._deliver(outputs)
        return outputs

    def _deliver(self, outputs: list[Output]) -> None:
        for out in outputs:
            if out.request.on_output is not None:
                out.request.on_output(out)

    def _rows_before(self, i: int) -> int:
        """The first cache row of running request i (rows are contiguous, in running order)."""
        return sum(r.width for r in self.running[:i])

    def _reserve(self, rows: int) -> None:
        """Grow a cache that was not preallocated to hold `rows` rows and the longest running request
        (doubling, so a caller's slowly growing requests reallocate only a few times)."""
        need = max(len(r.prompt_ids) + r.budget + len(r.output_ids) for r in self.running)
        if rows <= self.cache.slots and need <= self.cache.max_length:
            return
        slots = min(self.max_batch, max(rows, 2 * self.cache.slots))
        length = min(self.max_model_len, max(need, 2 * self.cache.max_length))
        self.cache.resize(max(slots, self.cache.slots), max(length, self.cache.max_length))

    def _logits(self, idx: Tensor, positions: Tensor, mask: Tensor | None) -> Tensor:
        """Logits [B, V] at each row's final position."""
        if self._split_head:
            hidden = self.model.hidden(idx, self.cache, positions=positions, attention_mask=mask)
            return self.model.lm_head(hidden[:, -1])
        return self.model(idx, self.cache, positions=positions, attention_mask=mask)[:, -1]

    def _compiled_logits(self, idx: Tensor, positions: Tensor) -> Tensor | None:
        """The compiled step's logits; None (and eager from now on) where the model does not compile."""
        try:
            return self.compiled(idx, positions[:, 0])
        except Exception as error:  # inductor refusing a model (e.g. int4 layers) is not the user's error
            log.warning("decoding eagerly: compiling the decode step failed (%s: %s)",
                        type(error).__name__, str(error).splitlines()[0] if str(error) else "")
            self.compiled = None
            return None

    def _prefill(self, new: list[Request], outputs: list[Output]) -> None:
        """All new prompts in one forward, one row each, right-padded to the longest: under the causal mask a
        real position never sees padding, and padding written to the cache is masked until overwritten. A
        beam search's prompt row is then copied to each of its beams' rows."""
        first = self._rows_before(len(self.running) - len(new))
        lengths = [len(r.prompt_ids) for r in new]
        T = max(lengths)
        idx = torch.zeros(len(new), T, dtype=torch.long)
        for i, r in enumerate(new):
            idx[i, :lengths[i]] = torch.tensor(r.prompt_ids)
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
        starts = [first + sum(r.width for r in new[:i]) for i in range(len(new))]
        for i in reversed(range(len(new))):  # back to front: a row is moved before anything lands on it
            r, row = new[i], starts[i]
            if row != first + i:
                self.cache.move(first + i, row, lengths[i])
            if r.width > 1:
                self.cache.move(row, slice(row + 1, row + r.width), lengths[i])
            else:
                self._reset_penalties(row, r)
        prompt_logprobs: dict[int, list[TokenLogprob | None]] = {}
        for i, r in enumerate(new):
            r.length = lengths[i]
            if r.prompt_logprobs is not None:
                n = lengths[i] - 1
                row_logits = self.model.lm_head(hidden[i, :n]) if hidden is not None else full[i, :n]
                prompt_logprobs[i] = [None, *self._token_logprobs(row_logits, r.prompt_ids[1:], r.prompt_logprobs)]
        scoring = [i for i, r in enumerate(new) if r.budget == 0]  # echo with max_tokens=0
        live = [i for i, r in enumerate(new) if r.budget > 0 and r.beam is None]
        finished = [new[i] for i in scoring]
        for i in [i for i, r in enumerate(new) if r.budget > 0 and r.beam is not None]:
            finished += self._beam_step(new[i], logits[i:i + 1], starts[i], outputs)
        if live:
            start = len(outputs)
            finished += self._sample([new[i] for i in live], logits[torch.tensor(live, device=logits.device)],
                                     [starts[i] for i in live], outputs)
            for i, out in zip(live, outputs[start:]):
                out.prompt_logprobs = prompt_logprobs.get(i)
        for i in scoring:
            outputs.append(self._finish(new[i], "length", prompt_logprobs=prompt_logprobs.get(i)))
        for r in finished:
            self._release(r)

    def _decode(self, outputs: list[Output]) -> None:
        """Feed every running row its last token (each beam its own), each at its request's position."""
        ids: list[int] = []
        starts: list[int] = []
        for r in self.running:
            feed = r.beam.feed if r.beam is not None else [r.next_token]
            ids += feed
            starts += [r.length] * len(feed)
        idx = torch.tensor(ids, device=self.device)[:, None]
        positions = torch.tensor(starts, device=self.device)[:, None]
        self.cache.prepare(slice(0, len(ids)), starts, 1)
        logits = self._compiled_logits(idx, positions) if self.compiled is not None else None
        if logits is None:
            mask = None
            if any(s != starts[0] for s in starts):  # rows at different lengths: each sees only its own positions
                keys = torch.arange(max(starts) + 1, device=self.device)[None, :]
                mask = causal_mask(positions, keys, getattr(self.config, "sliding_window", None))[:, None, None, :]
            logits = self._logits(idx, positions, mask)
        requests, singles, rows, row = list(self.running), [], [], 0
        finished: list[Request] = []
        for r in requests:
            r.length += 1
            if r.beam is not None:
                finished += self._beam_step(r, logits[row:row + r.width], row, outputs)
            else:
                singles.append(r)
                rows.append(row)
            row += r.width
        if singles:
            finished += self._sample(singles, logits[torch.tensor(rows, device=logits.device)], rows, outputs)
        for r in finished:
            self._release(r)

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

    def _sample(self, requests: list[Request], logits: Tensor, rows: list[int], outputs: list[Output]
                ) -> list[Request]:
        """Draw each request's next token from its row of `logits`; returns the requests that finished."""
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
            outputs.append(self._accept(r, rows[i], token, logprobs))
            if r.finished:
                finished.append(r)
        return finished

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
        elif r.budget == 0 or r.length >= self.max_model_len:
            out.text += r.text.finish() if r.text is not None else ""
            r.finish_reason = out.finish_reason = "length"
        return out

    def _beam_step(self, r: Request, logits: Tensor, row: int, outputs: list[Output]) -> list[Request]:
        """Advance a beam search one token; its rows take their new beams' caches. The reply comes whole at
        the end (a beam's tokens are not final until the search is), as one output; returns [r] then."""
        order = r.beam.step(logits)
        if not r.beam.done:
            self.cache.reorder(row, torch.tensor(order, device=self.device), r.length)
            return []
        tokens = r.beam.best()
        text = ""
        for token in tokens:
            r.output_ids.append(token)
            text += r.text.push(token) if r.text is not None else ""
            if r.text is not None and r.text.stopped:
                break
        text += r.text.finish() if r.text is not None else ""
        stopped = (r.text is not None and r.text.stopped) or len(tokens) < r.budget
        r.finish_reason = "stop" if stopped else "length"
        outputs.append(Output(r, list(r.output_ids), text, finish_reason=r.finish_reason))
        return [r]

    def _finish(self, r: Request, reason: str, **extra: object) -> Output:
        text = r.text.finish() if r.text is not None and reason in ("stop", "length") else ""
        r.finish_reason = reason
        return Output(r, [], text, finish_reason=reason, **extra)

    def _release(self, r: Request) -> None:
        """Free a finished request's rows. Rows stay contiguous: the last request moves into the hole when it
        is as wide, else every later request shifts down."""
        with self._lock:
            if r not in self.running:
                return
            i = self.running.index(r)
            row, last = self._rows_before(i), self.running[-1]
            if last is not r and last.width == r.width:
                self._move(last, self._rows_before(len(self.running) - 1), row)
                self.running[i] = last
                self.running.pop()
                return
            self.running.pop(i)
            for moved in self.running[i:]:
                self._move(moved, row + r.width, row)
                row += moved.width

    def _move(self, r: Request, src: int, dst: int) -> None:
        """Copy a request's cache rows (and penalty state) from row `src` on to row `dst` on."""
        for j in range(r.width):
            self.cache.move(src + j, dst + j, r.length)
        if r.beam is None and r.params.penalized:
            for t in self._penalties():
                t[dst] = t[src]

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
