"""The decode loop's sampling step: a token and its log-prob per row from fp32 logits, on the
device without a host sync, as torch ops (:func:`sample_torch`, any device and setting) or as
one Triton kernel (:func:`sample_triton`: CUDA, or CPU under ``TRITON_INTERPRET=1``) that the
engine uses on CUDA whenever no top-p applies (:func:`sample` picks).

The torch path. Unseeded, a draw is the exponential race ``argmax_v p_v / E_v`` with ``E_v ~
Exp(1)`` i.i.d. from the call's generator, which draws ``v`` with probability ``p_v``
(``torch.multinomial`` would sync the host); with per-row ``keys`` it is the Gumbel-max draw
``argmax_v top_p(z / T)_v + G(key, t, v)`` of ``rollout/noise.py``, the same function of (row
key, step, token) as the hf engine's, so a response does not depend on its batch, wave or slot.
The log-prob is ``log_softmax(x / T)`` of the unprocessed logits ``x``, as the hf engine returns it.

The kernel. Per row ``b`` of the logits ``x`` (B, V), with the engine's suppression bias ``c``
(0, or -inf on tokens never to be sampled) and ``s = fl32(1 / fl32(T))`` (a CUDA tensor divided
by a Python float is multiplied by this reciprocal, so the kernel draws what the torch path
draws there):

    greedy (T = 0):  token = argmax_v (x_v + c_v),                     logp = log_softmax(x)_token
    sampled:         token = argmax_v ((x_v + c_v) s + G(k_b, t, v)),  logp = log_softmax(x s)_token

with ``G`` the counter-hash Gumbel noise (row key ``k_b``, step ``t``) in fp64 as in
``noise.gumbel``. Ties go to the lowest index, as ``torch.argmax``. An unseeded call gives each
row a random key per wave instead (same law). Why a kernel: in torch the keyed noise is ~20
elementwise passes over (B, V) int64 arrays (at 512 rows x 151,936 tokens each pass moves ~1.2
GB), and even unkeyed sampling makes ~8 passes (bias, scale, softmax, noise, race, argmax,
log_softmax, gather); here the logits are read once, each of a few programs per row keeping a
running maximum and sum of exponentials for the log-softmax and the best noisy score for the draw
over its chunk of the vocabulary, and a small combine merging the chunks.
"""

from __future__ import annotations

import functools
import logging

import torch

from .base import SamplingParams
from .noise import GOLDEN, M32, gumbel, mix32, top_p_filter

log = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
except ImportError:   # pragma: no cover - the venv ships Triton; a CPU-only install may not
    triton = None


@functools.cache
def kernel_agrees(device: torch.device) -> bool:
    """Whether :func:`sample_triton` draws :func:`sample_ref`'s tokens (log-probs within 1e-4) on
    ``device``, checked once per process on (4, 3000) random logits, greedy and at T 0.7: a
    compiler or driver that builds the kernel wrongly would otherwise change every rollout
    without a sign. A disagreement is logged and the engine keeps the torch ops."""
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(4, 3000, generator=g)).to(device)
    bias = torch.zeros(3000, device=device)
    bias[7] = float("-inf")
    keys = torch.randint(0, 2**32, (4,), generator=g).to(device)
    for temp in (0.0, 0.7):
        (ta, la), (tb, lb) = sample_ref(x, bias, keys, 3, temp), sample_triton(x, bias, keys, 3, temp)
        if not torch.equal(ta, tb) or float((la - lb).abs().max()) > 1e-4:
            log.warning("the sampling kernel disagrees with its torch reference on %s (T %s: tokens %s vs %s); "
                        "sampling with torch ops instead", device, temp, tb.tolist(), ta.tolist())
            return False
    return True


def kernel_serves(params: SamplingParams, kernel: bool) -> bool:
    """Whether :func:`sample` draws with the kernel when ``kernel`` is on: the kernel has no top-p."""
    return kernel and params.top_p >= 1.0


def sample(logits: torch.Tensor, bias: torch.Tensor, params: SamplingParams, gen: torch.Generator | None, t: int,
           keys: torch.Tensor | None, kernel: bool):
    """(token, log-prob or None) per row: :func:`sample_triton` where :func:`kernel_serves` and the
    call is greedy or keyed (the caller gives unseeded rows random keys to use it), else
    :func:`sample_torch`."""
    greedy = params.temperature == 0
    if kernel_serves(params, kernel) and (greedy or keys is not None):
        tok, lp = sample_triton(logits, bias, keys, t, params.temperature)
        return tok, lp if params.return_logprobs else None
    return sample_torch(logits, bias, params, gen, t, keys)


def sample_torch(logits: torch.Tensor, bias: torch.Tensor, params: SamplingParams, gen: torch.Generator | None,
                 t: int, keys: torch.Tensor | None):
    """The torch path of the module docstring: greedy, keyed Gumbel-max, or the exponential race."""
    scores = logits + bias
    greedy = params.temperature == 0
    if greedy:
        tok = scores.argmax(-1)
    elif keys is not None:
        z = top_p_filter(scores / params.temperature, params.top_p)
        tok = (z.double() + gumbel(keys, t, z.shape[-1])).argmax(-1)
    else:
        probs = torch.softmax(top_p_filter(scores / params.temperature, params.top_p), -1)
        tok = (probs / torch.empty_like(probs).exponential_(generator=gen)).argmax(-1)
    lp = None
    if params.return_logprobs:
        z = logits if greedy else logits / params.temperature
        lp = torch.log_softmax(z, -1).gather(-1, tok[:, None])[:, 0]
    return tok, lp


def inverse_temperature(temperature: float) -> float:
    """``fl32(1 / fl32(T))``: the factor CUDA's ``tensor / T`` multiplies fp32 logits by."""
    t = torch.tensor(temperature, dtype=torch.float32)
    return float(torch.tensor(1.0, dtype=torch.float32) / t)


def sample_ref(logits: torch.Tensor, bias: torch.Tensor, keys: torch.Tensor | None, t: int, temperature: float):
    """(token, log-prob) per row as the kernel computes them (module docstring), in torch: the
    reference the kernel is tested against (fp32 logits; ``keys`` (B,) int64, unused when greedy)."""
    if temperature == 0:
        tok = (logits + bias).argmax(-1)
        z = logits
    else:
        s = inverse_temperature(temperature)
        tok = (((logits + bias) * s).double() + gumbel(keys, t, logits.shape[-1])).argmax(-1)
        z = logits * s
    return tok, torch.log_softmax(z, -1).gather(-1, tok[:, None])[:, 0]


def sample_triton(logits: torch.Tensor, bias: torch.Tensor, keys: torch.Tensor | None, t: int, temperature: float,
                  block: int | None = None, splits: int | None = None):
    """:func:`sample_ref` as one kernel over ``splits`` programs per row, then, with more than one,
    a combine in torch ops. ``logits`` (B, V) fp32 with unit stride along V; ``keys`` (B,) int64
    (ignored when greedy). Defaults, from a sweep on an H200 (docs/PERFORMANCE.md, eighth
    session): greedy, one program per row over blocks of 4,096; sampled (the fp64 noise makes it
    compute-bound), :func:`default_splits` programs per row over blocks of 2,048.

    Each program ``j`` scans its chunk ``C_j`` of the vocabulary and keeps ``m_j = max_{C_j} x s``,
    ``l_j = sum_{C_j} exp(x s - m_j)``, and the best score and its index; the combine takes
    ``M = max_j m_j``, ``L = sum_j exp(m_j - M) l_j``, the best score over chunks (the first on a tie,
    so the lowest index, as ``torch.argmax``), and ``logp = x_token s - M - log L``. One program per
    row leaves most of the card idle at 64 rows; the splits fill it."""
    B, V = logits.shape
    assert logits.dtype == torch.float32 and logits.stride(1) == 1 and bias.is_contiguous()
    greedy = temperature == 0
    dev = logits.device
    block = block or (4096 if greedy else 2048)
    blocks = -(-V // block)
    splits = min(max(1, splits or (1 if greedy else default_splits(B, blocks, dev))), blocks)
    chunk = -(-blocks // splits) * block
    splits = -(-V // chunk)
    tok = torch.empty(B, splits, dtype=torch.int64, device=dev)
    lp = torch.empty(B, splits, dtype=torch.float32, device=dev)     # the log-prob, or m_j with splits
    if B == 0:
        return tok[:, 0], lp[:, 0]
    part_l = torch.empty(B, splits, dtype=torch.float32, device=dev) if splits > 1 else lp
    part_best = torch.empty(B, splits, dtype=torch.float64, device=dev) if splits > 1 else lp
    t_mix = mix32((t + GOLDEN) & M32)
    t_mix -= (t_mix >> 31) << 32          # as a signed 32-bit int: one argument type for every step
    keys = tok if greedy else keys        # any int64 buffer: greedy reads no key
    s = 1.0 if greedy else inverse_temperature(temperature)
    _sample_kernel[(B, splits)](logits, bias, keys, tok, lp, part_l, part_best, V, logits.stride(0), t_mix, s, chunk,
                                GREEDY=greedy, FINAL=splits == 1, BLOCK=block)
    if splits == 1:
        return tok[:, 0], lp[:, 0]
    big_m = lp.max(1, keepdim=True).values
    total = (part_l * torch.exp(lp - big_m)).sum(1)
    tok = tok.gather(1, part_best.argmax(1, keepdim=True))[:, 0]
    return tok, logits.gather(1, tok[:, None])[:, 0] * s - big_m[:, 0] - torch.log(total)


@functools.cache
def _programs_wanted(device: torch.device) -> int:
    """Programs that keep ``device`` busy: four per streaming multiprocessor on CUDA; on the CPU
    (Triton's interpreter, tests) a fixed 16."""
    if device.type != "cuda":
        return 16
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def default_splits(rows: int, blocks: int, device: torch.device) -> int:
    """Programs per row for :func:`sample_triton`: enough that ``rows x splits`` reaches
    :func:`_programs_wanted`, at most one per block of the vocabulary."""
    return max(1, min(blocks, -(-_programs_wanted(device) // max(rows, 1))))


if triton is not None:
    @triton.jit
    def _mix32(x):
        """lowbias32 on uint32 (multiplies wrap mod 2^32), as ``noise.mix32``."""
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit(do_not_specialize=["t_mix"])
    def _sample_kernel(x_ptr, c_ptr, key_ptr, tok_ptr, lp_ptr, l_ptr, best_ptr, V, stride, t_mix, s, CHUNK,
                       GREEDY: tl.constexpr, FINAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        part = tl.program_id(1)
        out = row * tl.num_programs(1) + part
        base = x_ptr + row.to(tl.int64) * stride
        key = _mix32(tl.load(key_ptr + row).to(tl.uint32) ^ t_mix.to(tl.uint32, bitcast=True))
        start = part * CHUNK
        best = tl.full((), float("-inf"), tl.float64)
        best_i = start
        m = tl.full((), float("-inf"), tl.float32)   # running max of x s, and sum of exp(x s - m)
        total = tl.full((), 0.0, tl.float32)
        for off in range(start, tl.minimum(start + CHUNK, V), BLOCK):
            idx = off + tl.arange(0, BLOCK)
            live = idx < V
            x = tl.load(base + idx, mask=live, other=float("-inf"))
            z = (x + tl.load(c_ptr + idx, mask=live, other=0.0)) * s
            y = x * s
            m_new = tl.maximum(m, tl.max(y, 0))
            total = total * tl.exp(m - m_new) + tl.sum(tl.where(live, tl.exp(y - m_new), 0.0), 0)
            m = m_new
            if GREEDY:
                score = z.to(tl.float64)
            else:
                h = _mix32(_mix32(key ^ (idx.to(tl.uint32) * 0x9E3779B9)))
                u = (h.to(tl.float64) + 0.5) / 4294967296.0
                score = z.to(tl.float64) - tl.log(-tl.log(u))
            score = tl.where(live, score, float("-inf"))
            top = tl.max(score, 0)
            better = top > best              # strictly: an equal score later keeps the earlier index
            best_i = tl.where(better, off + tl.argmax(score, 0), best_i)
            best = tl.where(better, top, best)
        tl.store(tok_ptr + out, best_i.to(tl.int64))
        if FINAL:
            tl.store(lp_ptr + out, tl.load(base + best_i) * s - m - tl.log(total))
        else:                                # the combine in sample_triton finishes the row
            tl.store(lp_ptr + out, m)
            tl.store(l_ptr + out, total)
            tl.store(best_ptr + out, best)
