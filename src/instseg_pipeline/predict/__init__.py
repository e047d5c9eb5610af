"""One inference path: preprocessing, postprocessing, the device rule, the torch / ONNX
predictor and batch prediction over the images table."""
