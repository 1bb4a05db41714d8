"""What every suite shares: the run context, table rows, per-row error isolation, engine lookup."""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .measure import free
from .shapes import Workloads


@dataclass
class Ctx:
    device: torch.device
    calib: dict
    work: Workloads
    reps: int                       # timed repetitions after the warm-up (median reported)
    engine: str                     # name given to prism_rl.rollout.make_engine for "ours"
    processor: object
    image_size: int
    tmp: Path
    emit: Callable[[dict], None]    # records a finished row (and rewrites the JSON)
    only: str | None = None
    trl: bool = True
    mem_rollout: str = "auto"       # the memory row: "real" rl_step, "synth" rollouts, or real iff a dedicated engine

    def wanted(self, config: str) -> bool:
        return self.only is None or self.only.lower() in config.lower()


def row(suite: str, config: str, metric: str, *, peer_name: str = "", peer: float | None = None, ours_name: str = "",
        ours: float | None = None, higher_is_better: bool = True, fraction: float | None = None,
        peer_fraction: float | None = None, note: str = "", **detail) -> dict:
    """One table row. ``ratio`` is always ours' speed-up over the peer (> 1: ours faster or larger
    throughput): ours / peer for rates, peer / ours for times."""
    ratio = None
    if peer and ours:
        ratio = ours / peer if higher_is_better else peer / ours
    return {"suite": suite, "config": config, "metric": metric, "peer_name": peer_name, "peer": peer,
            "ours_name": ours_name, "ours": ours, "ratio": ratio, "fraction": fraction,
            "peer_fraction": peer_fraction, "note": note, "detail": detail}


def error_note(e: BaseException) -> str:
    return f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


@contextlib.contextmanager
def guarded(ctx: Ctx, suite: str, config: str) -> Iterator[None]:
    """Run one measurement; a failure (out of memory included) becomes an error row, not a crash,
    so one broken configuration never loses the others' numbers."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - every failure is reported in the table
        ctx.emit(row(suite, config, "", note=error_note(e), trace=traceback.format_exc()[-2000:]))
        e.__traceback__ = None   # the frames hold tensors: let them go before freeing memory
    finally:
        free(ctx.device)


def engine_factory(name: str) -> tuple[Callable | None, str]:
    """``(make(model, processor, device), label)`` for prism's rollout engine ``name``, through
    ``prism_rl.rollout.make_engine`` when the package has it. Without it only "hf" exists (today's
    ``HFEngine``); any other name gives ``(None, reason)`` and its rows read "n/a"."""
    try:
        from prism_rl.rollout import make_engine
    except ImportError:
        make_engine = None
    if make_engine is not None:
        return (lambda model, proc, device: make_engine(name, model, proc, device)), f"prism {name} engine"
    if name == "hf":
        from prism_rl.rollout.hf import HFEngine
        return (lambda model, proc, device: HFEngine(model, proc, device)), "prism hf engine"
    return None, "n/a (engine missing: no prism_rl.rollout.make_engine)"


@contextlib.contextmanager
def prism_patched(model) -> Iterator[None]:
    """The model as ``load_policy`` leaves it (batched M-RoPE ids installed) inside the block,
    plain transformers again after it (the peers run unpatched)."""
    from prism_rl.models.mrope import install_batched_rope_index
    install_batched_rope_index(model)
    try:
        yield
    finally:
        model.model.__dict__.pop("get_rope_index", None)
