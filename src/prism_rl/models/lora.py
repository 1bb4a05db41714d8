"""LoRA adapters on the policy (``model.lora``), injected in place with ``peft``.

Why in place (``peft.inject_adapter_in_model``) and not a ``PeftModel`` wrapper: the policy
stays the same ``*ForConditionalGeneration`` object with the same attribute paths
(``model.model.language_model``, ``model.model`` as the backbone, ``lm_head``), so the trainers'
backbone calls, FSDP2's shard units, the weight sync into the rollout copy (by parameter name)
and both rollout engines work unchanged: each targeted ``nn.Linear`` becomes a ``peft`` LoRA
layer whose forward is ``W x + (alpha / r) B A dropout(x)``, and :class:`~prism_rl.rollout.graph.
GraphEngine` calls those modules, so it samples from the current adapted policy.

On disk:

- a checkpoint holds the adapter alone (``adapter_model.safetensors`` + ``adapter_config.json``,
  the ``peft`` format) plus the optimizer state; the frozen base is reloaded from
  ``model.path`` on resume (:func:`load_adapter`);
- the final export is a plain Hugging Face folder with the adapter merged into the weights
  (:func:`merged_state_dict`: nothing of ``peft`` is needed to load it), and the adapter alone
  in its ``adapter/`` sub-folder (``PeftModel.from_pretrained(base, "final/adapter")``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import ConfigError, LoraConfig
from ..data.records import DataError

ADAPTER = "default"                      # peft's adapter name inside the model
PEFT_PREFIX = "base_model.model."        # key prefix of a PeftModel's saved adapter
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_DIR = "adapter"                  # the adapter alone, beside the merged final weights


DECODER_LAYERS = r"(?:.*\.)?language_model\.layers\.\d+"   # module names of the text decoder's layers


def target_pattern(names: list[str]) -> str:
    """The regular expression (``peft`` full-matches it against module names) that selects the
    layers called ``names`` inside the text decoder's layers, and nothing in the vision tower."""
    alternatives = "|".join(re.escape(n) for n in names)
    return rf"{DECODER_LAYERS}\.(?:.+\.)?(?:{alternatives})"


def _linear_names(model: torch.nn.Module, pattern: str) -> dict[str, str]:
    """Module name -> its last part, for the ``nn.Linear`` modules ``pattern`` selects."""
    return {name: name.rsplit(".", 1)[-1] for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and re.fullmatch(pattern, name)}


def add_lora(model: torch.nn.Module, cfg: LoraConfig, base_path: str | None = None) -> torch.nn.Module:
    """``model`` with LoRA layers injected in place (``cfg.r == 0``: unchanged). Only the
    adapters' A and B then require gradients. A name of ``cfg.target_modules`` that matches no
    linear layer of the text decoder is a :class:`ConfigError` naming it."""
    if not cfg.enabled:
        return model
    import peft

    pattern = target_pattern(cfg.target_modules)
    found = set(_linear_names(model, pattern).values())
    missing = [n for n in cfg.target_modules if n not in found]
    if missing:
        known = sorted(set(_linear_names(model, DECODER_LAYERS + r"\..+").values()))
        raise ConfigError(f"model.lora.target_modules: no linear layer named {missing} in the text decoder "
                          f"(model.language_model) of {base_path or 'the model'}; its linear layers: {known}")
    pc = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha if cfg.alpha is not None else 2.0 * cfg.r,
                         lora_dropout=cfg.dropout, target_modules=pattern, bias="none",
                         base_model_name_or_path=base_path)
    training = model.training
    model = peft.inject_adapter_in_model(pc, model, adapter_name=ADAPTER)
    adapters_in_fp32(model)
    return model.train(training)   # the new layers' dropout follows the model's mode


def adapters_in_fp32(model: torch.nn.Module) -> None:
    """Hold the adapters in fp32 whatever the base's dtype: with ``model.dtype=bfloat16`` the
    frozen base takes 2 bytes per parameter while AdamW still updates fp32 adapters (a bf16
    weight would lose updates smaller than its rounding step). peft's layers cast the input to
    the adapter's dtype and the sum back to the base output's."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name and p.dtype != torch.float32:
                p.data = p.data.float()


def is_lora(model: torch.nn.Module) -> bool:
    """Whether ``model`` carries LoRA layers injected by :func:`add_lora`."""
    return ADAPTER in (getattr(model, "peft_config", None) or {})


def scaling(model: torch.nn.Module) -> float:
    """alpha / r of the model's adapter."""
    pc = model.peft_config[ADAPTER]
    return pc.lora_alpha / pc.r


def is_lora_layer(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a peft LoRA layer (a base layer plus adapter deltas)."""
    return hasattr(module, "base_layer") and hasattr(module, "get_delta_weight")


def effective_weight(linear: torch.nn.Module) -> torch.Tensor:
    """The weight ``W`` a linear layer applies as ``y = x W^T`` (the layer is not changed).

    Plain ``nn.Linear``: its weight. peft LoRA layer: ``W = W_base + sum_a delta_a`` over the
    active adapters, ``delta_a = (alpha / r) B_a A_a`` (``get_delta_weight``), as its forward
    computes; a merged layer's base weight already holds its merged deltas, and a layer with
    adapters disabled applies the base alone (minus any merged deltas). For code that reads
    ``.weight`` to build kernels of its own (the fused decode weights): a LoRA layer's ``.weight``
    is its frozen base weight alone, which would drop the adapter silently.
    """
    if not is_lora_layer(linear):
        return linear.weight
    base = linear.get_base_layer().weight
    merged = list(getattr(linear, "merged_adapters", []))
    if linear.disable_adapters:
        return base - sum(linear.get_delta_weight(a) for a in merged) if merged else base
    if merged:
        return base
    active = [a for a in linear.active_adapters if a in linear.lora_A]
    return base + sum(linear.get_delta_weight(a) for a in active) if active else base


def merged_state_dict(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A LoRA model's state dict as the plain model's: for every adapted layer ``X``,

        X.weight = X.base_layer.weight + scale * (X.lora_B.default.weight @ X.lora_A.default.weight)

    (computed in fp32, cast back to the weight's dtype, moved to the CPU one layer at a time, so
    the device holds one extra layer at most); ``X.base_layer.bias`` becomes ``X.bias`` and the
    adapter keys go. ``state`` is read, never modified, so training continues undisturbed."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, value in state.items():
        if ".lora_" in key:
            continue
        layer, sep, leaf = key.rpartition(".base_layer.")
        if not sep:
            out[key] = value
            continue
        if leaf == "weight":
            a, b = state[f"{layer}.lora_A.{ADAPTER}.weight"], state[f"{layer}.lora_B.{ADAPTER}.weight"]
            used |= {f"{layer}.lora_A.{ADAPTER}.weight", f"{layer}.lora_B.{ADAPTER}.weight"}
            value = (value.float() + scale * (b.float() @ a.float())).to(value.dtype).cpu()
        out[f"{layer}.{leaf}"] = value
    left = [k for k in state if ".lora_" in k and k not in used]
    if left:
        raise ValueError(f"adapter tensors without a base layer to merge into: {left[:3]}")
    return out


def adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the keys a ``PeftModel`` saves them with
    (``base_model.model.<module>.lora_A.weight``), on the CPU; from ``state`` (a gathered full
    state dict) when given, else from the model."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model, state_dict=state, adapter_name=ADAPTER, save_embedding_layers=False)
    return {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in sd.items()}


def save_adapter(folder: str | Path, model: torch.nn.Module, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter in ``peft``'s format: ``adapter_model.safetensors`` + ``adapter_config.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model, state), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    model.peft_config[ADAPTER].save_pretrained(str(folder))
    return folder


def holds_adapter(folder: str | Path) -> bool:
    """Whether ``folder`` holds a saved adapter (a LoRA checkpoint) rather than full weights."""
    return (Path(folder) / ADAPTER_WEIGHTS).is_file()


def load_adapter(model: torch.nn.Module, folder: str | Path) -> None:
    """Copy the adapter saved in ``folder`` into ``model``'s LoRA layers (in place, so the
    parameters keep their identity). A missing, extra or differently shaped adapter tensor is a
    :class:`DataError` naming the folder (e.g. a checkpoint of another ``model.lora.r``)."""
    from peft import set_peft_model_state_dict

    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise DataError(f"{path}: missing; this checkpoint holds no LoRA adapter (was it trained with model.lora.r=0?)")
    sd = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(path)).items()}
    try:
        result = set_peft_model_state_dict(model, sd, adapter_name=ADAPTER)
    except RuntimeError as e:   # load_state_dict's size mismatch
        raise DataError(f"{path}: does not fit model.lora ({str(e).splitlines()[-1].strip()})") from None
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise DataError(f"{path}: does not fit model.lora: missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]}")


def save_merged(folder: str | Path, model: torch.nn.Module, processor, state: dict[str, torch.Tensor] | None = None) -> Path:
    """The final export of a LoRA policy: a plain Hugging Face folder with the adapter merged
    (:func:`merged_state_dict`) and the processor, plus the adapter alone in ``adapter/``.
    ``state``: the full state dict (gathered under FSDP2), else the model's own."""
    folder = Path(folder)
    state = model.state_dict() if state is None else state
    model.save_pretrained(folder, state_dict=merged_state_dict(state, scaling(model)))
    processor.save_pretrained(folder)
    save_adapter(folder / ADAPTER_DIR, model, state)
    return folder
