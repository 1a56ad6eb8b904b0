"""Launchers: submit training to SLURM (or this machine) with submitit."""
