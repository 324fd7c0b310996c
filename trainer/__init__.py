"""trainer — DeepSpeed ZeRO trainer workers (DESIGN.md §5): actor, critic, reference; SFT.

Modules (one job each):
    config       TrainerConfig, the run config's `trainer:` section
    worker       TrainerWorker: one rank (a plain class, usable as a Ray actor)
    group        TrainerGroup: world_size Ray actors driven as one trainer
    modules      the nn.Modules the engines wrap (policy = sequence_logprobs, critic = value head)
    objectives   policy (rl.algos), value and SFT losses; metric reduction
    step         the micro-batch forward/backward loop of one mini-batch
    batch        the batch format, its validation, row splits
    engine       process group, DeepSpeed config, optimizer, LR schedule
    checkpoint   atomic HF + optimizer/scheduler/RNG checkpoints
    sft, sft_cli `lockstep sft`
    synthetic    random RL batches for tests and benchmarks

Nothing is imported here, so `import trainer.config` stays cheap (no DeepSpeed import).
"""
