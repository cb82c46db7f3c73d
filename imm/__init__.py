"""IMM: a platform for training few-step generative models with Inductive Moment Matching."""

__version__ = "0.1.0"
