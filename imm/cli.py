"""What launch.py runs inside Hydra: the command the config names, from one table.

`python launch.py` trains; `--config-name sample|evaluate|encode|import` runs that command on a checkpoint, a
dataset or a released official checkpoint, `--config-name sync` completes a training's MLflow record from its run
directory's journal; `dry_run=true` checks a training launch and trains nothing. Each runs as one Hydra job
(imm.launch.job.run: run name, exit status, the one-sentence errors).
"""

from __future__ import annotations

from hydra.core.hydra_config import HydraConfig

from imm.launch import dry_run, job
from imm.tasks import encode, evaluate, importer, sample, sync
from imm.training.loop import train


def _train(cfg, launch: job.Launch):
    if cfg.dry_run:
        return dry_run.run(cfg, launch.hc)
    return train(
        cfg,
        launch.hc.runtime.output_dir,
        tracking_uri=job.tracking_uri(cfg, launch.hc.runtime.cwd),
        run_name=launch.name,
        extra_tags=launch.tags,
        command=launch.command,
    )


# --config-name -> the command; any other config name (conf/config.yaml's and its variants) trains
COMMANDS = {
    "sample": lambda cfg, launch: sample.run(cfg),
    "evaluate": lambda cfg, launch: evaluate.run(cfg),
    "encode": lambda cfg, launch: encode.run(cfg),
    "import": lambda cfg, launch: importer.run(cfg),
    "sync": lambda cfg, launch: sync.run(cfg),
}


def run(cfg):
    return job.run(cfg, COMMANDS.get(HydraConfig.get().job.config_name, _train))
