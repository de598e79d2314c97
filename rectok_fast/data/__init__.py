"""Training data for rectok_fast.

* :mod:`.sources` -- ImageFolder tree, official ``train.txt``, demo photos; listings as numpy arrays,
  an ImageFolder listing cached once beside the output.
* :mod:`.transforms` -- the one preprocessing path (official ADM center crop, flip, [-1, 1]) shared by
  training, the latent cache, latent statistics and the demo.
* :mod:`.plan` -- the deterministic epoch order, cut into contiguous micro batches whose content does not
  depend on the world size; equal steps per rank.
* :mod:`.torch_loader` -- the torch DataLoader path and :class:`TrainLoader` / :func:`build_loader`.
* :mod:`.dali` -- the NVIDIA DALI pipeline (pipelined, prefetching, reader threads in C++).
"""
from rectok_fast.data.plan import epoch_plan, global_micro_index, rank_plan, steps_per_epoch
from rectok_fast.data.sources import (DEMO_VIRTUAL_SIZE, IMG_EXTENSIONS, DataError, SampleTable, Source,
                                      build_source, list_image_folder, listing_key, parse_file_list,
                                      read_file_list)
from rectok_fast.data.torch_loader import MAX_SUBSTITUTIONS, PlanDataset, TrainLoader, build_loader, collate
from rectok_fast.data.transforms import (adm_center_crop, adm_geometry, demo_sample, load_rgb,
                                         preprocess_array, preprocess_file, sample_flip, sample_flips,
                                         to_tensor_pm1)


def write_demo_image_folder(root=None, size=None, quality: int = 95) -> str:
    """Write the bundled photos as JPEGs into an ImageFolder tree (one class); returns the root."""
    from rectok_fast.demo_data import write_demo_image_folder as write
    return write(root, size, quality)


__all__ = ["DEMO_VIRTUAL_SIZE", "IMG_EXTENSIONS", "MAX_SUBSTITUTIONS", "DataError", "PlanDataset", "SampleTable",
           "Source", "TrainLoader", "adm_center_crop", "adm_geometry", "build_loader", "build_source", "collate",
           "demo_sample", "epoch_plan", "global_micro_index", "list_image_folder", "listing_key", "load_rgb",
           "parse_file_list", "preprocess_array", "preprocess_file", "rank_plan", "read_file_list", "sample_flip",
           "sample_flips", "steps_per_epoch", "to_tensor_pm1", "write_demo_image_folder"]
