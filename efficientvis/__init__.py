"""EfficientVIS edge toolkit: train, export, calibrate and run EfficientVIS.

Sub-packages (each a top-level folder of the repository):
  efficientvis.ytvis        YouTube-VIS data format, synthetic videos, the official metric (torch-free)
  efficientvis.training     PyTorch model, losses, training and inference
  efficientvis.export       ONNX export and TensorRT engine building
  efficientvis.calibration  INT8 calibration data, Q/DQ models, calibration caches
  efficientvis.runtime      torch-free clip loop on ONNX Runtime or TensorRT
"""

__version__ = "0.1.0"
