"""Preparing a corpus: sources -> tokenizer -> encoded documents (text or chat) -> shards.

`python -m data_pipeline.prepare` runs `pipeline.main`; `prepare(cfg)` is the entry point for code.
Uses the shard format (`data_pipeline.shards`) and storage (`data_pipeline.storage`); nothing here
reads batches.
"""
from data_pipeline.prepare.pipeline import PrepareError, prepare

__all__ = ["PrepareError", "prepare"]
