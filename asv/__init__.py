"""The library below the four verb scripts: config, audio and data, embedding and scoring,
metrics, checkpoints, augmentation, the demo corpus; `asv.models` is the models package.

`asv.load(path)` opens a checkpoint for the Python API (asv/api.py: embed, score, enroll, verify,
identify). It is imported on first use, so `import asv.metrics` (report.py) does not load torch.
"""

API = ("load", "Model", "Verification")


def __getattr__(name):
    if name in API:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'asv' has no attribute {name!r}")
