"""Merge methods: one file each, pure tensor functions, registered in `registry`."""
