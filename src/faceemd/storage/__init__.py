"""What the jobs keep on disk, and how: the feature cache and the stage-2 score cache,
manifests of resumable per-image work, checkpoints, and atomic writes (a killed job or a full
disk leaves the previous file or none, never half of one). In-process memos of files read
once per sweep live here too (:mod:`faceemd.storage.filememo`)."""
