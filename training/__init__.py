"""Training stage: matcher fine-tuning, ranker training, ONNX export. The only code importing torch."""
