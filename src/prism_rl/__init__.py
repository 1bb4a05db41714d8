"""prism-rl: post-training for large multimodal models with the PRISM recipe.

SFT -> discriminator warm-up -> adversarial alignment -> RLVR (GRPO | DAPO | GSPO).
"""

__version__ = "0.1.0"
