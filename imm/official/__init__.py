"""The checkpoints the IMM paper's authors released (lumalabs/imm), read without running anything from them.

- imm.official.reader: the restricted reader of EDM's persistence format (a pickle, or a torch.save file, of
  `{'ema': IMMPrecond, ...}` whose network objects carry their module's source code): tensors, containers and
  every object's recorded state; the embedded source is hashed, never run.
- imm.official.convert: what the file's network is (a DiT or a DDPM++/SongUNet, its sizes) and how it was
  sampled (parameterization, second time input, T, eps, sigma_data, time_scale), and its weights under our
  networks' names.

The command that turns such a file into a run directory of ours is `--config-name import` (imm/tasks/importer.py).
"""
