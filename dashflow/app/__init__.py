"""The application on top: the `dashflow` command line, the local Prefect server and worker
(serving), the reaper, inspect/diff, and the import-rule check (layers)."""
