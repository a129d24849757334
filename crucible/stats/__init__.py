"""Gram statistics: activation hooks (activations), data-free estimators (data_free), the
content-addressed cache (cache) and the pipeline stage (stage). Submodules are imported
where used: data_free is torch-free at import, the others are worker-side."""
