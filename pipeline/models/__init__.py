"""Models the pipeline loads: the frozen vision encoder, the instruction embedder, the LLM, the embedded default
tower and LLM, a trained run (fuser + projector + LLM) and greedy generation."""
