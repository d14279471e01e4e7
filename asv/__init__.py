"""The library below the four verb scripts: config, audio and data, embedding and scoring,
metrics, checkpoints, augmentation, the demo corpus; `asv.models` is the models package."""
