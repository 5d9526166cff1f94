"""Phase one and the feature cache: extraction, the zarr v3 store's reader and writer, verification.
The format is specified in docs/cache-format.md."""
