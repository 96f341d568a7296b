"""Group-context algorithms (SPEC §2) as small objects: what the policy reads besides the agent's own state.

Each algorithm owns its slice of the rollout's scan carry, the token segments it adds to the policy prompt
(between the topic and "网友资料："), and its update after each step. The rollout itself knows none of
them by name; adding a baseline is one class here plus its entry in :data:`ALGORITHMS`:

* ``name`` and, when it differs, the agent instruction (``state_sft`` uses the SFT baseline's);
* (comment-list baselines subclass :class:`CommentList` and set a header, a window and a selection);
* :meth:`Algorithm.init` — its carry for W worlds (``()`` when it keeps nothing);
* :meth:`Algorithm.context_width` / :meth:`Algorithm.context` — its prompt segments and their width;
* :meth:`Algorithm.update` — its carry after a step's actions (and the new mean field, for ``mf``).

The texts (and a plain-Python twin for tests) are in :mod:`mfjax.sim.templates`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from mfjax.sim import prompts
from mfjax.sim import templates
from mfjax.sim.prompts import TokenTemplates
from mfjax.sim.types import Widths


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepActions:
    """What a step leaves for the algorithms: its agents' actions and the mean field it wrote."""

    action: jax.Array  # [W, B, La]
    action_len: jax.Array  # [W, B]
    valid: jax.Array  # [W, B] bool
    followers: jax.Array  # [W, B] int32, -1 unknown
    mean_field: Any = None  # (m [W, Lm], m_len [W]) for algorithms that use one


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class CommentWindow:
    """The last K actions of each world, oldest first."""

    tokens: jax.Array  # [W, K, La]
    lengths: jax.Array  # [W, K]
    valid: jax.Array  # [W, K] bool
    followers: jax.Array  # [W, K] int32

    @classmethod
    def empty(cls, W: int, K: int, La: int) -> "CommentWindow":
        z = lambda *shape: jnp.zeros(shape, jnp.int32)
        return cls(tokens=z(W, K, La), lengths=z(W, K), valid=jnp.zeros((W, K), bool), followers=z(W, K))

    def push(self, step: StepActions) -> "CommentWindow":
        K = self.tokens.shape[1]
        cat = lambda old, new: jnp.concatenate([old, new], axis=1)[:, -K:]
        return CommentWindow(tokens=cat(self.tokens, step.action), lengths=cat(self.lengths, step.action_len),
                             valid=cat(self.valid, step.valid), followers=cat(self.followers, step.followers))


class Algorithm:
    """The state-only policy: no group context. Subclasses add one."""

    name: ClassVar[str] = "state"
    uses_mean_field: ClassVar[bool] = False
    state_sft: ClassVar[bool] = False  # the agent part uses the state-SFT baseline's instruction

    def init(self, W: int, widths: Widths, mean_field_width: int) -> Any:
        return ()

    def context_width(self, tt: TokenTemplates, widths: Widths, mean_field_width: int) -> int:
        return 0

    def context(self, tt: TokenTemplates, carry: Any) -> list:
        return []

    def update(self, carry: Any, step: StepActions) -> Any:
        return carry

    def mean_field(self, carry: Any, W: int):
        """(m [W, Lm], m_len [W]) the policy reads (empty for algorithms without a mean field)."""
        return jnp.zeros((W, 0), jnp.int32), jnp.zeros((W,), jnp.int32)


class StateSFT(Algorithm):
    """State only, with the instruction of the reference's state-SFT baseline (its tuned policy)."""

    name = "state_sft"
    state_sft = True


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MeanFieldCarry:
    m: jax.Array  # [W, Lm]
    m_len: jax.Array  # [W]


class MeanField(Algorithm):
    """MF-LLM: "重点参考已有的网友们评论情况：{m}。\\n" while the mean field is not empty."""

    name = "mf"
    uses_mean_field = True

    def init(self, W, widths, mean_field_width):
        return MeanFieldCarry(m=jnp.zeros((W, mean_field_width), jnp.int32), m_len=jnp.zeros((W,), jnp.int32))

    def context_width(self, tt, widths, mean_field_width):
        return len(tt.mf_ctx_open.tokens) + mean_field_width + len(tt.mf_ctx_close.tokens)

    def context(self, tt, carry):
        has_m = carry.m_len > 0  # no context while the mean field is still empty
        return [prompts.gated(prompts.constant(tt.mf_ctx_open), has_m), (carry.m, carry.m_len),
                prompts.gated(prompts.constant(tt.mf_ctx_close), has_m)]

    def update(self, carry, step):
        m, m_len = step.mean_field
        return MeanFieldCarry(m=m, m_len=m_len)

    def mean_field(self, carry, W):
        return carry.m, carry.m_len


class CommentList(Algorithm):
    """A list of past comments as the context: a header + "第{i}位网友评论：{c}。\n" per comment (numbered
    from 1, in order). The carry is a window of the last ``window`` actions; :meth:`select` picks the
    ``shown`` ones the policy reads."""

    header: ClassVar[str]  # the TokenTemplates piece of the header
    window: ClassVar[int]
    shown: ClassVar[int]

    def init(self, W, widths, mean_field_width):
        return CommentWindow.empty(W, self.window, widths.action)

    def context_width(self, tt, widths, mean_field_width):
        per_line = tt.comment_pre.tokens.shape[1] + widths.action + len(tt.comment_post.tokens)
        return len(getattr(tt, self.header).tokens) + self.shown * per_line

    def select(self, carry: CommentWindow) -> CommentWindow:
        return carry

    def context(self, tt, carry):
        shown = self.select(carry)
        any_valid = jnp.any(shown.valid, axis=1)
        number = jnp.clip(jnp.cumsum(shown.valid, axis=1) - 1, 0, tt.comment_pre.tokens.shape[0] - 1)
        pre_tokens, pre_lengths = prompts.pick(tt.comment_pre, number)  # [W, K, Lp], [W, K]
        post = prompts.constant(tt.comment_post)
        block = prompts.lines_block([(pre_tokens, pre_lengths), (shown.tokens, shown.lengths),
                                     (post[0][:, None, :], post[1])], shown.valid)
        return [prompts.gated(prompts.constant(getattr(tt, self.header)), any_valid), block]

    def update(self, carry, step):
        return carry.push(step)


class Recent(CommentList):
    """The 5 most recent actions: "最新的网友评论如下：" + one line each."""

    name = "recent"
    header = "recent_header"
    window = shown = templates.RECENT_K


class Popular(CommentList):
    """The 5 most-followed of the last 30 actions: "当前最热门的评论如下：" + one line each. Ties and unknown
    follower counts (-1) keep time order, so without follower data it is the 5 oldest of the window."""

    name = "popular"
    header = "popular_header"
    window, shown = templates.POPULAR_WINDOW, templates.POPULAR_K

    def select(self, carry):
        key = jnp.where(carry.valid, carry.followers, -2)  # most followers first; empty slots last
        order = jnp.argsort(-key, axis=1, stable=True)[:, :self.shown]
        take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)
        return CommentWindow(tokens=take(carry.tokens), lengths=take(carry.lengths), valid=take(carry.valid),
                             followers=take(carry.followers))


ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (MeanField, Algorithm, StateSFT, Recent, Popular)}
assert tuple(sorted(ALGORITHMS)) == tuple(sorted(templates.ALGORITHMS)), "templates and policies disagree"


def get(name: str) -> Algorithm:
    """The algorithm called ``name`` (one of :data:`ALGORITHMS`)."""
    try:
        return ALGORITHMS[name]()
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; choose from {sorted(ALGORITHMS)}") from None
