"""Engine: request state, block manager, KV pool, scheduler, runner, sampler, offline LLM."""
