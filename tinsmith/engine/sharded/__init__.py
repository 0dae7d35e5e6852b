"""The sharded engine: one base model and its LoRA runs sharded with FSDP2 over a group of
rank processes (one per GPU with NCCL, one per process with gloo on a CPU), driven from the
server process. See docs/scale-out.md.

- trainer.py: `ShardedTrainer` (the TrainingBackend the scheduler holds) and
  `sharded_backends`, which pairs it with a sampler in the coordinator;
- group.py: spawning the ranks, commands over pipes, noticing a dead rank;
- desk.py: the group address workers on other machines join (token, heartbeats);
- joiner.py: the worker's side (`tinsmith worker --join`): its ranks, connected back;
- rank.py: a rank's process: process group, FSDP2 wrapping, the commands;
- passes.py: a packed training pass split over the ranks;
- shards.py: one run's LoRA masters and AdamW state as DTensor shards.
"""

from tinsmith.engine.sharded.group import GroupFailed, GroupSpec
from tinsmith.engine.sharded.trainer import ShardedTrainer, sharded_backends

__all__ = ["GroupFailed", "GroupSpec", "ShardedTrainer", "sharded_backends"]
