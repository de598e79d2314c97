"""The three training stages behind one interface (see :mod:`rectok_fast.training.stages.base`).

In-process use (tests, fixtures)::

    cfg = parse_config(["--preset", "tiny", "--stage", "tokenizer", "--output_dir", out])
    stage = build_stage(cfg, RunContext.local(cfg))        # built, with plain engines
    outcome = stage.train_step([{"images": x, "labels": y, "rank": 0}], step=0, epoch=0.0)
"""
from __future__ import annotations

from rectok_fast.training.stages.base import RunContext, Stage, StepOutcome, seed_step
from rectok_fast.training.stages.dit import DiTStage
from rectok_fast.training.stages.tokenizer import DecoderFTStage, TokenizerStage

STAGE_CLASSES = {"tokenizer": TokenizerStage, "decoder_ft": DecoderFTStage, "dit": DiTStage}

__all__ = ["RunContext", "Stage", "StepOutcome", "seed_step", "TokenizerStage", "DecoderFTStage", "DiTStage",
           "STAGE_CLASSES", "build_stage"]


def build_stage(cfg, ctx: RunContext, engines: bool = True) -> Stage:
    """The stage of ``cfg.stage``, built (models, frozen nets, losses, EMA) and, by default, with its engines."""
    stage = STAGE_CLASSES[cfg.stage](cfg, ctx).build()
    if engines:
        stage.engines()
    return stage
