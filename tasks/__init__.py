"""One module per pipeline stage, plus the shared pieces every stage uses:
`schema` (the rollout table), `store` (manifests, stage keys, atomic writes),
`algorithms` (advantage, filter and loss math), `problems` (datasets), `policy`
(model loading) and `samplers` (generation backends)."""
