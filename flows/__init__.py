"""Prefect flows: compose the stages in tasks/, no algorithm code."""
