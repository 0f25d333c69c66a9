"""Engine layer: model card, loading, tiling, blending, accumulation, pre/post-processing, image I/O, the pipeline."""
