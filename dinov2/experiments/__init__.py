"""Experiments built from training and evaluation: ``python -m dinov2.experiments.compare_losses`` (HCE vs
flat CE vs self-supervision alone, same start and data, with paired bootstrap intervals).

Modules: :mod:`arms` (an arm = a name + ``supervised.*`` overrides), :mod:`runner` (train and evaluate
the arms here or as submitit jobs, resume-aware), :mod:`comparison` (tables, paired differences, plot,
verdict in words), :mod:`compare_losses` (the command line).
"""
