"""Training: the one training loop, teacher training, and what every student's distillation shares.

    trainer        Trainer: accumulation, DDP, autocast, clipping, EMA, logging, exact resume
    train          `kforcing train-teacher`: the teacher's config, batches and loss
    stage_task     what every distillation stage shares (provenance, plateau detection, DistillError)
    schedule       the run a student kind is handed (DistillRun), the schedule check, the loop over stages
    batch_noise    the uniforms, temperatures and boundary draws of training windows (counter-based)

Each student's own stages, targets and losses are in its package (`kforcing.students`).
Imports checkpoints/, models/ and below.
"""
