"""Turning a trained global Q-network into deployable edge policies.

Numpy-only (what a device without torch imports): :mod:`common.export.encodings`
(fp32 / fp16 / int8 / sparse weight encodings), :mod:`common.export.calibrate`
(calibrated fp16 / int8 rounding) and :mod:`common.export.policy_file` (the
self-describing, checksummed policy file). Torch-side (the export machine only):
:mod:`common.export.checkpoint`, :mod:`common.export.finetune` (used by
:mod:`common.export.prune`),
:mod:`common.export.distill`, :mod:`common.export.onnx_export` and the ``fedq-export``
command in :mod:`common.export.cli`. :mod:`common.rollouts` (episodes with any
``act`` function) needs gymnasium but not torch.
"""
