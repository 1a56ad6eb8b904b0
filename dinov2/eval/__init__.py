"""Evaluation: ``python -m dinov2.eval.eval_hier`` (features -> k-NN / logistic regression / supervised
head -> flat and hierarchical metrics -> report and plots).

Modules: :mod:`metrics` (pure metric functions over tree node indices), :mod:`features` (CLS-token
extraction and its cache), :mod:`protocols` (classifiers and folds), :mod:`report` (aggregation
and written outputs), :mod:`plots` (figures), :mod:`eval_hier` (the command line).
"""
