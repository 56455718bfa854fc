"""Caffe reading and the graph IR: schema, reader, graph, shape inference and BatchNorm/Scale folding."""
