"""Phase two: the cache loader and its epoch plan, training and its checkpoints, metrics, evaluation, and live
inference from raw images."""
