"""Prefect flows (installed as `dashflow.flows`): compose the stages in tasks/, no algorithm code."""
