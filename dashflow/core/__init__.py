"""The library under every stage, one module per concern (README.md's code map has a line for each):
parameters (parameters, presets, config, stage_configs, params_file, schedule, layout), a stage and its
data (stage, prefect_task, schema, sampled_batch, store/), the learner (algorithms: the loss; update;
optimizer_state; batches, torchrun, precision), models and samplers (models, policy, samplers,
vllm_engine, scaleout), tasks and
rewards (problems, prompts, answers, rewards, code, sandbox, sandbox_runner). It imports nothing above
it (`dashflow layers`)."""
