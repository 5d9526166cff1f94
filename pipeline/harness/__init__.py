"""A trained run inside other people's benchmark harnesses, answering from raw images live (README "Scoring a run on
benchmarks").

    live.py          LiveRun: greedy answers and continuation log-likelihoods for (image, text) requests, on the live
                     path of `layerfuse infer` (encoder -> fuser -> projector -> LLM; the sentence model for igva)
    lmms.py          the lmms-eval model `layerfuse` (needs lmms-eval: the `eval` extra)
    registration.py  what lmms-eval's model lookup reads (the `lmms_eval.models` entry point in pyproject.toml)
    vlmevalkit.py    a VLMEvalKit-style model: `generate(message, dataset=None)` on image/text message lists
"""
