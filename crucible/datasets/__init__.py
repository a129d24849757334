"""Uploaded datasets: file formats, row schemas, deterministic splits and blob storage.

Torch-free: the API validates uploads with it and the worker reads rows through it.
"""
