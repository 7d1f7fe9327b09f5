"""Writing Caffe `.caffemodel` files with the protobuf library, for the weight tests.

No real Caffe file can be downloaded here, so the tests write their own, laid out as the
authors' release is: layers named conv1_1 ... fc8 with ReLU, pooling, dropout and soft-max
layers between them, conv1_1's filters reading B, G, R, in the old format (`layers`, type
enums, blob dims as num/channels/height/width, `input_dim` on the net) or the new one
(`layer`, type strings, blob `shape`, an Input layer).

The weights come from a torch net of torchvision's layout (tests/support/torch_vgg.py) and are
taken as Caffe's as they are: that net fed BGR images is the oracle for the imported model
fed the same images in RGB.
"""

import numpy as np
import torch

from minivgg.pretrained import caffe
from torch_vgg import TORCHVISION_CFGS

V1_TYPE = dict(caffe.V1_LAYER_TYPES)  # "CONVOLUTION" -> 4
NEW_TYPE = {"CONVOLUTION": "Convolution", "POOLING": "Pooling", "INNER_PRODUCT":
            "InnerProduct", "RELU": "ReLU", "DROPOUT": "Dropout", "SOFTMAX": "Softmax",
            "LRN": "LRN", "ELTWISE": "Eltwise", "DATA": "Data", "SOFTMAX_LOSS":
            "SoftmaxWithLoss", "ACCURACY": "Accuracy"}


class NetWriter:
    """Appends layers to a NetParameter in the old ('layers') or new ('layer') format.

    `faithful=True` declares `BlobProto.data` as caffe.proto does (repeated packed float);
    `False` uses minivgg's bytes view of the same field, which is fast for full-size nets.
    """

    def __init__(self, fmt, input_size=224, faithful=True, name="VGG"):
        assert fmt in ("layers", "layer")
        self.fmt, self.faithful = fmt, faithful
        self.schema = caffe.build_schema(float_data_as_bytes=not faithful)
        self.net = self.schema["NetParameter"](name=name)
        dims = [10, 3, input_size, input_size]
        if fmt == "layers":
            self.net.input.append("data")
            self.net.input_dim.extend(dims)
        else:
            self.net.layer.add(name="data", type="Input", top=["data"]).input_param.shape.add(
                dim=dims)
        self.top = "data"

    def add(self, kind, name, blobs=(), **params):
        """A layer of V1 type `kind` ("CONVOLUTION", ...) reading the previous top."""
        layers = self.net.layers if self.fmt == "layers" else self.net.layer
        layer = layers.add(name=name, bottom=[self.top], top=[name])
        layer.type = V1_TYPE[kind] if self.fmt == "layers" else NEW_TYPE[kind]
        field = {"CONVOLUTION": "convolution_param", "POOLING": "pooling_param",
                 "INNER_PRODUCT": "inner_product_param", "LRN": "lrn_param"}.get(kind)
        for key, value in params.items():
            target = getattr(layer, field)
            if isinstance(value, list):
                getattr(target, key).extend(value)
            else:
                setattr(target, key, value)
        for array in blobs:
            self.add_blob(layer.blobs.add(), np.asarray(array, dtype=np.float32))
        self.top = name
        return layer

    def add_blob(self, blob, array):
        if self.fmt == "layers":  # legacy (num, channels, height, width), leading 1s
            num, channels, height, width = (1,) * (4 - array.ndim) + array.shape
            blob.num, blob.channels, blob.height, blob.width = num, channels, height, width
        else:
            blob.shape.dim.extend(array.shape)
        if self.faithful:
            blob.data.extend(array.ravel().tolist())
        else:
            blob.data = np.ascontiguousarray(array, dtype="<f4").tobytes()

    def save(self, path):
        with open(path, "wb") as f:
            f.write(self.net.SerializeToString())
        return path


def write_vgg(path, net, config, fmt, faithful=True, input_size=224):
    """Write torch net `net` (torchvision layout) as the Caffe release lays out `config`."""
    w = NetWriter(fmt, input_size, faithful, name=f"VGG_{config}")
    convs = iter(m for m in net.features if isinstance(m, torch.nn.Conv2d))
    b, j = 1, 1
    for v in TORCHVISION_CFGS[config]:
        if v == "M":
            w.add("POOLING", f"pool{b}", pool=0, kernel_size=2, stride=2)
            b, j = b + 1, 1
            continue
        conv = next(convs)
        w.add("CONVOLUTION", f"conv{b}_{j}", _params(conv), num_output=conv.out_channels,
              pad=[1], kernel_size=[3])
        w.add("RELU", f"relu{b}_{j}")
        j += 1
    for i, fc in zip((0, 3, 6), ("fc6", "fc7", "fc8")):
        linear = net.classifier[i]
        w.add("INNER_PRODUCT", fc, _params(linear), num_output=linear.out_features)
        if fc != "fc8":
            w.add("RELU", f"relu{fc[2]}")
            w.add("DROPOUT", f"drop{fc[2]}")
    w.add("SOFTMAX", "prob")
    return w.save(path), w


def _params(module):
    return [module.weight.detach().numpy(), module.bias.detach().numpy()]
