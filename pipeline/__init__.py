"""layerfuse.pipeline: the two phases, one subpackage per stage of the data flow.

    data/      sources of image-instruction samples: LLaVA JSON, WebDataset, the built-in synthetic set
    models/    vision encoder, instruction embedder, LLM loading, the embedded default models, a trained run
    cache/     phase one: extract into the zarr v3 feature cache, read it, verify it
    training/  phase two: loader and epoch plan, train, checkpoints, metrics, evaluate, live inference
    ablation/  fusion sweeps sharing one pass over the cache, their report and plots
    harness/   a trained run inside benchmark harnesses (lmms-eval, VLMEvalKit), answering from raw images live
    cli.py     the `layerfuse` command (also `torchrun -m layerfuse.pipeline.cli`)

Imports go one way, down this list (data before models, ..., ablation and harness before cli; those two are
siblings); tests/test_layering.py checks it.
"""
