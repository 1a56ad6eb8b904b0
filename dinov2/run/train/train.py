"""Submit ``python -m dinov2.train.train`` to SLURM with submitit; requeue on pre-emption.

    python -m dinov2.run.train.train --nodes 1 --ngpus 4 --partition gpu \\
        --config-file dinov2/configs/train/hier_vitl14.yaml --output-dir output/hier_vitl14 [key=value ...]
    python -m dinov2.run.train.train --ngpus 0 --ntasks-per-node 2 --cluster local \\
        --config-file dinov2/configs/train/demo.yaml --output-dir output/demo train.dataset_path_unsup=[...]

Each task runs the trainer with its rank; rank 0 runs on the job's first host. When SLURM sends
SIGUSR1 (time limit near, or ``scancel --signal=USR1 JOBID``), the trainer writes a checkpoint
and returns 75, and the job requeues itself; the requeued run resumes from ``--output-dir``.
"""

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import submitit

from dinov2.errors import TrainingError
from dinov2.run.submit import (
    PREEMPT_SIGNUM,
    add_launcher_args,
    distributed_environment,
    make_executor,
    slurm_job_state,
    tasks_per_node,
    wait_for_results,
)
from dinov2.utils.cli import run_cli
from dinov2.utils.config import load_config


class TrainingTask:
    """One task of a submitted training job; submitit calls ``checkpoint()`` on pre-emption."""

    def __init__(self, train_argv: Sequence[str]):
        self.train_argv = list(train_argv)

    def __call__(self) -> int:
        from dinov2.train import train as trainer  # imported in the job, not at submission

        os.environ.update(distributed_environment())
        # submitit's checkpoint-and-requeue handler; the trainer replaces it with its own while it runs.
        requeue = signal.getsignal(PREEMPT_SIGNUM)
        try:
            code = trainer.main(self.train_argv)
        except SystemExit as exit_:  # a trainer that exits instead of returning
            code = exit_.code
        if code == trainer.PREEMPTED_EXIT_CODE:
            self._after_checkpoint(requeue, code)
        if code:
            raise TrainingError(f"the trainer exited with code {code}; see this task's log")
        return 0

    @staticmethod
    def _after_checkpoint(requeue, code: int) -> None:
        """The trainer was signalled and wrote a checkpoint: requeue unless SLURM is ending the job."""
        if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
            raise TrainingError(
                "training stopped with a checkpoint in the output folder after a signal; "
                "submit again with the same --output-dir to resume"
            )
        if slurm_job_state(submitit.JobEnvironment().job_id) == "RUNNING" and callable(requeue):
            # Rank 0: calls checkpoint(), `scontrol requeue`, exits. Other ranks: returns at once.
            requeue(PREEMPT_SIGNUM, None)
        # Otherwise SLURM is cancelling the job, or requeueing it itself (`scontrol requeue`,
        # pre-emption). Either way, exit without a result: only the requeued run writes one.
        sys.exit(code)

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """The requeued run: the same command; the trainer resumes from its output folder."""
        return submitit.helpers.DelayedSubmission(type(self)(self.train_argv))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dinov2.run.train.train",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Start over in a new --output-dir: a requeued run always resumes from its output folder.",
    )
    parser.add_argument("--config-file", required=True, help="run YAML, e.g. dinov2/configs/train/hier_vitl14.yaml")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("output"),
        help="training output (checkpoints, logs, model.pth), resumed from on requeue; submitit's logs go "
        "to OUTPUT_DIR/submitit/<job id>/ (default ./output)",
    )
    parser.add_argument("opts", nargs="*", metavar="key=value", help="config overrides, e.g. optim.epochs=100")
    add_launcher_args(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_config(args.config_file, args.opts)  # a bad key fails now, not in the queue
    tasks = tasks_per_node(args)
    output_dir = args.output_dir.resolve()
    train_argv: list[str] = ["--config-file", str(Path(args.config_file).resolve()), "--output-dir", str(output_dir)]
    train_argv += args.opts
    executor = make_executor(args, output_dir / "submitit")
    job = executor.submit(TrainingTask(train_argv))
    print(
        f"submitted job {job.job_id} ({args.cluster}): {args.nodes} node(s) x {tasks} task(s), "
        f"{args.ngpus} GPU(s) per node; logs {job.paths.folder}; output {output_dir}",
        flush=True,
    )
    if not args.wait and args.cluster == "slurm":
        return 0  # local and debug jobs live only as long as this process: always wait for them
    try:
        wait_for_results(job, args.nodes * tasks)
    except submitit.core.utils.FailedJobError as error:
        last_line = str(error).strip().splitlines()[-1] if str(error).strip() else "no message"
        raise TrainingError(f"job {job.job_id} failed ({last_line}); logs in {job.paths.folder}") from None
    except submitit.core.utils.UncompletedJobError as error:
        raise TrainingError(f"job {job.job_id} did not complete: {error}; logs in {job.paths.folder}") from None
    print(f"job {job.job_id} finished; model file {output_dir / 'model.pth'}", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
