"""Using a trained network: inference tasks, tiled inference and image files in and out.

``dlas-test``, ``codes/process_video.py`` and the evaluators share these, so a model gives the same pixels in
validation, on a folder of images and on a video. See :mod:`dlas.inference.tasks` for the task interface.
"""
from dlas.inference.images import list_images, load_image, prepare_output_folder, save_image, tensor_to_uint8
from dlas.inference.tiling import check_tiling, infer_scale, run_network, tiled_forward

__all__ = ["check_tiling", "infer_scale", "list_images", "load_image", "prepare_output_folder", "run_network",
           "save_image", "tensor_to_uint8", "tiled_forward"]
