"""A pycaffe-runnable twin of a Caffe-fork model, as an independent FP32 reference for the OpenCV engine.

pycaffe (brocolli-caffe) lacks the fork types ConvolutionDepthwise / DepthwiseConvolution and ShuffleChannel, and
aborts on caffemodels written with other field numbers (yoloface's Upsample). The twin spells those layers with
BVLC ones: a depthwise convolution as ``Convolution`` with ``group = num_output``, a channel shuffle as
``Reshape (N, g, C/g, HW) -> Permute (0, 2, 1, 3) -> Reshape (N, C, H, W)``, whose last layer keeps the original
name and top; the weights are copied from the project's reader into a caffemodel pycaffe writes itself.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format

from int8conv.caffe.reader import read_caffemodel, read_prototxt, weights_by_layer

DEPTHWISE_TYPES = ("ConvolutionDepthwise", "DepthwiseConvolution")


def _shuffle_layers(caffe_pb2, layer, shape: tuple[int, ...]) -> list:
    """Three BVLC layers computing ShuffleChannel (group g) on an NCHW blob of ``shape``."""
    _, channels, height, width = shape
    group = layer.shuffle_channel_param.group
    split, permute, merge = caffe_pb2.LayerParameter(), caffe_pb2.LayerParameter(), caffe_pb2.LayerParameter()
    split.name, split.type, split.bottom[:], split.top[:] = (
        f"{layer.name}/split",
        "Reshape",
        [layer.bottom[0]],
        [f"{layer.name}/split"],
    )
    split.reshape_param.shape.dim[:] = [0, group, channels // group, height * width]
    permute.name, permute.type, permute.bottom[:], permute.top[:] = (
        f"{layer.name}/permute",
        "Permute",
        [f"{layer.name}/split"],
        [f"{layer.name}/permute"],
    )
    permute.permute_param.order[:] = [0, 2, 1, 3]
    merge.name, merge.type, merge.bottom[:], merge.top[:] = (
        layer.name,
        "Reshape",
        [f"{layer.name}/permute"],
        list(layer.top),
    )
    merge.reshape_param.shape.dim[:] = [0, channels, height, width]
    return [split, permute, merge]


def write_twin(
    caffe, prototxt: Path, caffemodel: Path, out: Path, shapes: dict[str, tuple[int, ...]]
) -> tuple[Path, Path]:
    """Write the twin's prototxt and caffemodel under ``out``; ``shapes`` gives each ShuffleChannel's bottom
    shape by Caffe blob name."""
    from caffe.proto import caffe_pb2

    net = read_prototxt(prototxt)
    twin = caffe_pb2.NetParameter()
    for layer in net.layer:
        if layer.type == "ShuffleChannel":
            twin.layer.extend(_shuffle_layers(caffe_pb2, layer, shapes[layer.bottom[0]]))
            continue
        if layer.type in DEPTHWISE_TYPES:
            layer.type = "Convolution"
            if layer.convolution_param.group <= 1:
                layer.convolution_param.group = layer.convolution_param.num_output
        text_format.Parse(text_format.MessageToString(layer), twin.layer.add())
    del net.layer[:]  # what remains is the header: name and inputs
    text = text_format.MessageToString(net) + text_format.MessageToString(twin)
    out.mkdir(parents=True, exist_ok=True)
    twin_proto, twin_model = out / "twin.prototxt", out / "twin.caffemodel"
    twin_proto.write_text(text, encoding="utf-8")
    weights = weights_by_layer(read_caffemodel(caffemodel), caffemodel)
    model = caffe.Net(str(twin_proto), caffe.TEST)
    for name, params in model.params.items():
        for blob, array in zip(params, weights[name], strict=True):
            blob.data[...] = array.reshape(blob.data.shape)
    model.save(str(twin_model))
    return twin_proto, twin_model
