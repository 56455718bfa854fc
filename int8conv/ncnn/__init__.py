"""ncnn output: the model representation and file format (``model``), the Caffe converter (``convert``)."""
