"""The job service's queue side: the Celery app (`app`), the shard and schedule tasks (`tasks`), submitting
jobs to the queue (`submit`) and scheduled job definitions run by beat (`schedules`)."""
