"""Distil inside other training frameworks; each module imports its framework only when imported itself.

`diffkd.integrations.ultralytics` (Ultralytics YOLO, inside Ultralytics' own trainers,
`pip install diffkd[ultralytics]`), `diffkd.integrations.transformers` (Hugging Face Trainer,
`pip install diffkd[hf]`) and `diffkd.integrations.lightning` (Lightning, `pip install diffkd[lightning]`).
"""
