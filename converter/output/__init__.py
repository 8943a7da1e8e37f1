"""What a conversion writes: the weights file and its model card, the streaming writers, ONNX export."""
