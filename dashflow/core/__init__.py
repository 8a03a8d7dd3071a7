"""The library under every stage: parameters and run layout (config), the rollout table
(schema), manifests and atomic writes (store), algorithm math (algorithms), models
(policy), samplers, prompts, answer checking (answers), rewards, the code sandbox and the
task loaders (problems, code). It imports nothing above it (`dashflow layers`)."""
