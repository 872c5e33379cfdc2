"""Training: the one training loop, teacher training and distillation.

    trainer        Trainer: accumulation, DDP, autocast, clipping, EMA, logging, exact resume
    train          `kforcing train-teacher`: the teacher's config, batches and loss
    distill        `kforcing distill`: the stage schedule AR -> k=1 -> 2 -> 4, or a draft student's stage
    distill_draft  a draft student's stage: training steps, validation by decoding, checkpoints
    stage_task     what every distillation stage shares (provenance, plateau detection, errors)
    targets        push-forward targets: self-forcing windows, training noise, the window loss
    head_targets   draft student targets: the teacher's distribution and features on a window's rows

Imports evaluation/ (for validation metrics), checkpoints/, decoding/ and below.
"""
