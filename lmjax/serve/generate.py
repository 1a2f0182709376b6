"""KV-cached generation for the GPT family: prefill, one-token decode steps, sampling.

A prompt is prefilled once (its keys and values written into a preallocated cache);
every further token costs one decode step over the cache instead of a forward pass
over the whole sequence. Rows of a batch have their own lengths, sampling options and
seeds, so prompts of different lengths generate together; the serving engine
(lmjax/serve/engine.py) drives the same `Decoder` one step at a time.
"""

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.models import GPT
from lmjax.models.transformer import init_cache

# Bounds on what one request may ask for: what the compiled sampler can represent (int32
# top_k, uint32 seeds, finite floats) and what a shared server can afford per token.
MAX_NEW_TOKENS = 65_536  # far past any context window served here; the engine stops there
MAX_TEMPERATURE = 2.0  # OpenAI's range; beyond it a trained model's samples are noise
MAX_TOP_K = 1_000_000  # above any vocabulary; a top_k at or above the vocabulary keeps all
SEED_LIMIT = 2**32  # seeds are uint32
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # each stop string's length in characters


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request samples. temperature 0 is greedy; top_k 0 and top_p 1 are off.

    Every field is checked against the bounds above (ValueError naming the field), so a
    request that passes never fails in the compiled sampler."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        # Comparisons reject NaN too: every one of them is False for NaN.
        ranges = {
            "max_new_tokens": (1 <= self.max_new_tokens <= MAX_NEW_TOKENS,
                               f"1 to {MAX_NEW_TOKENS}"),
            "temperature": (0 <= self.temperature <= MAX_TEMPERATURE,
                            f"0 (greedy) to {MAX_TEMPERATURE}"),
            "top_k": (0 <= self.top_k <= MAX_TOP_K, f"0 (off) to {MAX_TOP_K}"),
            "top_p": (0 < self.top_p <= 1, "above 0, at most 1 (off)"),
            "seed": (0 <= self.seed < SEED_LIMIT, f"0 to {SEED_LIMIT - 1}"),
        }
        for name, (ok, allowed) in ranges.items():
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range: give {allowed}")
        if not isinstance(self.stop, tuple) or not all(isinstance(x, str) for x in self.stop):
            raise ValueError(f"stop={self.stop!r}: give a tuple of strings")
        if problem := stop_problem(self.stop):
            raise ValueError(f"stop: {problem}")


def stop_problem(stop: Sequence[str]) -> str | None:
    """What is too large about a list of stop strings, or None if it is within bounds."""
    if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stop):
        return (f"give at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} "
                f"characters each (got {len(stop)}, the longest "
                f"{max(map(len, stop), default=0)} characters)")
    return None


def sample_tokens(logits: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array, seeds: jax.Array, counters: jax.Array) -> jax.Array:
    """One token per row. logits (batch, vocab); the other arguments are (batch,).

    Row b draws with key fold_in(key(seeds[b]), counters[b]), so a request's tokens
    depend on its own seed and position only, never on which rows it is batched with.
    """
    vocab = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    ordered = jnp.sort(scaled, axis=-1)[:, ::-1]  # (batch, vocab), descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)  # (batch, 1)
    ordered = jnp.where(ordered >= kth, ordered, -jnp.inf)
    # top-p: keep the smallest prefix of the sorted tokens whose mass reaches top_p.
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    kept = jnp.where(before < top_p[:, None], ordered, jnp.inf)
    cutoff = jnp.min(kept, axis=-1, keepdims=True)  # smallest kept logit
    masked = jnp.where((scaled >= kth) & (scaled >= cutoff), scaled, -jnp.inf)

    def draw(seed, counter, row):
        return jax.random.categorical(jax.random.fold_in(jax.random.key(seed), counter), row)

    sampled = jax.vmap(draw)(seeds, counters, masked)
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def _batch_axis(x: jax.Array) -> int:
    """Cache arrays are (batch, heads, max_length, head_dim), after a layer axis when the
    layers are scanned: the batch axis is fourth from the end in either layout."""
    return x.ndim - 4


class Decoder:
    """Compiled prefill and decode steps of one GPT over a cache of `batch` rows.

    `prepare` maps the stored parameters to the ones the model applies, inside the
    compiled function (int8 weights are dequantised there, see quant.py).
    """

    def __init__(self, model: GPT, prepare: Callable = lambda p: p):
        self.model = model
        self.config = model.config
        self._prepare = prepare
        self.prefill = jax.jit(self._prefill, donate_argnums=1)
        self.decode = jax.jit(self._decode, donate_argnums=1)
        self.sample = jax.jit(sample_tokens)
        self.decode_sample = jax.jit(self._decode_sample, donate_argnums=1)

    def new_cache(self, batch: int):
        return init_cache(self.config, batch)

    def _forward(self, params, cache, tokens, positions):
        return self.model.apply({"params": self._prepare(params)}, tokens, cache=cache,
                                positions=positions)

    def _prefill(self, params, cache, first_row, tokens, starts, counts):
        """Writes tokens (R, T) into cache rows first_row..first_row+R-1 at positions
        starts + 0..counts-1 (starts, counts: (R,)).

        Returns logits of each row's last real token (R, vocab) and the cache. Padding
        tokens (t >= counts) get a position past the cache, so their writes are dropped.
        """
        steps = jnp.arange(tokens.shape[1])
        positions = starts[:, None] + steps
        positions = jnp.where(steps < counts[:, None], positions, self.config.block_size)
        rows = tokens.shape[0]
        part = jax.tree.map(
            lambda x: jax.lax.dynamic_slice_in_dim(x, first_row, rows, _batch_axis(x)), cache)
        logits, part = self._forward(params, part, tokens, positions)
        cache = jax.tree.map(lambda full, new: jax.lax.dynamic_update_slice_in_dim(
            full, new, first_row, _batch_axis(full)), cache, part)
        last = jnp.take_along_axis(logits, (counts - 1)[:, None, None], axis=1)[:, 0]
        return last, cache

    def _decode(self, params, cache, tokens, lengths, active):
        """One token per row: tokens (batch,) at positions `lengths`; rows with
        active=False write nothing. Returns logits (batch, vocab) and the cache."""
        positions = jnp.where(active, lengths, self.config.block_size)[:, None]
        logits, cache = self._forward(params, cache, tokens[:, None], positions)
        return logits[:, 0], cache

    def _decode_sample(self, params, cache, tokens, lengths, active, *sampling):
        """A decode step and `sample_tokens(logits, *sampling)` in one compiled call."""
        logits, cache = self._decode(params, cache, tokens, lengths, active)
        return sample_tokens(logits, *sampling), cache


def bucket(length: int, smallest: int = 16) -> int:
    """Prefill lengths are padded to powers of two, so a few compiled shapes serve all."""
    size = smallest
    while size < length:
        size *= 2
    return size


class StopChecker:
    """Finds the first stop string in a text that grows token by token; built once per
    request. Each stop string has a KMP automaton that every new character advances, so a
    token costs (stop strings) x (its characters), however long the text already is; the
    automata's states also say how much of the text's end could begin a stop string."""

    def __init__(self, stop: Sequence[str]):
        self.stop = tuple(s for s in stop if s)
        self.longest = max(map(len, self.stop), default=0)
        self._fallback = [_prefix_function(s) for s in self.stop]
        self._states = [0] * len(self.stop)  # characters of each stop string matched
        self._text = ""  # the text the states have read
        self.at: int | None = None  # where the first stop string starts, once found

    def find(self, text: str) -> int | None:
        """Where the first stop string starts in `text` (all the text so far), or None."""
        if self.at is not None or not self.stop:
            return self.at
        start = len(self._text)
        if not text.startswith(self._text):
            # A tokenizer may rewrite the text's end as tokens arrive (an incomplete UTF-8
            # sequence decodes to U+FFFD until its last byte): read again from where a
            # stop string could begin in the rewritten part.
            start = max(_shared_prefix(self._text, text) - self.longest + 1, 0)
            self._states = [0] * len(self.stop)
        self._text = text
        for end in range(start, len(text)):
            self.at = self._advance(text[end], end)
            if self.at is not None:
                break
        return self.at

    def _advance(self, char: str, end: int) -> int | None:
        found = None
        for i, (stop, fallback) in enumerate(zip(self.stop, self._fallback, strict=True)):
            state = self._states[i]
            while state and stop[state] != char:
                state = fallback[state - 1]
            state = self._states[i] = state + (stop[state] == char)
            if state == len(stop):
                start = end - len(stop) + 1  # the longest match ending here starts first
                found = start if found is None else min(found, start)
                self._states[i] = fallback[state - 1]
        return found

    def held(self) -> int:
        """Characters at the end of the text read that could begin a stop string: not
        safe to stream until the next tokens resolve them."""
        return max(self._states, default=0) if self.at is None else 0


def _prefix_function(s: str) -> list[int]:
    """KMP's table: [i] is the length of the longest proper prefix of s[:i + 1] that is
    also its suffix (where a match continues after a mismatch)."""
    table, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = table[k - 1]
        k += s[i] == s[k]
        table[i] = k
    return table


def _shared_prefix(a: str, b: str) -> int:
    """The length of the longest common prefix of a and b (bisection on startswith)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if b.startswith(a[:middle]):
            low = middle
        else:
            high = middle - 1
    return low


@dataclasses.dataclass
class Generation:
    tokens: list[int]
    text: str | None  # set when a tokenizer was given
    finish_reason: str  # "length" or "stop"


def _pad_prompts(prompts: Sequence[Sequence[int]], width: int) -> np.ndarray:
    out = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        out[i, : len(p)] = p
    return out


def generate(decoder: Decoder, params, prompts: Sequence[Sequence[int]],
             options: SamplingParams | Sequence[SamplingParams], *,
             detokenize: Callable[[list[int]], str] | None = None) -> list[Generation]:
    """Continues each prompt (token ids; lengths may differ) with its own options.

    A row whose context fills the block keeps its last half block and goes on (the
    prompt is prefilled again from there), as nanoGPT crops its context.
    """
    batch = len(prompts)
    opts = [options] * batch if isinstance(options, SamplingParams) else list(options)
    if len(opts) != batch:
        raise ValueError(f"{len(opts)} sampling options for {batch} prompts")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt is empty; give at least one token")
    block = decoder.config.block_size
    contexts = [list(p)[-block:] for p in prompts]
    cache = decoder.new_cache(batch)
    lengths = np.array([len(c) for c in contexts], np.int32)
    tokens = _pad_prompts(contexts, bucket(int(lengths.max())))
    logits, cache = decoder.prefill(params, cache, 0, tokens, np.zeros(batch, np.int32),
                                    lengths)
    state = _RowState(opts, detokenize)
    while True:
        new = np.asarray(decoder.sample(logits, *state.sampling_arrays()))
        state.append(new)
        if state.all_done():
            break
        for b in np.flatnonzero(lengths >= block):  # context full: keep the last half
            keep = (list(prompts[b]) + state.out[b])[-(block // 2):-1]  # new[b] comes next
            _, cache = decoder.prefill(params, cache, int(b),
                                       _pad_prompts([keep], bucket(len(keep))),
                                       np.zeros(1, np.int32), np.array([len(keep)], np.int32))
            lengths[b] = len(keep)
        logits, cache = decoder.decode(params, cache, new, lengths, ~state.done)
        lengths = lengths + 1
    return state.results()


class _RowState:
    """Per-row outputs, stop checks and sampling arrays of a batched generation."""

    def __init__(self, opts: list[SamplingParams], detokenize):
        self.opts = opts
        self.detokenize = detokenize
        if detokenize is None and any(o.stop for o in opts):
            raise ValueError("stop strings need a tokenizer to compare text: pass detokenize")
        self.stops = [StopChecker(o.stop) for o in opts]
        self.out: list[list[int]] = [[] for _ in opts]
        self.text: list[str | None] = [None] * len(opts)
        self.reason = ["length"] * len(opts)
        self.done = np.zeros(len(opts), bool)

    def sampling_arrays(self):
        o = self.opts
        return (np.array([x.temperature for x in o], np.float32),
                np.array([x.top_k for x in o], np.int32),
                np.array([x.top_p for x in o], np.float32),
                np.array([x.seed for x in o], np.uint32),
                np.array([len(t) for t in self.out], np.int32))

    def append(self, new: np.ndarray) -> None:
        for b, token in enumerate(new):
            if self.done[b]:
                continue
            self.out[b].append(int(token))
            cut = self._cut(b)
            if cut is not None:
                self.text[b], self.reason[b], self.done[b] = cut, "stop", True
            elif len(self.out[b]) >= self.opts[b].max_new_tokens:
                self.done[b] = True

    def _cut(self, b: int) -> str | None:
        """Row b's text before its first stop string, or None if none occurred yet."""
        if not self.stops[b].stop:
            return None
        text = self.detokenize(self.out[b])
        at = self.stops[b].find(text)
        return None if at is None else text[:at]

    def all_done(self) -> bool:
        return bool(self.done.all())

    def results(self) -> list[Generation]:
        results = []
        for b, tokens in enumerate(self.out):
            text = self.text[b]
            if text is None and self.detokenize is not None:
                text = self.detokenize(tokens)
            results.append(Generation(tokens, text, self.reason[b]))
        return results
