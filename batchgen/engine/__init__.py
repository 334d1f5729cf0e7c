"""The generation engine: request state, KV blocks, scheduler, model runner, sampler, step loop."""
