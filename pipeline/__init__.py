"""glimpse-batch: batch visual question answering with GlimpsePrune token pruning."""

__version__ = "0.1.0"
