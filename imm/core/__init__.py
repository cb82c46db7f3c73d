"""The IMM method as pure PyTorch: no Hydra, MLflow or file I/O, nothing else from the project.

Modules (each function's docstring gives its formula and the spec section):
- schedules: interpolants (fm, cosine), log-SNR, eta and inverses, DDIM;
- parameterization: the one-step map f_{s,t} (euler_fm, simple_edm, identity) around a network;
- mapping: r(s, t);
- objective: kernels, kernel weightings, time weight w(s,t), group MMD, IMM and FM objectives;
- sampling: time grids, pushforward and restart samplers, classifier-free guidance;
- meanflow, consistency: the MeanFlow and iCT objectives (and iCT's consistency parameterization);
- methods: the registry of objectives (loss.objective).
"""

from imm.core import consistency, mapping, meanflow, methods, objective, parameterization, sampling, schedules

__all__ = [
    "consistency",
    "mapping",
    "meanflow",
    "methods",
    "objective",
    "parameterization",
    "sampling",
    "schedules",
]
