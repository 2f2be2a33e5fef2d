"""The training loop's side mechanisms, one small component each.

- `step.OptimizerStep`: the one optimizer-step boundary (update, scheduler, step counter, hooks);
- `lockstep.Lockstep`: keeps processes stepping together when a stream shard runs out early;
- `nonfinite.NonFiniteGuard`: stops on runs of non-finite losses, never checkpoints NaNs (decided with every process);
- `tally.EpochTally`: the epoch's train sums, carried across a mid-epoch resume;
- `stop.StopAgreement`: SIGTERM/Ctrl-C and exhausted streams, agreed across processes.
"""
