"""OpenAI's Batch API (files and batches), a jobs dashboard and Prometheus metrics over the job service:
`batchgen serve`, built by `batchgen.api.app.create_app`."""
