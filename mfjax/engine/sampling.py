"""Next-token sampling for many rows (agents) at once, inside a jitted decode loop.

The maths follows transformers' ``generate`` exactly, in its order:

    repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw

with removed tokens set to ``-inf``. Two choices keep this cheap at B=1024 rows and V=152k:

* The repetition penalty gathers the logits at the history ids, penalises them and scatters them back:
  O(B*T) work and memory, never a [B, V] mask.
* Top-k uses ``jax.lax.top_k`` (a selection, not a full sort of V), and top-p / min-p then run on the k
  candidates only. That is the same as running them on the whole vocabulary, because top-k runs first:
  every other token already holds ``-inf``, i.e. probability exactly 0, so it adds nothing to the softmax
  normaliser or to the cumulative sums and can never survive. The draw itself is then a categorical over
  the k candidates (k Gumbel draws per row instead of V). Without top-k, top-p needs a full sort, as in HF.

Every filter is expressed as a per-row *cutoff logit*: a token survives iff its logit is >= the cutoff.
This holds because each filter keeps an upper set of the logits (top-k: the k largest; top-p: the
largest tokens up to the mass; min-p: probabilities above a bound, and probabilities are monotone in the
logits). One difference from HF, only under exact float ties: where HF's sort order decides which of
several *equal* logits at the top-p / min-p boundary survive, a cutoff keeps all of them.

Per-row PRNG keys (see :func:`row_keys`) make a row's draw depend only on its own key, not on which other
rows share the batch or where it sits.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

# Values ``transformers`` falls back to for generation fields that neither the checkpoint's
# generation_config.json nor the ``generate`` call sets (``GenerationConfig._get_default_generation_params``
# in transformers 5; the class defaults in transformers 4). Note top_k=50: a ``generate(do_sample=True)``
# call that does not pass top_k samples from the 50 best tokens, unless the checkpoint says otherwise.
HF_FALLBACK_GENERATION = {
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "min_p": None,
    "repetition_penalty": 1.0,
}

# Generation fields that change the sampled distribution but are not implemented here, each with the
# predicate under which it is harmless. Anything else is refused rather than silently ignored.
_UNSUPPORTED_IF = {
    "num_beams": lambda v: v in (None, 1),
    "typical_p": lambda v: v is None or v >= 1.0,
    "epsilon_cutoff": lambda v: not v,
    "eta_cutoff": lambda v: not v,
    "top_h": lambda v: v is None,
    "no_repeat_ngram_size": lambda v: not v,
    "encoder_repetition_penalty": lambda v: v in (None, 1.0),
    "guidance_scale": lambda v: v in (None, 1.0),
    "sequence_bias": lambda v: not v,
    "bad_words_ids": lambda v: not v,
    "suppress_tokens": lambda v: not v,
}


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to turn logits into a token; frozen and hashable, so it can be a static ``jax.jit`` argument.

    Attributes:
      temperature: divides the logits; ``None`` or 0 means greedy (argmax of the penalised logits, no
        other warper, as HF's ``do_sample=False``).
      top_k: keep the k largest logits (ties with the k-th kept, as HF); ``None`` or 0 = off.
      top_p: nucleus mass in (0, 1]; 1.0 = off. HF semantics: sort ascending, drop tokens whose cumulative
        probability is <= 1 - top_p, always keep the most probable one.
      repetition_penalty: HF's multiplicative penalty on every token id seen in the row's history;
        1.0 = off.
      min_p: drop tokens whose probability is below ``min_p`` times the top probability; ``None`` = off.

    The field defaults switch every filter off. They are *not* HF's fallbacks (HF applies top_k=50 when
    nothing sets it): use :meth:`from_generation_config` to resolve settings the way ``generate`` does.
    Equal settings compare (and hash) equal after normalisation (0 -> None), so they share a compile.
    """

    temperature: Optional[float] = 1.0
    top_k: Optional[int] = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    min_p: Optional[float] = None

    def __post_init__(self):
        # Normalise so that equivalent settings are equal (one jit cache entry, one meaning).
        temperature = None if not self.temperature else float(self.temperature)
        top_k = None if not self.top_k else int(self.top_k)
        top_p = 1.0 if self.top_p is None else float(self.top_p)
        penalty = 1.0 if self.repetition_penalty is None else float(self.repetition_penalty)
        min_p = None if not self.min_p else float(self.min_p)
        if temperature is not None and temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {penalty}")
        if min_p is not None and not 0.0 <= min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {min_p}")
        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "top_k", top_k)
        object.__setattr__(self, "top_p", top_p)
        object.__setattr__(self, "repetition_penalty", penalty)
        object.__setattr__(self, "min_p", min_p)

    @property
    def is_greedy(self) -> bool:
        """True when tokens are the argmax of the (penalised) logits rather than a draw."""
        return self.temperature is None

    @classmethod
    def from_generation_config(
        cls, generation_config: Optional[Mapping[str, Any]] = None, **overrides: Any
    ) -> "SamplingConfig":
        """Resolves sampling settings the way HF ``generate`` does.

        Precedence, lowest first: HF's fallbacks (:data:`HF_FALLBACK_GENERATION`, notably top_k=50), then
        the checkpoint's ``generation_config.json`` (``generation_config``; ``None`` values there do not
        override), then the keyword arguments of the ``generate`` call (``overrides``). ``do_sample``
        False after resolution means greedy. Fields that would change the distribution but are not
        implemented are refused.

        Args:
          generation_config: the parsed generation_config.json of the checkpoint, or None.
          **overrides: what the ``generate`` call passes (do_sample, temperature, top_k, top_p, min_p,
            repetition_penalty).
        """
        settings = dict(HF_FALLBACK_GENERATION)
        for source in (generation_config or {}, overrides):
            for name, value in source.items():
                if name in _UNSUPPORTED_IF and not _UNSUPPORTED_IF[name](value):
                    raise ValueError(f"generation setting {name}={value!r} is not supported by mfjax sampling")
                if name in settings and value is not None:
                    settings[name] = value
        do_sample = settings.pop("do_sample")
        if not do_sample:
            settings["temperature"] = None
        return cls(**settings)


def apply_repetition_penalty(
    logits: jax.Array, history: jax.Array, history_valid: jax.Array, penalty: float | jax.Array
) -> jax.Array:
    """HF's ``RepetitionPenaltyLogitsProcessor`` for a batch of rows, in O(B*T) memory.

    For each token id present in a row's valid history, its logit becomes ``logit * penalty`` when
    negative and ``logit / penalty`` otherwise, once, however often the id repeats.

    Implemented as gather at the history ids -> penalise -> scatter back. Repeated ids gather the same
    original logit and so write the same value, which makes the scatter order irrelevant. Invalid slots
    (and ids outside [0, V), which HF also ignores) are sent to index V, out of bounds, and the scatter
    drops them.

    To match HF ``generate``, ``history`` holds the prompt and the tokens generated so far (HF penalises
    every id in ``input_ids``). One deliberate difference: in a left-padded HF batch the pad id sits in
    ``input_ids`` and is penalised too, so a row's logits depend on its batch-mates' lengths; here padding
    is marked invalid and ignored, so they do not.

    Args:
      logits: [B, V] float; returned as float32.
      history: [B, T] int token ids.
      history_valid: [B, T] bool; False slots (padding, not yet generated) change nothing.
      penalty: scalar > 0 (1.0 = no change).

    Returns:
      [B, V] float32 penalised logits.
    """
    logits = jnp.asarray(logits, jnp.float32)
    vocab = logits.shape[-1]
    history = jnp.asarray(history, jnp.int32)
    valid = jnp.asarray(history_valid, bool) & (history >= 0) & (history < vocab)
    gathered = jnp.take_along_axis(logits, jnp.clip(history, 0, vocab - 1), axis=-1)  # [B, T]
    penalised = jnp.where(gathered < 0, gathered * penalty, gathered / penalty)
    target = jnp.where(valid, history, vocab)
    rows = jnp.arange(logits.shape[0], dtype=jnp.int32)[:, None]
    return logits.at[rows, target].set(penalised, mode="drop")


def _warp_inputs(logits, history, history_valid, cfg: SamplingConfig) -> jax.Array:
    """Repetition penalty then temperature (the latter only when sampling), on the full vocabulary."""
    x = jnp.asarray(logits, jnp.float32)
    if cfg.repetition_penalty != 1.0:
        if history is None or history_valid is None:
            raise ValueError("repetition_penalty != 1 needs history and history_valid")
        x = apply_repetition_penalty(x, history, history_valid, cfg.repetition_penalty)
    if not cfg.is_greedy and cfg.temperature != 1.0:
        # Division, not multiplication by 1/T: bit-identical to HF's TemperatureLogitsWarper.
        x = x / cfg.temperature
    return x


def _top_p_cutoff(desc, extra_count, extra_value, top_p):
    """Smallest logit surviving HF top-p among the candidates ``desc`` [B, C] (sorted descending).

    ``extra_count`` [B] tokens outside ``desc`` also survive earlier filters, all with logit
    ``extra_value`` [B] (the ties at the k-th logit that top-k keeps); they hold the lowest logits, so they
    come first in HF's ascending order and start the cumulative sum. All other tokens are -inf and carry
    no mass.

    Written with reductions and a reverse cumulative sum rather than slices or flips of ``desc``:
    XLA:CPU turns a top-k whose values are sliced into a full sort of the vocabulary.
    """
    top = jnp.max(desc, axis=-1)
    weights = jnp.exp(desc - top[:, None])
    # The guard keeps rows without extras (extra_value may be -inf there) free of 0 * nan.
    extra_weight = jnp.where(extra_count > 0, extra_count * jnp.exp(extra_value - top), 0.0)
    norm = jnp.sum(weights, axis=-1) + extra_weight
    # HF's ascending cumulative mass at each candidate = the extras + this and every smaller candidate.
    cumulative = (extra_weight / norm)[:, None] + jax.lax.cumsum(weights / norm[:, None], axis=1, reverse=True)
    remove = cumulative <= 1.0 - top_p
    remove = remove & (jnp.arange(desc.shape[-1]) > 0)[None, :]  # always keep the most probable token
    # Cumulative sums of non-negative terms never decrease, so the removed tokens are a prefix of the
    # ascending order and the survivors are exactly those >= the smallest surviving logit.
    return jnp.min(jnp.where(remove, jnp.inf, desc), axis=-1)


def _min_p_cutoff(cands, extra_count, extra_value, cutoff, min_p):
    """Smallest logit surviving HF min-p among the candidates [B, C] already above ``cutoff`` [B]."""
    kept = cands >= cutoff[:, None]
    top = jnp.max(cands, axis=-1, keepdims=True)
    weights = jnp.where(kept, jnp.exp(cands - top), 0.0)
    extra_kept = (extra_count > 0) & (extra_value >= cutoff)
    extra_weight = jnp.where(extra_kept, extra_count * jnp.exp(extra_value - top[:, 0]), 0.0)
    probs = weights / (jnp.sum(weights, axis=-1) + extra_weight)[:, None]
    survive = kept & (probs >= min_p * jnp.max(probs, axis=-1, keepdims=True))
    return jnp.min(jnp.where(survive, cands, jnp.inf), axis=-1)


def _candidates(x: jax.Array, cfg: SamplingConfig):
    """Per-row cutoff logit [B] after top-k / top-p / min-p, plus the top-k candidates when top-k is on.

    Returns ``(cutoff, cand_values, cand_ids)``; the last two are None without top-k.
    """
    batch, vocab = x.shape
    cutoff = jnp.full((batch,), -jnp.inf, jnp.float32)
    no_extra = jnp.zeros((batch,), jnp.float32)
    cand_values = cand_ids = None
    if cfg.top_k is not None:
        k = min(cfg.top_k, vocab)
        cand_values, cand_ids = jax.lax.top_k(x, k)  # descending
        # min, not cand_values[:, -1]: XLA:CPU rewrites a top-k whose values are sliced into a full sort
        # of the vocabulary (measured 70x slower at V=49k); both give the k-th largest logit.
        cutoff = jnp.min(cand_values, axis=-1)
        # HF keeps every token equal to the k-th logit; count those that lax.top_k left out.
        extra_count = (jnp.sum(x >= cutoff[:, None], axis=-1) - k).astype(jnp.float32)
        extra_value = cutoff
        desc = cand_values
    else:
        extra_count, extra_value = no_extra, cutoff
        desc = -jnp.sort(-x, axis=-1) if cfg.top_p < 1.0 else None
    if cfg.top_p < 1.0:
        cutoff = jnp.maximum(cutoff, _top_p_cutoff(desc, extra_count, extra_value, cfg.top_p))
    if cfg.min_p is not None:
        # Without top-k or top-p, min-p needs no sort: it runs on the unsorted vocabulary.
        cands = x if desc is None else desc
        cutoff = jnp.maximum(cutoff, _min_p_cutoff(cands, extra_count, extra_value, cutoff, cfg.min_p))
    return cutoff, cand_values, cand_ids


def process_logits(
    logits: jax.Array,
    history: Optional[jax.Array],
    history_valid: Optional[jax.Array],
    cfg: SamplingConfig,
) -> jax.Array:
    """The logits HF ``generate`` samples from: penalty -> temperature -> top-k -> top-p -> min-p.

    Removed tokens hold ``-inf``. For a greedy config only the repetition penalty applies (HF applies no
    warper when ``do_sample=False``). ``history`` / ``history_valid`` ([B, T]) may be None when the
    penalty is off.

    Args:
      logits: [B, V] float.
      history: [B, T] int token ids, or None.
      history_valid: [B, T] bool, or None.
      cfg: static sampling settings.

    Returns:
      [B, V] float32.
    """
    x = _warp_inputs(logits, history, history_valid, cfg)
    if cfg.is_greedy or (cfg.top_k is None and cfg.top_p >= 1.0 and cfg.min_p is None):
        return x
    cutoff, _, _ = _candidates(x, cfg)
    return jnp.where(x < cutoff[:, None], -jnp.inf, x)


def _categorical_rows(keys: jax.Array, logits: jax.Array) -> jax.Array:
    """One categorical draw per row, each from its own key: a row's draw ignores the other rows."""
    return jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, logits)


def sample_tokens(
    logits: jax.Array,
    keys: jax.Array,
    cfg: SamplingConfig,
    history: Optional[jax.Array] = None,
    history_valid: Optional[jax.Array] = None,
) -> jax.Array:
    """Draws one token per row from :func:`process_logits`' distribution (argmax when greedy).

    With top-k on, the draw is a categorical over the k candidates only (O(B*k) random numbers). In the
    measure-zero case where the k-th logit is tied with tokens beyond k, those extra tied tokens (which
    HF could draw) are not drawn here; :func:`process_logits` still keeps them, as HF does.

    Greedy ties resolve to the lowest token id, as torch.argmax in HF.

    Args:
      logits: [B, V] float.
      keys: [B, 2] uint32 raw keys or [B] typed keys, one per row (see :func:`row_keys`); unused when greedy.
      cfg: static sampling settings.
      history: [B, T] int token ids for the repetition penalty, or None when it is off.
      history_valid: [B, T] bool, or None.

    Returns:
      [B] int32 token ids.
    """
    x = _warp_inputs(logits, history, history_valid, cfg)
    if cfg.is_greedy:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    if cfg.top_k is None and cfg.top_p >= 1.0 and cfg.min_p is None:
        return _categorical_rows(keys, x).astype(jnp.int32)
    cutoff, cand_values, cand_ids = _candidates(x, cfg)
    if cand_values is None:
        return _categorical_rows(keys, jnp.where(x < cutoff[:, None], -jnp.inf, x)).astype(jnp.int32)
    masked = jnp.where(cand_values < cutoff[:, None], -jnp.inf, cand_values)
    choice = _categorical_rows(keys, masked)
    return jnp.take_along_axis(cand_ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def row_keys(seed_or_key: int | jax.Array, row_ids: jax.Array, step: int | jax.Array) -> jax.Array:
    """Per-row PRNG keys: ``fold_in(fold_in(base, row_id), step)``.

    The same (seed, row id, step) always gives the same key, so a row's draws depend neither on the batch
    it shares nor on its position there. Use a stable id (e.g. the agent's global id), not the batch slot.

    Args:
      seed_or_key: an integer seed (Python or a scalar integer array, may be traced), a typed key, or a
        raw uint32 [2] key.
      row_ids: [B] integer row ids.
      step: scalar or [B] integer step (e.g. the decode position).

    Returns:
      [B] typed keys when given a seed or a typed key; [B, 2] raw keys when given a raw key.
    """
    if isinstance(seed_or_key, numbers.Integral):
        base = jax.random.key(seed_or_key)
    else:
        base = jnp.asarray(seed_or_key)
        if not jnp.issubdtype(base.dtype, jax.dtypes.prng_key) and base.ndim == 0:
            base = jax.random.key(base)  # a (possibly traced) integer seed
    row_ids = jnp.asarray(row_ids, jnp.uint32)
    steps = jnp.broadcast_to(jnp.asarray(step, jnp.uint32), row_ids.shape)
    return _fold_rows(base, row_ids, steps)


@jax.jit
def _fold_rows(base, row_ids, steps):
    # One compiled call instead of several eager dispatches when used outside jit; inlined inside jit.
    return jax.vmap(lambda row, s: jax.random.fold_in(jax.random.fold_in(base, row), s))(row_ids, steps)
