"""What a flow does around the stages: DVC commits (versioning), retention, metrics, experiment
tracking, the report and the console lines. Imports dashflow.core only."""
