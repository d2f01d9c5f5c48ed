"""Benchmarks, one command each (see docs/benchmarks.md): `python -m engine.benchmarks.NAME --help`.

    shakespeare  quality per second on CPU against nanoGPT's CPU quickstart and Hugging Face Trainer
    overhead     engine vs a bare PyTorch loop vs Hugging Face Trainer, same math, tokens/s
    memory       saved-activation and optimizer-state bytes, measured exactly, against the design's promises
    gpu          the distilgpt2 architecture on one GPU: engine vs Trainer, memory, tokens/s, MFU
"""
