"""Datasets, degradations and the resumable sampler (see docs/data.md).

The registered datasets (``image_folder``, ``paired_folder``, ``single_image``) are imported lazily by the
registry; import :mod:`dlas.data.sampler` for :func:`~dlas.data.sampler.build_loader`.
"""
