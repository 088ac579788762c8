"""Every on-disk format, each read and written in one place: atomic writes and the directory
transaction, safetensors, shards, staging, the artifact manifest and model card, bit policies,
inventory rows, lineage, prompt files, the render catalog and the file-hash cache.

No Prefect, no Dask, no network. Imports only hlwq.quant below it.
"""
