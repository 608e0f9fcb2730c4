"""Triton kernels of sdkernels (installed as ``sdkernels.kernels``). Kernels and their launchers only: op
definitions, references and dispatch live in ``sdkernels.ops``."""
