"""The jobs: what a command runs, from a composed config to files in its run folder.

``evaluate`` (extract or load features, rank or verify, report), ``train`` (masked-face
finetuning), ``identify`` (one photo against a folder), ``report`` (tables of a sweep), with
the helpers they share: building the configured parts (``instantiators``), the features of a
job's sets (``extraction``), job checks, console tables, figures and pair scores. Jobs use the
method (:mod:`faceemd.emd`), data, models and storage (:mod:`faceemd.storage`); nothing below
imports a job.
"""
