"""The job service's data layer, in the order a job's data flows: what a job is (`spec`), where it may read and
write (`paths`), input rows (`rows`) read from files (`readers`), engine results as output rows (`output_rows`)
written to the job's output directory (`output_dir`), statistics (`stats`), the registry (`store`), and the
shard execution path (`execute`). Whole-job errors are in `errors`."""
