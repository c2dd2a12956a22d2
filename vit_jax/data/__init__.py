"""The data pipeline: tfds / image folders -> per-process batches, image ops, augmentation, our tfds builders."""
