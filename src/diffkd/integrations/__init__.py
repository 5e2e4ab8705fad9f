"""Integrations with other training frameworks, each an optional extra imported only when used.

`diffkd.integrations.ultralytics`: distil Ultralytics YOLO models inside Ultralytics' own trainers
(`pip install diffkd[ultralytics]`).
"""
