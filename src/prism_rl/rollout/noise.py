"""Sampling whose draws do not depend on the batch: one noise stream per response.

``torch.multinomial`` over a batch draws each row's token from one shared generator, so a
response's tokens depend on which other rows share its batch, and a run on 2 processes (each
sampling half the prompts) samples other responses than a run on 1. Here each response has its
own key, ``row_key(seed, prompt_key, j)`` (the round's seed, the prompt's place in the global
batch, the sample number), and its token at position t is the Gumbel-max draw

    token = argmax_v ( z_v / T + G_v ),   G_v = -log(-log u_v),   u_v = (hash32(key, t, v) + 1/2) / 2^32,

over the logits ``z`` left by top-p (which set the rest to -inf). ``argmax(z/T + G)`` with
i.i.d. standard Gumbel ``G`` is distributed as ``softmax(z/T)``, the same law ``multinomial``
samples from; only the source of randomness changed, a counter-based hash (lowbias32), so the
draw is a pure function of (key, t, v): the same on any rank, in any batch, after any resume.
"""

from __future__ import annotations

import torch

M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9


def mul32(x, c: int):
    """``x * c mod 2^32`` for 32-bit ``x`` (int or int64 tensor) without int64 overflow: the
    constant is split into 16-bit halves, ``x*c = x*c_lo + ((x*c_hi mod 2^16) << 16) mod 2^32``."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32


def mix32(x):
    """lowbias32 (C. Wellons): a 32-bit integer hash with near-ideal avalanche;
    ``x ^= x>>16; x *= 0x7feb352d; x ^= x>>15; x *= 0x846ca68b; x ^= x>>16`` (mod 2^32)."""
    x = x ^ (x >> 16)
    x = mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def combine(*parts: int) -> int:
    """One 32-bit key from several non-negative ints: ``k = mix32(k ^ mix32(p + GOLDEN))`` in turn."""
    k = 0
    for p in parts:
        k = mix32(k ^ mix32((int(p) + GOLDEN) & M32))
    return k


def row_key(seed: int, prompt_key: int, sample: int) -> int:
    """The key of sample ``sample`` of the prompt at ``prompt_key`` in a round seeded ``seed``."""
    return combine(seed, prompt_key, sample)


def prompt_keys_or_default(prompt_keys: list[int] | None, prompts: int) -> list[int]:
    """The prompts' keys of a seeded call: ``prompt_keys`` (their places in the global batch),
    by default ``0 .. prompts-1``; a count that does not match raises ``ValueError``."""
    keys = list(prompt_keys) if prompt_keys is not None else list(range(prompts))
    if len(keys) != prompts:
        raise ValueError(f"prompt_keys has {len(keys)} keys for {prompts} prompts")
    return keys


def row_keys(seed: int, prompt_keys: list[int], n: int) -> list[int]:
    """Row ``i*n + j`` (sample j of prompt i): ``row_key(seed, prompt_keys[i], j)``."""
    return [row_key(seed, k, j) for k in prompt_keys for j in range(n)]


def gumbel(keys: torch.Tensor, position: int, vocab: int) -> torch.Tensor:
    """(B, V) standard Gumbel noise, entry (b, v) a function of (keys[b], position, v) only:
    ``u = (mix32(mix32(k_b ^ mix32(t + GOLDEN)) ^ v*GOLDEN) + 1/2) / 2^32``, ``G = -log(-log u)``."""
    k = mix32(keys ^ mix32((position + GOLDEN) & M32))                       # (B,)
    v = mul32(torch.arange(vocab, device=keys.device, dtype=torch.int64), GOLDEN)
    h = mix32(mix32(k[:, None] ^ v[None, :]))
    u = (h.double() + 0.5) / 2.0**32
    return -torch.log(-torch.log(u))


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits outside the nucleus set to -inf: a token stays when the probability of the tokens
    more probable than it sums to less than ``top_p`` (so the most probable always stays)."""
    if top_p >= 1.0:
        return scores
    probs, order = torch.softmax(scores.float(), -1).sort(-1, descending=True)
    before = probs.cumsum(-1) - probs
    drop = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order, before >= top_p)
    return scores.masked_fill(drop, float("-inf"))


class RowNoise:
    """A transformers logits processor that turns greedy decoding into per-row seeded sampling:
    it returns ``top_p(z / T) + G`` (:func:`gumbel`) so ``generate(do_sample=False)``'s argmax is
    the Gumbel-max draw. ``keys``: (B,) int64 row keys (:func:`row_key`), ``prompt_len``: the
    padded prompt width (position t = current length - prompt_len)."""

    def __init__(self, keys: torch.Tensor, prompt_len: int, temperature: float, top_p: float):
        self.keys, self.prompt_len, self.temperature, self.top_p = keys, prompt_len, temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        z = top_p_filter(scores.float() / self.temperature, self.top_p)
        g = gumbel(self.keys.to(scores.device), input_ids.shape[1] - self.prompt_len, scores.shape[-1])
        return (z.double() + g).float()
