"""Serving exports: Hugging Face directories (and GGUF) from any strategy's checkpoint.

Entry points: `hf_export.export_checkpoint` (one checkpoint -> one export directory),
`hook.ExportHook` (the training loop's hook), `files.verify_dir` (re-hash against export.json)
and `python -m train.export` (the offline command).
"""
