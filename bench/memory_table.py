"""Computed (not measured) GPU memory per card for each stage under FSDP2, by model size and GPU count.

Bytes per parameter, as prism-rl's distributed mode holds them (src/prism_rl/distributed.py):
sharded over N GPUs: fp32 master weights 4 + fp32 gradients 4 + AdamW m and v 8 = 16 B;
not sharded: the bf16 rollout copy of RL and alignment, 2 B per policy parameter on every GPU.
Plus estimates: activations with gradient checkpointing, one 8,192-token micro-batch
(layer-boundary hidden states, one layer's internals, a 2,048-row fp32 logits chunk): ~8 GB at
8B, ~6 GB at 4B; the rollout KV cache the graph engine is given (its waves fit the budget): 20 GB;
the discriminator's activations in alignment: ~4 GB. No multi-GPU measurement backs these numbers.
Usage: python bench/memory_table.py
"""

GB = 1e9
POLICY = {"2B": 2.1e9, "4B": 4.4e9, "8B": 8.8e9}
DISC = 6.0e9            # 2B upcycled to 4 experts (the paper's ~6B MoE discriminator)
ACT = {"2B": 4, "4B": 6, "8B": 8}
KV = 20


def per_gpu(stage: str, size: str, n: int, offload: bool = False) -> float:
    """GB per GPU: sharded states 16 P / N (0 on the GPU with CPU offload), + rollout copy 2 P, + estimates."""
    p = POLICY[size]
    sharded = 0.0 if offload else 16 * p / n
    if stage == "sft":
        return (sharded / GB) + ACT[size]
    total = sharded / GB + 2 * p / GB + ACT[size] + KV
    if stage == "align":
        total += (0.0 if offload else 16 * DISC / n / GB) + 4
    return total


def main() -> None:
    print("| stage | policy | " + " | ".join(f"{n} GPU" for n in (1, 2, 4, 8)) + " |")
    print("|---|---|" + "---|" * 4)
    for stage in ("sft", "rl", "align"):
        for size in POLICY:
            cells = []
            for n in (1, 2, 4, 8):
                gb = per_gpu(stage, size, n)
                fit = "H200+80GB" if gb <= 75 else "H200" if gb <= 135 else "no"
                cells.append(f"{gb:.0f} GB ({fit})")
            print(f"| {stage} | {size} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
