"""LoRA on the policy (``model.lora``, models/lora.py), on the tiny Qwen3-VL in fp32 (CPU).

Config checks; only the text decoder's projections get adapters and only they train (base
weights bitwise equal after an SFT step); gradient checkpointing gives the gradients of none;
both rollout engines sample the adapted policy (greedy graph tokens == generate's); an RL update
changes the adapted policy's log-probs; a LoRA SFT run checkpoints the adapter alone, resumes to
exactly the uninterrupted run, and exports a plain folder whose logits are the adapted model's.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from prism_rl.actor import ppo_update, sequence_logprobs
from prism_rl.cli import main
from prism_rl.config import (
    AlgoConfig,
    AlignConfig,
    ConfigError,
    EvalConfig,
    LoraConfig,
    PolicyModelConfig,
    RLConfig,
    SFTConfig,
    load_config,
)
from prism_rl.data.processing import collate, encode_prompt, encode_sft
from prism_rl.data.records import DataError, ImageRef, Record
from prism_rl.format import make_response
from prism_rl.models.loading import load_policy, special_ids
from prism_rl.models.logprobs import response_logprobs
from prism_rl.models.lora import add_lora, effective_weight, is_lora, load_adapter, merged_state_dict, save_adapter
from prism_rl.rollout.base import SamplingParams, micro_batch
from prism_rl.rollout.graph import GraphEngine
from prism_rl.rollout.hf import HFEngine
from prism_rl.trainers.optim import build_optimizer
from prism_rl.trainers.sft import sft_step

from conftest import CONFIGS, png_bytes

CPU = torch.device("cpu")
PROJ = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _lora_policy(tiny_model_dir, r=4, b_std=0.0, seed=0, **model_kw):
    """The tiny policy with LoRA; ``b_std > 0`` draws B too (it starts at zero: a no-op adapter)."""
    torch.manual_seed(seed)
    cfg = PolicyModelConfig(path=str(tiny_model_dir), lora=LoraConfig(r=r), **model_kw)
    model, proc = load_policy(cfg, CPU, trainable=True)
    model = add_lora(model, cfg.lora, cfg.path)
    if b_std:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(b_std * torch.randn(p.shape, generator=g))
    return model, proc


def _records():
    return [Record(id="0", messages=[{"role": "user", "content": "<image>How many?"}], images=[ImageRef(data=png_bytes())]),
            Record(id="1", messages=[{"role": "user", "content": "Add the digits of 12345."}])]


# ---- config


@pytest.mark.parametrize("override, says", [
    ("model.lora.r=-1", "'model.lora.r'"),
    ("model.lora.alpha=0", "'model.lora.alpha'"),
    ("model.lora.dropout=1.0", "'model.lora.dropout'"),
    ("model.lora.target_modules=[]", "'model.lora.target_modules'"),
    ("model.lora.target_modules=[layers.0.q_proj]", "identifiers such as q_proj"),
    ("model.lora.target_modules=[q_proj,q_proj]", "named twice"),
    ("model.lora.rank=8", "unknown config key 'model.lora.rank'"),
])
def test_bad_lora_settings_are_config_errors_naming_the_key(override, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        load_config(SFTConfig, overrides=[override])


def test_lora_defaults_off_and_only_policy_stages_have_it():
    cfg = load_config(SFTConfig, overrides=["model.lora.r=8"])
    assert cfg.model.lora.enabled and cfg.model.lora.scaling == 2.0          # alpha null: 2 r
    assert load_config(SFTConfig, overrides=["model.lora.r=8", "model.lora.alpha=4"]).model.lora.scaling == 0.5
    assert not SFTConfig().model.lora.enabled and SFTConfig().model.lora.target_modules == sorted(
        PROJ, key=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"].index)
    with pytest.raises(ConfigError, match="unknown config key 'model.lora'"):
        load_config(EvalConfig, overrides=["model.lora.r=8"])              # evaluation loads plain folders


@pytest.mark.parametrize("cls", [RLConfig, AlignConfig])
def test_adapter_dropout_is_refused_where_log_probs_are_compared(cls):
    with pytest.raises(ConfigError, match=r"model.lora.dropout=0.1: RL and alignment compare"):
        load_config(cls, overrides=["model.lora.r=8", "model.lora.dropout=0.1"])
    assert load_config(cls, overrides=["model.lora.r=8"]).model.lora.dropout == 0.0
    assert load_config(SFTConfig, overrides=["model.lora.r=8", "model.lora.dropout=0.1"]).model.lora.dropout == 0.1


def test_unknown_target_module_is_a_config_error(tiny_model_dir):
    model, _ = load_policy(PolicyModelConfig(path=str(tiny_model_dir)), CPU)
    with pytest.raises(ConfigError, match=r"model.lora.target_modules: no linear layer named \['qkv'\].*q_proj"):
        add_lora(model, LoraConfig(r=2, target_modules=["q_proj", "qkv"]))   # qkv: a vision tower layer
    assert not is_lora(model)


def test_r_zero_leaves_the_model_as_it_was(tiny_model_dir):
    model, _ = load_policy(PolicyModelConfig(path=str(tiny_model_dir)), CPU)
    assert add_lora(model, LoraConfig()) is model and not is_lora(model)
    assert all(p.requires_grad for p in model.parameters())
    assert not any("lora" in n for n, _ in model.named_parameters())


# ---- what trains


def test_only_text_decoder_adapters_train_and_base_weights_stay_bitwise(tiny_model_dir):
    model, proc = _lora_policy(tiny_model_dir)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    layers = len(model.model.language_model.layers)
    assert len(trainable) == 2 * len(PROJ) * layers
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == PROJ
    assert all("language_model.layers." in n for n in trainable)              # nothing in the vision tower
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    eos, pad = special_ids(proc)
    rec = Record(id="0", messages=[{"role": "user", "content": "<image>How many?"}], images=[ImageRef(data=png_bytes())],
                 response=make_response("- a circle", "one circle", "1"))
    opt = build_optimizer(model.parameters(), SFTConfig().optim.model_copy(update={"lr": 1e-2}))
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable)   # optimizer over the adapters only
    for _ in range(2):                          # step 1 moves B off zero, step 2 then moves A too
        sft_step(model, [[encode_sft(proc, rec, eos, 256)]], pad, CPU)
        opt.step()
        opt.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n


def test_bf16_base_keeps_fp32_adapters_that_train(tiny_model_dir):
    """``model.dtype=bfloat16``: the frozen base in bf16 (half the memory), the adapters in fp32
    so AdamW's small updates are not rounded away; the forward runs and the adapters learn."""
    model, proc = _lora_policy(tiny_model_dir, dtype="bfloat16")
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if ".lora_" in n)
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if ".lora_" not in n)
    eos, pad = special_ids(proc)
    rec = Record(id="0", messages=[{"role": "user", "content": "<image>How many?"}], images=[ImageRef(data=png_bytes())],
                 response=make_response("- a circle", "one circle", "1"))
    opt = build_optimizer(model.parameters(), SFTConfig().optim.model_copy(update={"lr": 1e-2}))
    losses = []
    for _ in range(3):
        losses.append(sft_step(model, [[encode_sft(proc, rec, eos, 256)]], pad, CPU)[0])
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert losses[-1] < losses[0]


def test_gradient_checkpointing_gives_the_adapter_gradients_of_none(tiny_model_dir):
    plain, proc = _lora_policy(tiny_model_dir, b_std=0.1)
    ckpt, _ = _lora_policy(tiny_model_dir, b_std=0.1, gradient_checkpointing=True)
    torch.manual_seed(1)
    ro = HFEngine(plain, proc).generate([encode_prompt(proc, r) for r in _records()], SamplingParams(n=2, max_new_tokens=8))
    batch, P, mask = micro_batch(ro, list(range(len(ro))))
    grads = []
    for model in (plain, ckpt):
        loss = -(response_logprobs(model, batch, P) * mask).sum() / mask.sum()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


# ---- rollouts and the RL update


def test_graph_engine_samples_the_adapted_policy(tiny_model_dir):
    """Greedy tokens of the graph engine == generate's on a LoRA policy whose adapters are not
    zero (std-0.3 base weights as in test_graph_engine, so tokens depend on the weights); and the
    adapters matter: the same weights without them decode other tokens."""
    model, proc = _lora_policy(tiny_model_dir, b_std=0.5)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "visual" not in name and "lora_" not in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    prompts = [encode_prompt(proc, r) for r in _records()]
    params = SamplingParams(n=1, max_new_tokens=16, temperature=0.0, return_logprobs=True)
    a, b = HFEngine(model, proc).generate(prompts, params), GraphEngine(model, proc).generate(prompts, params)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    assert torch.allclose(a.logprobs * a.response_mask, b.logprobs * b.response_mask, atol=1e-4)
    plain = merged_state_dict(model.state_dict(), 0.0)   # scale 0: the base weights alone
    base, _ = load_policy(PolicyModelConfig(path=str(tiny_model_dir)), CPU, trainable=False)
    base.load_state_dict(plain)
    c = GraphEngine(base, proc).generate(prompts, params)
    assert not torch.equal(c.response_ids, b.response_ids)


def test_effective_weight_is_what_the_layer_applies(tiny_model_dir):
    """For code that builds its own kernels from ``.weight`` (fused decode projections): a LoRA
    layer's ``.weight`` is the base alone; :func:`effective_weight` includes the adapter."""
    model, _ = _lora_policy(tiny_model_dir, b_std=0.5)
    model.eval()
    attn = model.model.language_model.layers[0].self_attn
    x = torch.randn(3, attn.q_proj.in_features)
    with torch.no_grad():
        assert not torch.allclose(torch.nn.functional.linear(x, attn.q_proj.weight), attn.q_proj(x), atol=1e-3)
        assert torch.allclose(torch.nn.functional.linear(x, effective_weight(attn.q_proj)), attn.q_proj(x), atol=1e-5)
    plain = model.model.language_model.layers[0].input_layernorm
    assert effective_weight(plain) is plain.weight


def test_graph_engines_low_precision_copy_follows_the_adapters(tiny_model_dir):
    """The decode copy in another dtype (bf16 on a GPU; here on the CPU) holds the LoRA layers
    too, refreshed from the policy's current adapters before each generate."""
    model, proc = _lora_policy(tiny_model_dir, b_std=0.5)
    engine = GraphEngine(model, proc, decode_dtype=torch.bfloat16)
    params = SamplingParams(n=1, max_new_tokens=4, temperature=0.0)
    prompts = [encode_prompt(proc, r) for r in _records()]
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(sign)
        engine.generate(prompts, params)
        mine = dict(engine.shadow.lm.named_parameters())
        theirs = {n: p for n, p in model.model.language_model.named_parameters() if "lora_B" in n}
        assert theirs and all(torch.equal(mine[n], p.to(torch.bfloat16)) for n, p in theirs.items())


def test_rl_update_changes_the_adapted_policys_logprobs(tiny_model_dir):
    model, proc = _lora_policy(tiny_model_dir)
    torch.manual_seed(1)
    ro = HFEngine(model, proc).generate([encode_prompt(proc, r) for r in _records()], SamplingParams(n=3, max_new_tokens=8))
    old = sequence_logprobs(model, ro, micro=6, device=CPU)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = build_optimizer(model.parameters(), SFTConfig().optim.model_copy(update={"lr": 1e-2}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    for _ in range(2):
        m = ppo_update(model, opt, sched, ro, adv, old, AlgoConfig(), grad_clip=1e9, device=CPU)
    assert m["grad_norm"] > 0
    new = sequence_logprobs(model, ro, micro=6, device=CPU)
    mask = ro.response_mask.bool()
    assert float((new - old)[mask].abs().max()) > 1e-3
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if not p.requires_grad)


# ---- checkpoints, resume, export (the CLI)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    assert main(["data", "synth", "--out", str(root / "data"), "--n", "24", "--seed", "5"]) == 0
    return root


def _sft_args(model_dir, data_root, out, *extra: str) -> list[str]:
    return ["sft", "--config", str(CONFIGS / "quickstart" / "sft.yaml"), f"model.path={model_dir}",
            f"data.train={data_root / 'data' / 'sft.json'}", f"output_dir={out}", "train.max_steps=4",
            "train.batch_size=4", "train.log_every=1", "optim.warmup_ratio=0.25", "data.max_length=256",
            "model.lora.r=4", "model.lora.dropout=0.1", "optim.lr=2e-2", *extra]


def _losses(run_dir) -> list[float]:
    return [r["actor/loss"] for r in map(json.loads, open(run_dir / "metrics.jsonl")) if "actor/loss" in r]


def test_lora_sft_resumes_exactly_and_exports_a_plain_merged_folder(tiny_model_dir, sft_data, tmp_path):
    full, halted = tmp_path / "full", tmp_path / "halted"
    assert main(_sft_args(tiny_model_dir, sft_data, full)) == 0
    assert main([*_sft_args(tiny_model_dir, sft_data, halted), "--halt-at-step", "2"]) == 0
    ckpt = halted / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    assert sum(f.stat().st_size for f in ckpt.glob("adapter_model.safetensors")) < 0.2 * (
        tiny_model_dir / "model.safetensors").stat().st_size                 # the adapter alone, not the base
    assert main([*_sft_args(tiny_model_dir, sft_data, halted), "--resume"]) == 0
    assert len(_losses(full)) == 4 and _losses(halted) == _losses(full)       # dropout RNG and optimizer restored
    w_full, w_halted = load_file(full / "final" / "model.safetensors"), load_file(halted / "final" / "model.safetensors")
    assert w_full.keys() == w_halted.keys() and all(torch.equal(w_full[k], w_halted[k]) for k in w_full)
    start = load_file(tiny_model_dir / "model.safetensors")
    assert not any("lora" in k or "base_layer" in k for k in w_full)          # a plain folder
    moved = {k for k in w_full if k in start and not torch.equal(w_full[k], start[k])}
    assert moved and all(k.split(".")[-2] in PROJ for k in moved)            # only the adapted layers moved
    assert not (full / "final" / "adapter_config.json").exists()              # from_pretrained must not see an adapter

    # the export's logits == the adapted model's (base + adapter, through peft's own loader)
    from peft import PeftModel
    proc_rec = _records()
    exported = AutoModelForImageTextToText.from_pretrained(full / "final").eval()
    peft_model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_model_dir),
                                           full / "final" / "adapter").eval()
    _, proc = load_policy(PolicyModelConfig(path=str(tiny_model_dir)), CPU, trainable=False)
    batch = collate([encode_prompt(proc, r) for r in proc_rec], special_ids(proc)[1], "left")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        a, b = exported(**inputs).logits, peft_model(**inputs).logits
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        assert float((base(**inputs).logits - a).abs().max()) > 1e-3         # the adapter was really merged


def test_lora_checkpoint_refuses_to_resume_without_lora(tiny_model_dir, sft_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*_sft_args(tiny_model_dir, sft_data, out, "train.max_steps=2"), "--halt-at-step", "1"]) == 0
    capsys.readouterr()
    # r=0 on resume (allowed as a change) cannot load an adapter-only checkpoint: a clear error
    assert main([*_sft_args(tiny_model_dir, sft_data, out, "train.max_steps=2", "model.lora.r=0"),
                 "--resume-with-changes"]) != 0
    assert "checkpoint-1 holds a LoRA adapter, not full weights" in capsys.readouterr().err


def test_adapter_of_another_rank_is_a_data_error(tiny_model_dir, tmp_path):
    model, _ = _lora_policy(tiny_model_dir, r=4, b_std=0.1)
    save_adapter(tmp_path / "a", model)
    other, _ = _lora_policy(tiny_model_dir, r=2)
    with pytest.raises(DataError, match="adapter_model.safetensors: does not fit model.lora"):
        load_adapter(other, tmp_path / "a")
    same, _ = _lora_policy(tiny_model_dir, r=4, seed=3)
    load_adapter(same, tmp_path / "a")
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in same.named_parameters())


def _final_weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_lora_rl_and_align_resume_exactly_and_export_plain_policies(tiny_model_dir, sft_data, tmp_path):
    """``prism rl`` (with a KL term: the reference policy is the plain base) and ``prism align``
    (the discriminator stays full) on a LoRA policy: halted after step 1 and resumed, each ends
    with the uninterrupted run's weights; the exported policy is a plain folder that moved."""
    data = sft_data / "data" / "align.parquet"
    disc = tmp_path / "disc"
    assert main(["disc", "init", "--from", str(tiny_model_dir), "--out", str(disc)]) == 0
    reward = tmp_path / "reward.py"   # the untrained tiny policy never writes the format: reward what varies
    reward.write_text("def score(response, ground_truth, **kw):\n    return sum(map(ord, response)) % 7 / 7\n")
    rl = ["rl", "--algo", "grpo", "--config", str(CONFIGS / "quickstart" / "rl.yaml"), f"model.path={tiny_model_dir}",
          f"data.train={data}", f"reward.function={reward}:score", "train.steps=2", "rollout.n=4",
          "rollout.prompts_per_step=2", "rollout.max_new_tokens=16",
          "algo.kl_coef=0.01", "model.lora.r=4", "optim.lr=1e-2", "data.check_prompt_format=false"]
    align = ["align", "--config", str(CONFIGS / "quickstart" / "align.yaml"), f"model.path={tiny_model_dir}",
             f"disc.path={disc}", f"data.train={data}", "train.steps=2", "rollout.n=4", "rollout.prompts_per_step=2",
             "rollout.max_new_tokens=16", "model.lora.r=4", "optim.lr=1e-2", "data.check_prompt_format=false"]
    start = _final_weights(tiny_model_dir)
    for args, sub in ((rl, ""), (align, "policy")):
        full, halted = tmp_path / f"{args[0]}-full", tmp_path / f"{args[0]}-halted"
        assert main([*args, f"output_dir={full}"]) == 0
        assert main([*args, f"output_dir={halted}", "--halt-at-step", "1"]) == 0
        assert (halted / "checkpoint-1" / sub / "adapter_model.safetensors").is_file()
        assert main([*args, f"output_dir={halted}", "--resume"]) == 0
        w, wh = _final_weights(full / "final" / sub), _final_weights(halted / "final" / sub)
        assert w.keys() == wh.keys() and all(torch.equal(w[k], wh[k]) for k in w), args[0]
        assert (full / "final" / sub / "adapter" / "adapter_model.safetensors").is_file()
        moved = {k.split(".")[-2] for k in w if k in start and not torch.equal(w[k], start[k])}
        assert moved and moved <= PROJ, (args[0], moved)
    assert (tmp_path / "align-full" / "final" / "disc" / "value_head.safetensors").is_file()


# ---- torchrun (FSDP2 on gloo): frozen base shards + trainable adapters


def test_lora_sft_on_two_processes_equals_one_and_resumes_sharded(tiny_model_dir, sft_data, tmp_path):
    """LoRA under ``fully_shard``: each decoder layer's unit holds frozen base weights and
    trainable adapters. 2 processes (grad_accum 2) give the 1-process losses (grad_accum 4) and
    merged export within the float tolerance of tests/test_distributed.py; halted at step 2 (a
    sharded checkpoint) and resumed on 2 processes, the run ends exactly where it would have; a
    one-process LoRA checkpoint resumes on 2 processes within that tolerance."""
    from test_distributed import torchrun

    def args(out, ga):
        return [*_sft_args(tiny_model_dir, sft_data, out, f"train.grad_accum={ga}", "train.batch_size=2",
                           "model.lora.dropout=0.0"), "train.max_steps=3"]

    one, two, halted = tmp_path / "one", tmp_path / "two", tmp_path / "halted"
    assert main(args(one, 4)) == 0
    torchrun(2, "-m", "prism_rl.cli", *args(two, 2))
    torchrun(2, "-m", "prism_rl.cli", *args(halted, 2), "--halt-at-step", "2")
    assert (halted / "checkpoint-2" / "dcp" / ".metadata").is_file()
    torchrun(2, "-m", "prism_rl.cli", *args(halted, 2), "--resume")
    assert len(_losses(one)) == 3 and _losses(one) == pytest.approx(_losses(two), rel=1e-5, abs=1e-6)
    assert _losses(halted) == _losses(two)
    w1, w2, wh = (load_file(d / "final" / "model.safetensors") for d in (one, two, halted))
    assert w1.keys() == w2.keys() and not any("lora" in k for k in w2)
    start = load_file(tiny_model_dir / "model.safetensors")
    assert max(float((w2[k] - start[k]).abs().max()) for k in w2 if k in start) > 1e-3
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=1e-4, atol=2e-5), (k, float((w1[k] - w2[k]).abs().max()))
        assert torch.equal(w2[k], wh[k]), k
    a1, a2 = (load_file(d / "final" / "adapter" / "adapter_model.safetensors") for d in (one, two))
    assert a1.keys() == a2.keys() and all(torch.allclose(a1[k], a2[k], rtol=1e-4, atol=2e-5) for k in a1)
    up = tmp_path / "up"             # a one-process checkpoint (adapter + its AdamW states) resumed on 2 processes
    assert main([*args(up, 4), "--halt-at-step", "2"]) == 0
    torchrun(2, "-m", "prism_rl.cli", *args(up, 2), "--resume")
    assert _losses(up) == pytest.approx(_losses(one), rel=1e-5, abs=1e-6)
    wu = load_file(up / "final" / "model.safetensors")
    assert all(torch.allclose(w1[k], wu[k], rtol=1e-4, atol=2e-5) for k in w1)


def test_checkpoint_of_a_version_without_lora_settings_resumes_unchanged(tmp_path):
    """A checkpoint written before ``model.lora`` existed saved no such keys; they take their
    defaults (LoRA off, what that run did), so ``--resume`` finds no change to refuse."""
    from prism_rl.trainers.resume_config import check_resume_config

    cfg = load_config(SFTConfig)
    saved = cfg.model_dump(mode="json")
    del saved["model"]["lora"]
    assert check_resume_config(cfg, saved, tmp_path / "checkpoint-2", allow_changes=False) == {}
    lora = load_config(SFTConfig, overrides=["model.lora.r=8"])
    with pytest.raises(ConfigError, match=r"model.lora.r 0 -> 8"):
        check_resume_config(lora, saved, tmp_path / "checkpoint-2", allow_changes=False)
