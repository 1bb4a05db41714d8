"""Typed stage configs: YAML files under ``configs/`` plus dotted command-line overrides.

Every stage config is a pydantic model with ``extra="forbid"``, so an unknown key (in the
YAML or on the command line) is rejected with a message naming it, and a bad value is
rejected with a message naming the key and what was expected. ``save_config`` writes the
resolved config next to a run's outputs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Image limits (data/images.py checks them on each image's header, before decoding).
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192   # 67 megapixels: 200 MB as RGB bytes, above any camera's photo
PIL_BOMB_PIXELS = 89_478_485             # Pillow warns above this and refuses above twice this
QWEN_MAX_ASPECT_RATIO = 200.0            # Qwen-VL's processor refuses longer / shorter side > 200


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    path: str = Field("runs/quickstart/tiny", description="Local Hugging Face checkpoint folder.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on GPU, float32 on CPU.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    freeze_vision: bool = Field(False, description="Freeze the vision tower (and its merger).")
    gradient_checkpointing: bool = False
    cpu_offload: bool = Field(
        False, description="Under torchrun: keep the policy's FSDP2 shards, gradients and optimizer states in host "
        "memory (CPUOffloadPolicy; each unit is copied to the GPU for its forward/backward, AdamW steps on the CPU). "
        "Training stages only; an error in one process, where nothing is sharded.")


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraConfig(Section):
    """LoRA adapters on the policy (through ``peft``), for fewer or smaller GPUs: the base weights
    W stay frozen and each targeted linear layer learns W + (alpha / r) B A, with A (r x in) and B
    (out x r, zero at the start, so training starts from the base model). ``r: 0`` (the default)
    trains every weight, as without this section.

    ``target_modules`` names linear layers *of the text decoder only* (``model.language_model``):
    what SFT, alignment and RLVR change is how the model writes (format, captions, reasoning);
    the vision tower is left out because its layers have other names (``qkv``, ``linear_fc1``), so
    a short name such as ``proj`` could otherwise adapt it by accident; and keeping it frozen
    spares its activations' gradients (often set frozen anyway, ``model.freeze_vision``)."""

    r: int = Field(0, ge=0, description="LoRA rank; 0 turns LoRA off (every weight trains).")
    alpha: float | None = Field(None, gt=0, description="Scale numerator: the update is (alpha / r) B A; "
                                "null means 2 * r (scale 2 at any rank).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input (training only).")
    target_modules: list[str] = Field(list(LORA_TARGETS), min_length=1, description="Names of the text decoder's "
                                      "linear layers to adapt (the last part of the module name).")

    @field_validator("target_modules")
    @classmethod
    def _names(cls, names: list[str]) -> list[str]:
        bad = [n for n in names if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n)]
        if bad:
            raise ValueError(f"module names are identifiers such as q_proj (not paths or patterns): {bad}")
        if len(set(names)) < len(names):
            raise ValueError(f"a module is named twice: {names}")
        return names

    @property
    def enabled(self) -> bool:
        return self.r > 0

    @property
    def scaling(self) -> float:
        """alpha / r, the factor on B A."""
        return (self.alpha if self.alpha is not None else 2.0 * self.r) / self.r


class PolicyModelConfig(ModelConfig):
    """The trained policy's model section (``prism sft``, ``prism rl``, ``prism align``): a model
    plus optional LoRA adapters. Not the discriminator, not the frozen reference policy."""

    lora: LoraConfig = LoraConfig()


class DataConfig(Section):
    """What every stage's data section has; each stage adds the files and limits it reads."""

    max_pixels: int | None = Field(None, gt=0, description="Resize images to at most this many pixels.")
    min_pixels: int | None = Field(None, gt=0)
    max_image_pixels: int = Field(
        DEFAULT_MAX_IMAGE_PIXELS, gt=0, le=PIL_BOMB_PIXELS,
        description="Refuse (never decode) an image whose header says more pixels than this: a bad record, "
        "skipped with skip_bad. Default 8192 x 8192; at most Pillow's own decompression-bomb threshold.")
    max_image_aspect_ratio: float = Field(
        QWEN_MAX_ASPECT_RATIO, ge=1, le=QWEN_MAX_ASPECT_RATIO,
        description="Refuse an image whose longer side is more than this times its shorter side (Qwen-VL's "
        "processor refuses more than 200:1).")
    min_image_side: int = Field(1, ge=1, description="Refuse an image whose shorter side is under this many pixels.")
    image_dirs: list[str] = Field(
        [], description="Folders besides the data file's own that its relative image paths may lead into "
        "with '..' (e.g. a shared images/ folder beside the annotations'); any other climb out is a bad record.")
    skip_bad: bool = Field(False, description="Skip (and count) bad records instead of failing.")
    limit: int | None = Field(None, gt=0, description="Use only the first N records.")

    @model_validator(mode="after")
    def _pixels_in_order(self):
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"data.min_pixels ({self.min_pixels}) is above data.max_pixels ({self.max_pixels})")
        return self


class SFTDataConfig(DataConfig):
    train: str = Field("", description="Training file (.parquet, .json, .jsonl).")
    max_length: int = Field(8192, gt=0, description="Prompt + response token limit (METHOD.md section 4: 8192).")
    overlong: Literal["truncate", "skip", "error"] = Field(
        "truncate", description="An example over max_length: truncate its response (LLaMA-Factory's "
        "behaviour; never the prompt or its image tokens), skip it, or stop with an error naming it. "
        "Truncated and skipped examples are counted in the run's start event and summary.json.")


class PromptDataConfig(DataConfig):
    """Prompts (warm-up pairs, alignment prompts): the response is the model's, not the file's."""

    train: str = Field("", description="Training file (.parquet, .json, .jsonl).")
    max_prompt_length: int = Field(2048, gt=0)


WARMUP_MAX_PIXELS = 560 * 560   # METHOD.md section 5: warm-up images resized to at most 560 x 560 pixels


class WarmupDataConfig(PromptDataConfig):
    """Warm-up pairs: each of a pair's four scored sequences is its prompt plus one segment."""

    max_pixels: int | None = Field(WARMUP_MAX_PIXELS, gt=0, description="Resize images to at most this many "
                                   "pixels (the reference: 560 x 560).")
    max_length: int = Field(8192, gt=0, description="Prompt + segment token limit; a longer pair is an error "
                            "(or skipped and counted with skip_bad).")


class CheckedPromptDataConfig(PromptDataConfig):
    """Prompts whose responses a fixed format is scored on (alignment, RLVR)."""

    check_prompt_format: bool = Field(True, description="Stop when a prompt asks for another response "
                                      "format than the one scored (e.g. \\boxed{} answers under the PRISM reward).")


class RLDataConfig(CheckedPromptDataConfig):
    eval: str = Field("", description="Held-out file for periodic evaluation (optional).")


class EvalDataConfig(DataConfig):
    eval: str = Field("", description="Held-out file to evaluate on.")
    max_prompt_length: int = Field(768, gt=0)


class OptimConfig(Section):
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0, description="Adam epsilon; a value near the typical gradient size "
                       "makes small, noisy gradients move their weights less than lr.")
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int | None = Field(None, ge=0, description="Overrides warmup_ratio when set.")
    grad_clip: float = Field(1.0, gt=0)


class SFTTrainConfig(Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    batch_size: int = Field(8, gt=0, description="Sequences per micro-batch.")
    grad_accum: int = Field(1, gt=0)
    seed: int = 0
    log_every: int = Field(10, gt=0)
    save_every: int | None = Field(None, gt=0, description="Checkpoint every N optimizer steps.")
    group_by_length: bool = Field(True, description="Batch similar lengths together (less padding).")


class SFTConfig(Section):
    model: PolicyModelConfig = PolicyModelConfig()
    data: SFTDataConfig = SFTDataConfig()
    optim: OptimConfig = OptimConfig()
    train: SFTTrainConfig = SFTTrainConfig()
    output_dir: str = "runs/sft"


class GenerationConfig(Section):
    max_new_tokens: int = Field(256, gt=0)
    temperature: float = Field(1.0, ge=0, description="0 means greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, gt=0, description="Samples per prompt.")
    batch_size: int = Field(32, gt=0, description="Prompts per generate call.")
    seed: int = 0


class EvalGenerationConfig(GenerationConfig):
    # its own default, not a default instance: setting any generation key keeps greedy decoding
    temperature: float = Field(0.0, ge=0, description="0 means greedy (the held-out default; a "
                               "benchmark's own when --benchmark is given and this is not set).")


class EvalConfig(Section):
    model: ModelConfig = ModelConfig()
    data: EvalDataConfig = EvalDataConfig()
    generation: EvalGenerationConfig = EvalGenerationConfig()
    output_dir: str = Field("runs/eval", description="Root of all evaluation runs: results go to "
                            "<output_dir>/<name>/<benchmark or heldout-FILE>/, the comparison table to "
                            "<output_dir>/results.md.")
    name: str = Field("", description="Run name (folder and table row); default derived from model.path.")


class RolloutConfig(Section):
    n: int = Field(16, gt=0, description="Responses sampled per prompt.")
    prompts_per_step: int = Field(32, gt=0, description="Prompts (groups) in one training step.")
    max_new_tokens: int = Field(8192, gt=0, description="Response token limit (L_max).")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    gen_batch_prompts: int | None = Field(None, gt=0, description="Prompts per generation round "
                                          "(DAPO's gen batch); default prompts_per_step.")
    engine: Literal["auto", "hf", "graph"] = Field(
        "auto", description="auto: graph on CUDA (static KV cache, CUDA-graph decode, one prefill per prompt), "
        "hf (transformers generate) elsewhere.")
    cache_implementation: Literal["dynamic", "static"] = Field(
        "dynamic", description="KV cache of transformers' generate (engine hf); static compiles the decode step.")
    fused: Literal["auto"] | bool = Field(
        "auto", description="Engine graph: decode with fused weights and Triton kernels (auto: on CUDA for dense "
        "Qwen3-VL decoders when Triton imports; false: the module path, which also serves MoE).")
    per_row_seeds: bool = Field(
        False, description="Sample each response from its own noise stream, keyed by train.seed, the step, the "
        "prompt's place in the step's batch and the sample number (Gumbel-max on a counter hash; the same "
        "distribution): the samples then do not depend on batching or on the number of torchrun processes, so "
        "runs on 1 and N GPUs, and a run resumed on another number of GPUs, sample the same responses. "
        "Both engines (the same draws in each).")


class PPOConfig(Section):
    """The PPO-clip policy update shared by RL and alignment (``actor.ppo_update`` reads it)."""

    clip_low: float = Field(0.2, ge=0)
    clip_high: float = Field(0.2, ge=0)
    clip_c: float | None = Field(None, gt=1, description="Dual-clip constant for negative advantages.")
    ratio_level: Literal["token", "sequence"] = "token"
    agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = "token-mean"
    entropy_coef: float = Field(0.0, ge=0)
    ppo_epochs: int = Field(1, gt=0)
    mini_batches: int = Field(1, gt=0, description="Optimizer steps per rollout batch (per PPO epoch).")
    micro_batch_size: int = Field(16, gt=0, description="Sequences per forward/backward (padded to the longest).")
    micro_token_budget: int | None = Field(
        None, gt=0, description="Pack micro-batches without padding to at most this many tokens (prompt + response; "
        "a longer row alone) instead of micro_batch_size rows; needs attn_implementation sdpa, eager or "
        "flash_attention_2. With sdpa attention costs (tokens)^2 per micro-batch: a few rows' length pays best.")

    @model_validator(mode="after")
    def _sequence_ratio_needs_seq_mean(self):
        # The sequence ratio's per-token form has the gradient of the sequence objective
        # -A_i s_i only when each sequence's tokens are averaged (algorithms.policy_loss).
        if self.ratio_level == "sequence" and self.agg != "seq-mean-token-mean":
            raise ValueError(f"ratio_level 'sequence' (GSPO) needs agg 'seq-mean-token-mean', not '{self.agg}': "
                             "with any other aggregation its gradient is not that of the sequence objective")
        return self


class AlgoConfig(PPOConfig):
    """The RLVR algorithm: the PPO update plus advantages, KL and DAPO's sampling and shaping."""

    name: Literal["grpo", "dapo", "gspo"] = "grpo"
    norm_by_std: bool = Field(True, description="False gives Dr. GRPO advantages (no std division).")
    adv_eps: float = Field(1e-6, gt=0)
    kl_coef: float = Field(0.0, ge=0, description="KL to the frozen initial policy (low-var estimator).")
    dynamic_sampling: bool = Field(False, description="DAPO: drop groups with zero accuracy variance.")
    max_num_gen_batches: int = Field(10, ge=1)
    overlong_buffer: int = Field(0, ge=0, description="DAPO overlong shaping buffer (0 = off).")
    overlong_factor: float = Field(1.0, ge=0)


class RewardConfig(Section):
    function: str = Field("", description="'' or 'prism': the built-in PRISM reward (<caption>/<think>/<answer>); "
                          "'boxed': the built-in reward for <think> + \\boxed{} answers (verl geo3k style); "
                          "or a custom reward as path/to/file.py:function.")
    acc_weight: float = 0.8
    format_weight: float = 0.2


class AlignTrainConfig(Section):
    steps: int = Field(1500, gt=0)
    seed: int = 0
    log_every: int = Field(1, gt=0)
    save_every: int | None = Field(None, gt=0)
    logprob_chunk: int = Field(2048, gt=0, description="Tokens per chunk of the output head.")


class RLTrainConfig(AlignTrainConfig):
    eval_every: int | None = Field(None, gt=0, description="Greedy eval on data.eval every N steps.")
    eval_limit: int | None = Field(None, gt=0)


ALGO_PRESETS: dict[str, dict] = {
    # METHOD.md section 7 table
    # (the spec gives no weight decay for GRPO; 0.01 is the reference's, verl's actor default)
    "grpo": {"algo": {"name": "grpo", "clip_low": 0.2, "clip_high": 0.2, "agg": "token-mean"},
             "optim": {"lr": 1e-6, "schedule": "constant", "warmup_ratio": 0.0, "weight_decay": 0.01}},
    "dapo": {"algo": {"name": "dapo", "clip_low": 0.2, "clip_high": 0.28, "clip_c": 10.0, "agg": "token-mean",
                      "dynamic_sampling": True, "overlong_buffer": 4096, "overlong_factor": 1.0},
             "rollout": {"gen_batch_prompts": 96},
             "optim": {"lr": 1e-6, "schedule": "constant", "warmup_steps": 10, "weight_decay": 0.1}},
    "gspo": {"algo": {"name": "gspo", "clip_low": 3e-4, "clip_high": 4e-4, "ratio_level": "sequence",
                      "agg": "seq-mean-token-mean"},
             "optim": {"lr": 1e-6, "schedule": "constant", "warmup_ratio": 0.05, "weight_decay": 0.1}},
}


class RLConfig(Section):
    model: PolicyModelConfig = PolicyModelConfig()
    data: RLDataConfig = RLDataConfig()
    optim: OptimConfig = OptimConfig(lr=1e-6, weight_decay=0.01, schedule="constant", warmup_ratio=0.0)
    rollout: RolloutConfig = RolloutConfig()
    algo: AlgoConfig = AlgoConfig()
    reward: RewardConfig = RewardConfig()
    train: RLTrainConfig = RLTrainConfig()
    output_dir: str = "runs/rl"

    @model_validator(mode="after")
    def _check_combinations(self):
        r, a = self.rollout, self.algo
        _check_group_size(r)
        _check_lora_dropout(self.model)
        _check_mini_batches(r, a)
        if a.overlong_buffer >= r.max_new_tokens:
            raise ValueError(f"algo.overlong_buffer ({a.overlong_buffer}) must be below rollout.max_new_tokens "
                             f"({r.max_new_tokens}): the shaping penalises lengths in (max - buffer, max]")
        if r.gen_batch_prompts is not None and not a.dynamic_sampling and r.gen_batch_prompts != r.prompts_per_step:
            raise ValueError(f"rollout.gen_batch_prompts={r.gen_batch_prompts} only applies with algo.dynamic_sampling"
                             "=true (without it a step trains on rollout.prompts_per_step prompts); unset it "
                             "(rollout.gen_batch_prompts=null) or enable dynamic sampling")
        return self


class DiscConfig(Section):
    path: str = Field("runs/quickstart/disc", description="Discriminator folder (prism disc init).")
    batch_size: int = Field(16, gt=0, description="Sequences per discriminator forward.")
    gradient_checkpointing: bool = False
    cpu_offload: bool = Field(
        False, description="Under torchrun: keep the discriminator's FSDP2 shards, gradients and optimizer states "
        "in host memory (as model.cpu_offload does for the policy); an error in one process.")


class WarmupTrainConfig(Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)
    batch_size: int = Field(128, gt=0, description="Pairs per optimizer step (accumulated in chunks of "
                            "disc.batch_size sequences).")
    aux_coef: float = Field(0.01, ge=0, description="Router load-balancing loss coefficient.")
    heldout_frac: float = Field(0.1, ge=0, lt=1, description="Pairs held out for accuracy/margin.")
    seed: int = 0
    log_every: int = Field(10, gt=0)
    save_every: int | None = Field(None, gt=0, description="Checkpoint every N optimizer steps.")
    eval_every: int | None = Field(None, gt=0, description="Held-out pair accuracy every N steps.")


class WarmupConfig(Section):
    disc: DiscConfig = DiscConfig()
    data: WarmupDataConfig = WarmupDataConfig()
    optim: OptimConfig = OptimConfig(lr=1e-5, weight_decay=0.01, schedule="cosine", warmup_ratio=0.1)
    train: WarmupTrainConfig = WarmupTrainConfig()
    output_dir: str = "runs/disc_warmup"


class AlignParams(Section):
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the caption (perception) score.")
    format_penalty: float = Field(1.5, ge=0)
    reg_coef: float = Field(0.001, ge=0, description="Weight of the mean squared discriminator score.")
    disc_update: bool = Field(True, description="Train the discriminator each step (the game).")
    seed_per_prompt: bool | None = Field(
        None, description="Key each response's sampling noise by (train.seed, step, its prompt's place in the "
        "step's batch, its sample number) (rollout/noise.py, one batched call), so the samples do not depend on "
        "the batch or the number of processes. Unset: on under torchrun, off in one process (the run's RNG stream).")


class AlignConfig(Section):
    model: PolicyModelConfig = PolicyModelConfig()
    disc: DiscConfig = DiscConfig()
    data: CheckedPromptDataConfig = CheckedPromptDataConfig()
    optim: OptimConfig = OptimConfig(lr=1e-6, weight_decay=0.01, schedule="constant", warmup_ratio=0.0)
    disc_optim: OptimConfig = OptimConfig(lr=1e-6, weight_decay=0.01, schedule="constant", warmup_ratio=0.0)
    rollout: RolloutConfig = RolloutConfig(n=16, prompts_per_step=4, max_new_tokens=6144)
    ppo: PPOConfig = PPOConfig()
    align: AlignParams = AlignParams()
    train: AlignTrainConfig = AlignTrainConfig(steps=500)
    output_dir: str = "runs/align"

    @model_validator(mode="after")
    def _check_combinations(self):
        _check_group_size(self.rollout)
        _check_mini_batches(self.rollout, self.ppo)
        _check_lora_dropout(self.model)
        return self


def _check_lora_dropout(model: PolicyModelConfig) -> None:
    # The PPO ratio compares the training forward's log-probs with the sampler's (which runs in
    # eval mode, no dropout) and with the old log-prob pass (another dropout mask): with adapter
    # dropout they differ at every token even on-policy, and the clip would act on noise.
    if model.lora.enabled and model.lora.dropout > 0:
        raise ValueError(f"model.lora.dropout={model.lora.dropout}: RL and alignment compare the log-probs of the "
                         "sampling policy (no dropout) with those of the training forward, which dropout would make "
                         "differ on every token; set model.lora.dropout=0 (dropout is for SFT)")


def _check_group_size(r: RolloutConfig) -> None:
    # Group-normalised advantages of a group of one are 0: no rollout would ever be rewarded.
    if r.n < 2:
        raise ValueError(f"rollout.n={r.n}: group-normalised advantages need at least 2 samples per prompt "
                         "(with one, every advantage is 0 and the policy never moves)")


def _check_mini_batches(r: RolloutConfig, ppo: PPOConfig) -> None:
    rows = r.n * r.prompts_per_step
    if ppo.mini_batches > rows:
        raise ValueError(f"mini_batches={ppo.mini_batches} is more than the {rows} rollouts of a step "
                         f"(rollout.n x rollout.prompts_per_step)")


C = TypeVar("C", bound=BaseModel)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["train.lr=2e-4", "data.skip_bad=true"]`` into a nested dict (YAML-typed values)."""
    nested: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        value = _parse_value(raw)
        node = nested
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{p}' is not a section")
        node[parts[-1]] = value
    return nested


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)$")


def _parse_value(raw: str) -> Any:
    """YAML typing, plus ``2e-4``-style floats (YAML 1.1 reads those as strings)."""
    if raw == "":
        return ""
    value = yaml.safe_load(raw)
    if isinstance(value, str) and _NUMBER.match(raw.strip()):
        return float(raw)
    return value


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _describe(err: ValidationError, cls: type[BaseModel], origin: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown config key '{key}'{_valid_keys_hint(cls, e['loc'])}")
        elif e["type"] == "value_error" and isinstance(e.get("input"), dict):
            # a check across several keys (a model validator): its message names them
            msg = str(e.get("ctx", {}).get("error", e["msg"]))
            lines.append(f"'{key}': {msg}" if key else msg)
        else:
            lines.append(f"bad value for '{key}': {e['msg']} (got {e.get('input')!r})")
    return f"{origin}: " + "; ".join(lines)


def _valid_keys_hint(cls: type[BaseModel], loc: tuple) -> str:
    node: Any = cls
    for p in loc[:-1]:
        field = getattr(node, "model_fields", {}).get(p)
        if field is None:
            return ""
        node = field.annotation
    fields = getattr(node, "model_fields", None)
    return f" (valid keys here: {', '.join(fields)})" if fields else ""


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None,
                defaults: dict[str, Any] | None = None) -> C:
    """Load ``cls``: ``defaults`` (e.g. an algorithm preset), then the YAML file, then the
    dotted overrides, each on top of the previous."""
    data: dict[str, Any] = {}
    origin = "defaults"
    if path:
        origin = str(path)
        data = _read_yaml(path)
    if defaults:
        data = _merge(defaults, data)
    if overrides:
        data = _merge(data, parse_overrides(overrides))
        origin += " + command-line overrides"
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, cls, origin)) from None


def _read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping of sections in a YAML config file; a missing or malformed file is a ConfigError."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return loaded or {}


def rl_response_limit(rl_config: str | Path | None = None) -> int:
    """RLVR's response limit ``rollout.max_new_tokens``: the RL config file's, else RLConfig's default.

    Jobs that sample responses for later stages (the difficulty filter, warm-up pairs) use
    it: at a lower limit a long correct answer is cut off and scored wrong, which skews what
    they keep toward short, easy problems. Only the ``rollout`` section of the file is read
    (and checked), so a config that leans on an ``--algo`` preset still works here.
    """
    if not rl_config:
        return RolloutConfig.model_fields["max_new_tokens"].default
    section = _read_yaml(rl_config).get("rollout") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{rl_config}: 'rollout' must be a mapping of keys")
    try:
        return RolloutConfig.model_validate(section).max_new_tokens
    except ValidationError as e:
        raise ConfigError(_describe(e, RolloutConfig, f"{rl_config}, section 'rollout'")) from None


def save_config(cfg: BaseModel, out_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config beside the run's outputs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path
