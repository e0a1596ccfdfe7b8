"""Model architectures, one file each (emo.py), found by `model_type` (registry.py), built from
shared blocks (layers.py) and the one routing function (routing.py)."""
