"""Evaluation of RecTok models (the ``rectok-eval`` command is :mod:`rectok_fast.evaluate`).

* :mod:`~rectok_fast.evaluation.fidelity` -- torch-fidelity's Inception from a local file; FID, IS,
  precision/recall, ``.npz`` statistics
* :mod:`~rectok_fast.evaluation.image_metrics` -- PSNR, SSIM, LPIPS on uint8 images
* :mod:`~rectok_fast.evaluation.recon` -- tokenizer reconstruction (:func:`evaluate_reconstruction`)
* :mod:`~rectok_fast.evaluation.gen` -- generator samples per guidance scale
* :mod:`~rectok_fast.evaluation.probe` -- linear probe of the latents
* :mod:`~rectok_fast.evaluation.dist` -- rank batches and gathering
"""
from rectok_fast.evaluation.fidelity import EvalError, load_inception
from rectok_fast.evaluation.recon import evaluate_reconstruction

__all__ = ["EvalError", "evaluate_reconstruction", "load_inception"]
