"""The pipeline's stages, one module per stage (installed as `dashflow.tasks`): each holds
its plain function (Parquet in -> Parquet out, cached by its manifest key) and its Prefect
task. A stage imports the library (dashflow.core) only, never another stage."""
