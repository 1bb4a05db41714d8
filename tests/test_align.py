"""The alignment step's pieces on the tiny discriminator: rewards from the frozen
discriminator, and one discriminator update against the teacher (METHOD.md section 6, steps 2 and 5)."""

import torch

from prism_rl.config import AlignConfig
from prism_rl.data.processing import encode_prompt
from prism_rl.data.records import ImageRef, Record
from prism_rl.format import SYSTEM_PROMPT, make_response, split_text
from prism_rl.models.discriminator import Discriminator, init_discriminator, score_texts
from prism_rl.models.loading import load_processor
from prism_rl.rollout.base import Rollouts
from prism_rl.trainers.align import discriminator_step, reward_scores
from prism_rl.trainers.optim import build_optimizer, build_scheduler

from conftest import png_bytes


def _prompt(proc, i):
    teacher = make_response(f"- a red circle\n- {i} squares", f"{i} + 1 = {i + 1}", str(i + 1))
    cap, cot = split_text(teacher)
    rec = Record(id=str(i), messages=[{"role": "system", "content": SYSTEM_PROMPT},
                                      {"role": "user", "content": "<image>How many?"}],
                 images=[ImageRef(data=png_bytes())], ground_truth=str(i + 1),
                 extra={"teacher_caption": cap, "teacher_cot": cot.lstrip()})
    return encode_prompt(proc, rec)


def _rollouts(texts, n_prompts, n):
    B = len(texts)
    z = torch.zeros(B, 1, dtype=torch.long)
    return Rollouts(prompt_ids=z, prompt_mask=z, prompt_mm_types=z, response_ids=z, response_mask=z + 1,
                    group_ids=torch.arange(n_prompts).repeat_interleave(n), texts=texts,
                    finish_reasons=["stop"] * B, records=[None] * B)


def test_discriminator_step_moves_toward_teacher(tiny_model_dir, tmp_path):
    disc_dir = init_discriminator(tiny_model_dir, tmp_path / "disc", seed=0)
    disc = Discriminator.load(disc_dir)
    disc.train()
    proc = load_processor(disc_dir)
    prompts = [_prompt(proc, i) for i in range(2)]
    n = 3
    bad = make_response("- nothing", "no idea", "42")
    texts = [bad, "not the format", bad, bad, bad, "<caption>x</caption>"]
    ro = _rollouts(texts, 2, n)
    cfg = AlignConfig(disc_optim={"lr": 1e-2, "schedule": "constant", "warmup_ratio": 0.0})
    sc = reward_scores(disc, proc, prompts, ro, n, 8)
    assert sc.valid.tolist() == [True, False, True, True, True, False]
    assert (sc.cap[~sc.valid] == 0).all() and (sc.reason[~sc.valid] == 0).all()
    assert not sc.cap.requires_grad                                  # rewards come from a frozen pass
    opt = build_optimizer(disc.parameters(), cfg.disc_optim)
    sched = build_scheduler(opt, cfg.disc_optim, 10)

    def gap():
        disc.eval()
        with torch.no_grad():
            t = score_texts(disc, proc, prompts[:1], [prompts[0].record.extra["teacher_caption"]],
                            [prompts[0].record.extra["teacher_cot"]])
            s = reward_scores(disc, proc, prompts[:1], _rollouts([bad], 1, 1), 1, 8)
        disc.train()
        return float(t.cap - s.cap), float(t.reason - s.reason)

    before = gap()
    for _ in range(5):
        m = discriminator_step(disc, opt, sched, proc, prompts, ro, sc.valid, n, cfg)
    after = gap()
    assert {"disc/cap_gap", "disc/reason_gap", "disc/cap_acc", "disc/reason_acc", "disc/loss", "disc/reg"} <= m.keys()
    assert after[0] > before[0] and after[1] > before[1]              # teacher pulled above student
    # no valid rollout: nothing to learn from, no update
    none_valid = discriminator_step(disc, opt, sched, proc, prompts, ro, torch.zeros(6, dtype=torch.bool), n, cfg)
    assert none_valid == {"disc/skipped": 1.0}
