"""Shared fixtures: a tiny Qwen3-VL checkpoint built once per test session, small images, and
the repository's paths (so that tests pass from any working directory)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from prism_rl.format import SYSTEM_PROMPT, make_response
from prism_rl.models.tiny import TinySpec, build_tiny

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def _corpus() -> list[str]:
    resp = make_response("- white background\n- a red circle at top-left\n- two blue squares",
                         "There is 1 red circle. 1 + 2 = 3.", "3")
    chat = ("<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\n"
            "How many red circles are there?<|im_end|>\n<|im_start|>assistant\n" + resp + "<|im_end|>\n")
    return [chat] * 30 + ["What is the sum of the digits? The largest bar is B."] * 10


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"), _corpus(), TinySpec(vocab_size=512))


def overflowing_copy(tiny_model_dir, dest):
    """A copy of the tiny model at ``dest`` with its final norm scaled by 3e38: finite weights (a
    run may start from them) whose hidden state overflows to inf before the head, so every logit
    is NaN/inf."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_model_dir, dest)
    weights = load_file(dest / "model.safetensors")
    weights["model.language_model.norm.weight"].fill_(3e38)
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def shadowed_math_verify_env(tmp_path: Path, body: str) -> dict:
    """An environment (for a subprocess) whose ``math_verify`` is a module that runs ``body`` on
    import, ahead of the real one: a broken or missing install, made on purpose."""
    import os

    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "math_verify.py").write_text(body + "\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(ROOT / "src")]), "OMP_NUM_THREADS": "1"}


def png_bytes(color: str = "red", size: int = 96, shape: str = "circle") -> bytes:
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    (draw.ellipse if shape == "circle" else draw.rectangle)((4, 4, 28, 28), fill=color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def mixed_prompts(proc, images: int) -> list:
    """``images`` prompts of growing length with images of growing size, then one text-only
    prompt, encoded: mixed prompt lengths for the rollout engines' tests."""
    from prism_rl.data.processing import encode_prompt
    from prism_rl.data.records import ImageRef, Record

    recs = [Record(id=str(i), messages=[{"role": "user", "content": "<image>" + "How many circles? " * (1 + 2 * i)}],
                   images=[ImageRef(data=png_bytes(size=64 + 32 * i))]) for i in range(images)]
    recs.append(Record(id="t", messages=[{"role": "user", "content": "A question without an image."}]))
    return [encode_prompt(proc, r) for r in recs]
