"""The job service's data layer: what a job and a row may contain (`spec`), streaming readers and atomic
writers (`io`), per-shard and per-job statistics (`stats`), and the job registry (`store`)."""
