"""Train and evaluate the arms of a comparison: one after another here, or as SLURM jobs through submitit.

An arm's work is its training run (``OUT/arms/<arm>/``, the trainer's own folder: it resumes from
its checkpoints) followed by ``eval_hier`` of its ``model.pth`` on every evaluation set
(``OUT/eval/<arm>/<set>/``). ``OUT/arms/<arm>/arm_config.yaml`` records the config the arm was
launched with; a finished arm (``model.pth`` present, the same config) is not trained again, an
evaluation newer than the model is not run again, and an arm folder holding another config is an
error instead of a silent mix.
"""

import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import submitit
from omegaconf import OmegaConf

from dinov2.errors import ConfigError, TrainingError
from dinov2.eval import eval_hier
from dinov2.experiments.arms import config_differences
from dinov2.run.submit import make_executor, tasks_per_node, wait_for_results
from dinov2.run.train.train import TrainingTask

ARM_CONFIG = "arm_config.yaml"
TIMING = "timing.json"
MODEL_FILE = "model.pth"
MAX_LISTED = 6


@dataclass
class ArmPlan:
    """What one arm runs: the trainer's arguments and one ``eval_hier`` argument list per evaluation set."""

    name: str
    folder: Path
    config: object
    train_argv: list
    evaluations: dict  # {set name: (eval folder, eval_hier argv)}

    @property
    def model_file(self) -> Path:
        return self.folder / MODEL_FILE

    def trained(self) -> bool:
        return self.model_file.is_file()

    def pending_evaluations(self) -> dict:
        """The evaluations without a ``metrics.json`` newer than the model file."""
        model_time = self.model_file.stat().st_mtime if self.trained() else float("inf")
        return {
            name: argv
            for name, (folder, argv) in self.evaluations.items()
            if not ((folder / "metrics.json").is_file() and (folder / "metrics.json").stat().st_mtime >= model_time)
        }


def claim_folder(plan: ArmPlan) -> None:
    """Record the arm's config in its folder, or check that the folder already holds the same one."""
    record = plan.folder / ARM_CONFIG
    if record.is_file():
        recorded = OmegaConf.load(record)
        changed = config_differences({"recorded": recorded, "now": plan.config})
        if changed:
            shown = list(changed.items())[:MAX_LISTED]
            listed = "; ".join(f"{key}: {v['recorded']!r} -> {v['now']!r}" for key, v in shown)
            raise ConfigError(
                f"{plan.folder} holds arm {plan.name!r} trained with another config ({listed}); "
                "use a new --output-dir, or delete that folder to train the arm again"
            )
        return
    plan.folder.mkdir(parents=True, exist_ok=True)
    record.write_text(OmegaConf.to_yaml(plan.config))


def evaluate(plan: ArmPlan) -> None:
    for argv in plan.pending_evaluations().values():
        eval_hier.main(argv)


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_locally(plans: list, log=print) -> None:
    """Each arm in turn: the trainer in a subprocess (it resumes from its checkpoints), then its
    evaluations; the wall and CPU seconds of each part go to ``OUT/arms/<arm>/timing.json``."""
    for plan in plans:
        timing_file = plan.folder / TIMING
        timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
        if plan.trained():
            log(f"[{plan.name}] trained already ({plan.model_file})")
        else:
            log(f"[{plan.name}] training into {plan.folder}")
            wall, cpu = time.perf_counter(), children_cpu_seconds()
            command = [sys.executable, "-m", "dinov2.train.train", *plan.train_argv]
            if subprocess.run(command).returncode != 0:
                raise TrainingError(f"arm {plan.name!r}: training failed; see {plan.folder / 'log.txt'}")
            timing["train"] = {"wall_s": time.perf_counter() - wall, "cpu_s": children_cpu_seconds() - cpu}
        pending = plan.pending_evaluations()
        log(f"[{plan.name}] evaluating on {', '.join(pending) or 'nothing new'}")
        wall, cpu = time.perf_counter(), time.process_time()
        evaluate(plan)
        timing["evaluate"] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
        if pending:
            timing_file.write_text(json.dumps(timing, indent=2))
            log(
                f"[{plan.name}] "
                + "; ".join(f"{k} {v['wall_s']:.0f} s wall, {v['cpu_s']:.0f} s CPU" for k, v in timing.items())
            )


class ArmJob(TrainingTask):
    """One arm as a submitit job: the trainer on every task, then rank 0 evaluates; requeued on pre-emption."""

    def __init__(self, train_argv, evaluations: list):
        super().__init__(train_argv)
        self.evaluations = evaluations

    def __call__(self) -> int:
        super().__call__()
        if submitit.JobEnvironment().global_rank == 0:
            for argv in self.evaluations:
                eval_hier.main(argv)
        return 0

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(ArmJob(self.train_argv, self.evaluations))


def run_on_cluster(plans: list, launcher_args, log_dir: Path, log=print) -> None:
    """Every unfinished arm as its own job (they run side by side); waits for all of them."""
    executor = make_executor(launcher_args, log_dir)
    jobs = []
    for plan in plans:
        pending = list(plan.pending_evaluations().values())
        if plan.trained() and not pending:
            log(f"[{plan.name}] trained and evaluated already")
            continue
        job = executor.submit(ArmJob(plan.train_argv, pending))
        log(f"[{plan.name}] submitted job {job.job_id}; logs {job.paths.folder}")
        jobs.append((plan, job))
    tasks = launcher_args.nodes * tasks_per_node(launcher_args)
    for plan, job in jobs:
        try:
            wait_for_results(job, tasks)
        except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as error:
            last = str(error).strip().splitlines()[-1] if str(error).strip() else "no message"
            message = f"arm {plan.name!r}: job {job.job_id} failed ({last}); logs in {job.paths.folder}"
            raise TrainingError(message) from None
        log(f"[{plan.name}] job {job.job_id} finished")
