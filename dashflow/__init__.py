"""dashflow: DASH RL post-training of language models as cached, resumable stages."""

__version__ = "0.1.0"
