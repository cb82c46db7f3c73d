"""The commands besides training: `--config-name sample` and `--config-name evaluate` (on a training
checkpoint), `--config-name encode` (an image dataset into VAE latents, for data=latents) and `--config-name
sync` (a training's MLflow record completed from its journal); their schemas are in imm.config, the helpers
sample and evaluate share in imm.tasks.common."""
